"""The broker connection both broker connectors keep: TLS from the config, reconnects with backoff.

See :mod:`connectors.broker_common` for what is shared and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from typing import Any

from connectors.broker_common.config import BrokerConfig, BrokerTls
from gateway.sdk import Backoff, Connector, ConnectorConfig, ConnectorContext, TransientError, event


class BrokerConnector(Connector):
    """One connection to the broker, kept by a background task until :meth:`close`.

    The task connects, waits until the connection is lost, backs off and connects again. The
    backoff doubles from ``reconnect_min`` to ``reconnect_max`` and each wait is 50–100 % of it
    (jitter, so replicas do not reconnect in step); a connection that came up starts it again
    at ``reconnect_min``. The task logs ``<kind>.connect_failed`` for each failed attempt and
    ``<kind>.disconnected`` when a connection that was up ends.

    A subclass sets ``cfg`` and provides :meth:`_connect_once`, :meth:`_close_connection` and
    :meth:`_where`; it sets ``_lost`` when the connection ends, and keeps ``_connected`` and
    ``_up`` (what :meth:`open` waits for) true while it is up.
    """

    cfg: BrokerConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self._runner: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._connected = False
        self._closing = False
        self._error = "not connected yet"
        self._rng = random.Random()

    async def open(self) -> None:
        """Start the connection task and wait up to ``connect_timeout`` for the first connection.

        Raises TransientError when the broker cannot be reached; the task keeps trying in the
        background, so the supervisor's next ``open`` just waits again.
        """
        if self._runner is None:
            self._closing = False
            self._runner = asyncio.create_task(self._run(), name=f"{self.kind}-{self.name}")
        try:
            await asyncio.wait_for(self._up.wait(), timeout=self.cfg.connect_timeout + 1)
        except TimeoutError:
            raise TransientError(f"{self.kind.upper()} broker {self._where()}: {self._error}") from None

    async def _stop_runner(self) -> None:
        """End the connection task (``close`` sets ``_closing`` first)."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None

    async def _run(self) -> None:
        """Connect, wait for the connection to end, back off with jitter, again — until closed."""
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max, rng=self._rng)
        while not self._closing:
            was_up = False  # not ``_connected``: the library's callback has cleared that by now
            try:
                await self._connect_once()
                was_up = True
                backoff.reset()
                await self._lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._error = f"connect failed: {describe(exc)}"
                event(self.log, f"{self.kind}.connect_failed", logging.WARNING, connector=self.name,
                      broker=self._where(), error=self._error, retry_in=round(backoff.bound, 2))
            self._connected = False
            self._up.clear()
            await self._close_connection()
            if was_up and not self._closing:
                event(self.log, f"{self.kind}.disconnected", logging.WARNING, connector=self.name,
                      broker=self._where(), error=self._error)
            if self._closing:
                break
            await asyncio.sleep(backoff.next())

    async def _connect_once(self) -> None:
        """Connect; return once the connection is up (``_lost`` cleared), raise if it cannot be."""
        raise NotImplementedError

    async def _close_connection(self) -> None:
        """Let go of the connection that ended (or never came up) before the next attempt."""
        raise NotImplementedError

    def _where(self) -> str:
        """``host:port`` of the broker, for errors and logs."""
        raise NotImplementedError


def tls_context(tls: BrokerTls | None) -> ssl.SSLContext:
    """A client context that verifies the broker: TLS 1.2 or later, its certificate against
    ``ca_file`` (the system CAs without one) and its name (``server_name`` when set, else the
    URL's host), with our certificate for mutual TLS when ``cert_file`` is set."""
    ctx = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.server_name = tls.server_name if tls else None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls and tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
    else:
        ctx.load_default_certs()
    if tls and tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file,
                            tls.key_password.get_secret_value() if tls.key_password else None)
    return ctx


class _NamedContext(ssl.SSLContext):
    """Checks the broker's certificate against ``server_name`` when set instead of the host the
    client library connects to: paho wraps a socket, asyncio (aio-pika) wraps a BIO."""

    server_name: str | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_bio(*args, **kwargs)


def describe(exc: BaseException) -> str:
    """A driver's exception as the short text errors and logs carry."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    # aiormq wraps the ssl module's error as AMQPConnectionError(errno, "[SSL: …] …")
    wrapped = next((a for a in exc.args if isinstance(a, str) and a.startswith("[SSL")), None)
    if wrapped is not None:
        return f"TLS: {wrapped}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
