"""The XMPP connection underneath the connector: reconnects, rooms, keepalive and failures.

:class:`XmppConnection` holds the slixmpp client and the connection's state: the reconnect
after a backoff, joining the configured rooms, an XMPP ping every 60 s that drops a dead
connection, and the failures that end an attempt (authentication, TLS, a stream error, hostile
XML), logged and kept as the reason ``open`` and ``health`` report.
:class:`~connectors.xmpp.XmppConnector` makes the client and handles session start and
disconnect; the inbound and outbound sides (:mod:`connectors.xmpp.inbound`,
:mod:`connectors.xmpp.outbound`) build on this class.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout

from connectors.xmpp.config import XmppConfig
from connectors.xmpp.stream import HardenedClient
from gateway.sdk import Backoff, Connector, ConnectorConfig, ConnectorContext, event

_KEEPALIVE = 60.0
_KEEPALIVE_TIMEOUT = 20.0


class XmppConnection(Connector):
    """The slixmpp client's connection: its state, reconnects, rooms, keepalive and failures."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, XmppConfig)
        self.cfg = config
        self.jid = JID(config.jid)
        self.host = config.host or self.jid.domain
        self.port = config.port or (5223 if config.tls == "direct" else 5222)
        self._rooms = frozenset(config.rooms)
        self._client: HardenedClient | None = None
        self._online = asyncio.Event()
        #: Set when an attempt failed for a reason waiting will not fix (auth, TLS, hostile XML).
        self._failed = asyncio.Event()
        self._error = "not connected yet"
        self._closing = False
        self._reconnects = Backoff(1.0, 30.0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._joined: set[str] = set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join_rooms(self) -> None:
        client = self._client
        if client is None:
            return
        for room in self._rooms - self._joined:
            try:
                await client.plugin["xep_0045"].join_muc_wait(JID(room), self.cfg.nick, maxstanzas=0,
                                                              timeout=self.cfg.connect_timeout)
                self._joined.add(room)
            except Exception as exc:
                event(self.log, "xmpp.room_join_failed", logging.WARNING, connector=self.name, room=room,
                      error=f"{type(exc).__name__}: {exc}")

    async def _reconnect(self, delay: float) -> None:
        await asyncio.sleep(delay)
        client = self._client
        if client is not None and not self._closing and client.transport is None:
            client.connect(self.host, self.port)

    def _on_connection_failed(self, error: Any) -> None:
        self._error = f"cannot connect: {error}"

    def _on_auth_failed(self, _: Any) -> None:
        self._error = "authentication failed (check jid and password)"
        self._failed.set()
        event(self.log, "xmpp.auth_failed", logging.ERROR, connector=self.name, jid=self.jid.bare)

    def _on_tls_failed(self, error: Any) -> None:
        self._error = f"TLS failed: {error}"
        self._failed.set()
        event(self.log, "xmpp.tls_failed", logging.ERROR, connector=self.name, error=str(error))
        if self._client is not None:
            self._client.abort()

    def _on_stream_error(self, error: Any) -> None:
        condition = error["condition"] if error is not None else ""
        self._error = f"stream error from the server: {condition}"
        event(self.log, "xmpp.stream_error", logging.WARNING, connector=self.name, condition=condition)

    def _on_refused(self, condition: str, text: str) -> None:
        self._error = f"refused the server's stream: {text}"
        self._failed.set()
        event(self.log, "xmpp.hostile_input", logging.ERROR, connector=self.name, condition=condition, error=text)

    async def _keepalive(self) -> None:
        """Ping the server now and then; no answer means a dead connection: drop it, reconnect."""
        while True:
            await asyncio.sleep(_KEEPALIVE)
            client = self._client
            if client is None or not self._online.is_set():
                continue
            try:
                await client.plugin["xep_0199"].ping(jid=JID(self.jid.domain), timeout=_KEEPALIVE_TIMEOUT)
            except IqError:
                pass  # an answer, even an error, proves the stream is alive
            except IqTimeout:
                event(self.log, "xmpp.keepalive_timeout", logging.WARNING, connector=self.name)
                if client.transport is not None:
                    client.abort()
