"""The AMQP connection underneath the connector, and what its two sides share.

:class:`AmqpConnection` holds the aio-pika connection and its generation (counted up for each
new connection and each new consumer channel, so that no acknowledgement goes to a channel
that did not deliver the message), names the broker for errors and logs, and notices when the
connection is lost. :class:`~connectors.amqp.AmqpConnector` connects (declaring the exchanges
and consuming again) and closes; the inbound and outbound sides (:mod:`connectors.amqp.inbound`,
:mod:`connectors.amqp.outbound`) build on this class.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractConnection

from connectors.amqp.config import AmqpConfig
from connectors.broker_common.connection import BrokerConnector, describe
from gateway.sdk import ConnectorConfig, ConnectorContext


class AmqpConnection(BrokerConnector):
    """The connection both sides use: its generation, the broker's address, its loss."""

    cfg: AmqpConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, AmqpConfig)
        self.cfg = config
        self._conn: AbstractConnection | None = None
        self._generation = 0

    def _where(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.cfg.url)
        return f"{parts.hostname}:{parts.port or (5671 if self.cfg.use_tls else 5672)}"

    def _on_connection_closed(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._closing and exc is not None:
            self._error = f"connection closed: {describe(exc)}"
        self._connected = False
        self._up.clear()
        self._lost.set()

    async def _drop_connection(self, why: str) -> None:
        self._error = why
        self._lost.set()
