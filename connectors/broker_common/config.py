"""The connection settings both broker connectors have (see :mod:`connectors.broker_common`)."""

from __future__ import annotations

from typing import Any

from gateway.sdk import ConnectorConfig, Duration, Secret, Strict


class BrokerTls(Strict):
    #: CA bundle that signs the broker's certificate (system CAs when omitted).
    ca_file: str | None = None
    #: Client certificate and key for mutual TLS.
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | None = None
    #: Name to verify in the broker's certificate when it differs from the URL's host.
    server_name: str | None = None


class BrokerConfig(ConnectorConfig):
    """Base of the ``mqtt`` and ``amqp`` configs: where the broker is, how to reconnect, who we
    are, TLS. A subclass gives ``url`` its default and checks its form (credentials never go in
    it), and types ``tls`` with its own subclass of :class:`BrokerTls` (errors name that one)."""

    url: str
    connect_timeout: Duration = 10.0
    #: Reconnect backoff: doubles from min to max, each wait 50–100 % of it (jitter).
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0
    username: str | None = None
    password: Secret | None = None
    tls: BrokerTls | None = None

    def model_post_init(self, _: Any) -> None:
        if self.password is not None and not self.username:
            raise ValueError("password needs username")
        if self.reconnect_min <= 0 or self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_min must be > 0 and at most reconnect_max")
