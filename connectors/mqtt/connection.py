"""The MQTT connection underneath the connector: paho's socket, watched by the asyncio loop.

:class:`MqttConnection` connects (paho's blocking ``reconnect`` in a worker thread, then the
socket registered with the loop and the CONNACK awaited), answers paho's socket callbacks, runs
paho's keepalive timer, and pauses reading while inbound has ``max_inflight`` messages in
flight (back-pressure). :class:`~connectors.mqtt.MqttConnector` makes the client and handles
CONNACK and DISCONNECT; the inbound and outbound sides (:mod:`connectors.mqtt.inbound`,
:mod:`connectors.mqtt.outbound`) build on this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from connectors.broker_common.connection import BrokerConnector
from connectors.mqtt.client import GatewayClient
from connectors.mqtt.config import MqttConfig
from gateway.sdk import ConnectorConfig, ConnectorContext, TransientError, current_secret, retrieve


class _ConnectFailed(Exception):
    pass


class MqttConnection(BrokerConnector):
    """One paho client driven from the loop: its connect, its socket and its read pause.

    :class:`~connectors.mqtt.MqttConnector` makes ``_client`` before the first connect and
    resolves ``_connack`` from its CONNACK callback; :meth:`_connect_once` waits for that.
    """

    cfg: MqttConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, MqttConfig)
        self.cfg = config
        base = config.client_id or f"gateway-{ctx.name}"
        # The broker allows one session per client id: each worker process needs its own.
        self.client_id = f"{base}-w{ctx.worker}" if ctx.workers > 1 else base
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: GatewayClient | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._writing = False
        self._in_connect = False
        self._connack: asyncio.Future[None] | None = None
        self._connect_job: asyncio.Future[MQTTErrorCode] | None = None
        self._generation = 0
        self._reading_paused = False
        self._read_soon: asyncio.Handle | None = None

    async def _connect_once(self) -> None:
        client = self._client
        assert client is not None and self._loop is not None
        self._teardown_socket()
        self._lost.clear()
        cfg = self.cfg
        if cfg.username:  # a password file renewed since the last connection is read now
            client.username_pw_set(cfg.username, current_secret(cfg.password))
        self._connack = self._loop.create_future()
        self._in_connect = True
        self._connect_job = asyncio.ensure_future(asyncio.to_thread(client.reconnect))
        self._connect_job.add_done_callback(retrieve)
        try:
            rc = await asyncio.shield(self._connect_job)
        finally:
            self._in_connect = False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise _ConnectFailed(mqtt.error_string(rc))
        sock = client.socket()
        if sock is None:
            raise _ConnectFailed("no socket after connect")
        with contextlib.suppress(OSError, AttributeError):
            # paho leaves Nagle on: small PUBACKs would wait for the peer's delayed ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading_paused = False
        client.hold = False
        if client.want_write():
            self._on_register_write(client, None, sock)
        try:
            await asyncio.wait_for(asyncio.shield(self._connack), timeout=self.cfg.connect_timeout)
        except TimeoutError:
            raise _ConnectFailed("no CONNACK in time") from None
        self._schedule_misc()

    async def _close_connection(self) -> None:
        """Stop watching the lost connection's socket (paho closes the socket itself)."""
        self._teardown_socket()

    def _where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def _teardown_socket(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        if self._read_soon is not None:
            self._read_soon.cancel()
            self._read_soon = None
        self._fd = None
        self._writing = False

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        self._misc = self._loop.call_later(1.0, self._on_misc)

    def _on_misc(self) -> None:
        client = self._client
        if client is None or self._fd is None:
            return
        client.loop_misc()
        if self._fd is not None:
            self._schedule_misc()

    # paho socket callbacks: ignored while the connect runs in its worker thread (we register
    # the socket ourselves once it returns); otherwise they run on the loop thread.

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        return None

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        self._teardown_socket()
        if self._connected:  # closed without a DISCONNECT callback: still a lost connection
            self._error = self._error or "connection closed"
            self._connected = False
            self._up.clear()
            self._lost.set()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        if self._fd is not None and not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        if self._fd is not None and self._writing and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        self._read_soon = None
        client = self._client
        if client is not None:
            client.read_available()
            if client.buffered() and not self._reading_paused:
                self._read_buffered()  # read already; the socket will not tell us again

    def _read_buffered(self) -> None:
        if self._read_soon is None and self._loop is not None:
            self._read_soon = self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading_paused = True
            if self._client is not None:
                self._client.hold = True

    def _resume_reading(self) -> None:
        if self._reading_paused and self._fd is not None and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            if self._client is not None and self._client.buffered():
                self._read_buffered()
        self._reading_paused = False
        if self._client is not None:
            self._client.hold = False

    def _client_or_fail(self) -> GatewayClient:
        if self._client is None:
            raise TransientError(f"connector {self.name!r} is not open")
        return self._client
