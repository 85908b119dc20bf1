"""broker_common — what the two broker connectors, ``mqtt`` and ``amqp``, share.

:mod:`~connectors.broker_common.config`: the settings every broker connection has and checks the
same way: ``url`` (each kind gives its default and checks its form), ``username`` and
``password`` (a secret, and only with a username), ``tls`` (CA, client certificate and key,
server name), ``connect_timeout`` and the reconnect backoff bounds. Pure: no sockets there.

:mod:`~connectors.broker_common.connection`: the TLS context built from those settings,
:class:`~connectors.broker_common.connection.BrokerConnector`, the lifecycle both connectors
have (one connection, kept by a background task that reconnects with exponential backoff and
jitter until the connector closes), and the short text a driver's error becomes in health
reasons and logs.
"""
