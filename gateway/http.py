"""Shared HTTP listeners for the data plane and the admin API.

Several connectors may serve one port (REST at ``/``, SOAP at ``/soap``): each mounts an ASGI
app under a path prefix on a listen address; the hub runs one uvicorn server per address and
dispatches by longest prefix. Sockets are bound by us, so a busy port is an error we report,
not a ``sys.exit`` inside uvicorn.

Every listen address has the bounds of :class:`~gateway.config.models.HttpListenerSettings`
(``gateway.http`` in routes.yaml), enforced below the app, so a request past one never reaches
a connector, the spool or a sink:

* a request target past ``max_url``: ``414``; a header section past ``max_header_bytes`` or
  ``max_headers`` fields: ``431``, counted while the bytes arrive (httptools would otherwise
  gather a 20 MB header in memory before anyone looks at it);
* a head not complete within ``head_timeout`` of the connection (or of a later request's first
  byte): ``408`` and closed (closed without an answer when nothing came); a body not complete
  within ``body_timeout`` of its head: ``408`` and closed;
* ``max_requests`` in progress: the next one gets ``503`` + ``Retry-After``. Connections that have
  no request in progress (idle, or a head still trickling in) do not count: a flood of slow
  connections cannot turn real requests away. They are bounded by ``max_connections`` and
  ``max_connections_per_client`` instead: a new connection past either closes the oldest such
  connection (of that address, for the second), or is itself closed when every one is busy.

An address with ``tls`` in ``gateway.http`` serves HTTPS; its certificate is read again when its
files change (:class:`~gateway.tls.RenewingTls`), so a renewed one is served without a restart.

A refused request is answered with problem+json and ``Connection: close``; its remaining input is
read and discarded for a moment (so the client sees the answer, not a reset), then closed.
The bounds live in a subclass of uvicorn's ``HttpToolsProtocol`` that relies on its internals
(parser callbacks, ``cycle``, ``flow``, ``server_state``): pyproject pins uvicorn's minor version.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import http
import json
import logging
import math
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Generator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.config.models import HttpListenerSettings
from gateway.logs import event
from gateway.tls import RenewingTls

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body passed the reader's limit (nothing more of it was kept)."""


class ClientDisconnected(Exception):
    """The client went away before its request body was complete."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """A request's whole body from an ASGI ``receive``, or :class:`BodyTooLarge` as soon as it
    passes ``limit`` bytes (memory stays bounded), :class:`ClientDisconnected` if the client went
    away. The listener's body deadline (``gateway.http``) bounds how long it may take."""
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


def basic_authorization(username: str, password: str) -> str:
    """The ``Authorization`` value for HTTP Basic (RFC 7617, UTF-8) for an outbound request."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} must be HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - an explicit ":PORT" means all interfaces
    return host, int(port)


async def send_problem(send: Send, status: int, title: str, detail: str = "",
                       headers: list[tuple[bytes, bytes]] | None = None,
                       extra: Mapping[str, Any] | None = None, *, kind: str | None = None,
                       problem_id: str | None = None) -> str:
    """An RFC 9457 problem+json response for a client; returns the ``id`` it carries.

    ``detail`` says what the client can fix and nothing internal (no connector, route, host or
    exception): the caller logs the full reason with the same id. ``type`` is the stable
    ``urn:gateway:problem:<kind>`` (default: the status, ``not-found``); ``id`` is
    ``problem_id`` (an envelope id) or a fresh error id. ``extra`` adds extension members.
    """
    import secrets

    error_id = problem_id or f"err-{secrets.token_hex(8)}"
    slug = kind or http.HTTPStatus(status).phrase.lower().replace(" ", "-")
    problem = {"type": f"urn:gateway:problem:{slug}", "title": title, "status": status, "detail": detail,
               "id": error_id, **(extra or {})}
    body = json.dumps(problem, default=str, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
    return error_id


#: How often a listener looks for overdue heads and bodies: a timeout fires at most this late.
SWEEP = 0.25
#: How long a refused connection's remaining input is read and discarded before it is cut.
LINGER = 2.0
_INF = float("inf")
#: Open files kept beside the HTTP connections: the spool, logs, outbound connections, other protocols.
FD_RESERVE = 1024


class _Refusal(Exception):
    """Raised from a parser callback: the request is answered ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class _Guard:
    """One listen address's bounds, its open connections (oldest first) and its refusal counts."""

    def __init__(self, listen: str, limits: HttpListenerSettings, log: logging.Logger):
        self.listen = listen
        self.limits = limits
        self.log = log
        # Bytes a head may take before anyone could have parsed it: the URL, the header section
        # and the framing of each field (": ", CRLF); past it the head is refused unparsed.
        self.head_cap = limits.max_url + limits.max_header_bytes + 4 * limits.max_headers + 64
        self.open: dict[_GuardedProtocol, None] = {}
        self.by_client: dict[str, dict[_GuardedProtocol, None]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, conn: _GuardedProtocol) -> bool:
        """Take a new connection, closing an older one without a request in progress if a bound
        is reached; False when every connection is busy and the new one must go."""
        per_client = self.limits.max_connections_per_client
        peers = self.by_client.get(conn.client_host, {})
        if per_client and len(peers) >= per_client and not self._evict(peers):
            self.counts["client_busy"] += 1
            return False
        if len(self.open) >= self.limits.max_connections and not self._evict(self.open):
            self.counts["busy"] += 1
            return False
        self.open[conn] = None
        # Looked up again: an eviction may have removed the address's entry.
        self.by_client.setdefault(conn.client_host, {})[conn] = None
        return True

    def _evict(self, pool: dict[_GuardedProtocol, None]) -> bool:
        for victim in pool:
            if not victim.in_request:
                self.forget(victim)
                victim.transport.abort()
                self.counts["evicted"] += 1
                return True
        return False

    def forget(self, conn: _GuardedProtocol) -> None:
        self.open.pop(conn, None)
        peers = self.by_client.get(conn.client_host)
        if peers is not None:
            peers.pop(conn, None)
            if not peers:
                del self.by_client[conn.client_host]

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._report()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self.open if c.deadline <= now]:
            conn.overdue()
        self._report()
        self._timer = loop.call_later(SWEEP, self._sweep)

    def _report(self) -> None:
        # One line per sweep, not one per connection: a flood must not become a log flood.
        if self.counts:
            event(self.log, "http.refused", logging.INFO, listen=self.listen, **dict(self.counts))
            self.counts.clear()


class _GuardedConfig(uvicorn.Config):
    """A uvicorn config that carries its listener's guard to every connection's protocol."""

    guard: _Guard


class _GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the listener's bounds (see the module card).

    ``phase`` is ``head`` (waiting for or reading a request line and headers), ``body``
    (reading a body) or ``linger`` (refused: discarding input until closed); ``deadline`` is
    when the phase is overdue (infinite while idle between requests: uvicorn's keep-alive
    timer covers that).
    """

    def __init__(self, config: uvicorn.Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None):
        super().__init__(config, server_state, app_state, _loop)
        self.guard = cast(_GuardedConfig, config).guard
        # uvicorn's limit counts every open socket, so idle and slow connections would turn real
        # requests away; ours counts requests in progress (on_headers_complete).
        self.limit_concurrency = None
        self.client_host = ""
        self.phase = "head"
        self.deadline = _INF
        self._head_bytes = 0
        self._header_bytes = 0
        self._header_count = 0

    @property
    def in_request(self) -> bool:
        """A request's head has arrived and its answer is not finished."""
        return self.phase != "linger" and (bool(self.pipeline) or (
            self.cycle is not None and not self.cycle.response_complete))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else ""
        if not self.guard.admit(self):
            transport.abort()
            return
        self.deadline = self.loop.time() + self.guard.limits.head_timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self.deadline = _INF
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == "linger":
            return
        if self.phase == "head":
            self._head_bytes += len(data)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Refusal):
                self._refuse(exc.__context__)
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            # No app here speaks WebSocket (ws="none"): the request was answered as plain HTTP.
            pass
        if self.phase == "head" and self._head_bytes > self.guard.head_cap:
            self._refuse(_Refusal(431, "header_too_large", "the request head is too large"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = self._header_count = 0
        if self.deadline == _INF:
            self.deadline = self.loop.time() + self.guard.limits.head_timeout

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.guard.limits.max_url:
            raise _Refusal(414, "url_too_long", f"the request target is longer than {self.guard.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.guard.limits
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > limits.max_headers:
            raise _Refusal(431, "header_too_large", f"more than {limits.max_headers} header fields")
        if self._header_bytes > limits.max_header_bytes:
            raise _Refusal(431, "header_too_large",
                           f"the header fields are larger than {limits.max_header_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if len(self.tasks) >= self.guard.limits.max_requests:
            raise _Refusal(503, "busy", "too many requests in progress, try again shortly")
        super().on_headers_complete()
        self.phase = "body"
        self.deadline = self.loop.time() + self.guard.limits.body_timeout

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.phase = "head"
        self.deadline = _INF
        self._head_bytes = 0

    def overdue(self) -> None:
        """Called by the sweep once ``deadline`` has passed."""
        if self.phase == "linger":
            self.transport.abort()
            self.guard.forget(self)
            return
        if self.phase == "body":
            if self.flow.read_paused:
                return  # the app has not taken what came: not the client's delay
            self.guard.counts["body_timeout"] += 1
            self._refuse(_Refusal(408, "body_timeout", f"the body did not arrive within "
                                  f"{self.guard.limits.body_timeout:g}s"), count=False)
            return
        self.guard.counts["head_timeout"] += 1
        if self._head_bytes:
            self._refuse(_Refusal(408, "head_timeout", f"the request head did not arrive within "
                                  f"{self.guard.limits.head_timeout:g}s"), count=False)
        else:
            self.transport.close()
            self.deadline = _INF
            self.guard.forget(self)

    def _refuse(self, refusal: _Refusal, *, count: bool = True) -> None:
        """Answer ``refusal`` and close; keep reading (and dropping) input for up to LINGER."""
        if count:
            self.guard.counts[refusal.reason] += 1
        in_body = self.phase == "body"
        self.phase = "linger"
        self.deadline = self.loop.time() + LINGER
        self.pipeline.clear()
        cycle = self.cycle
        if in_body and cycle is not None and cycle.response_complete:
            self.transport.close()  # answered already (the app's own limit or timeout)
            return
        if cycle is not None and not cycle.response_complete and (cycle.response_started or not in_body):
            # An earlier request's answer is due on this connection: no room for ours before it.
            cycle.keep_alive = False
            return
        if in_body and cycle is not None:
            # The app still waits for this body: it hears a disconnect, and the answer is ours.
            cycle.disconnected = True
            cycle.message_event.set()
        body = json.dumps({"type": "about:blank", "title": http.HTTPStatus(refusal.status).phrase,
                           "status": refusal.status, "detail": refusal.detail}).encode()
        head = [f"HTTP/1.1 {refusal.status} {http.HTTPStatus(refusal.status).phrase}",
                "content-type: application/problem+json", f"content-length: {len(body)}", "connection: close"]
        if refusal.status == 503:
            head.append("retry-after: 1")
        self.transport.write("\r\n".join(head).encode("ascii") + b"\r\n\r\n" + body)
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The runtime owns SIGTERM/SIGINT; uvicorn must not install its own handlers.
        yield


@dataclass
class _Listener:
    listen: str
    mounts: dict[str, tuple[str, ASGIApp]] = field(default_factory=dict)  # prefix -> (owner, app)
    server: _Server | None = None
    task: asyncio.Task[None] | None = None
    sock: socket.socket | None = None
    guard: _Guard | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope.get("path", "/")
        best = ""
        app: ASGIApp | None = None
        for prefix, (_, candidate) in self.mounts.items():
            if (path == prefix or path.startswith(prefix.rstrip("/") + "/") or prefix == "/") and len(prefix) > len(
                    best):
                best, app = prefix, candidate
        if app is None:
            if scope["type"] == "http":
                await send_problem(send, 404, "Not Found", f"nothing is served at {path}")
            return
        await app(scope, receive, send)


class HttpHub:
    """Implements :class:`gateway.contract.HttpMount`."""

    def __init__(self, log: logging.Logger, limits: Mapping[str, HttpListenerSettings] | None = None, *,
                 reuse_port: bool = False):
        self.log = log
        #: Bind with ``SO_REUSEPORT``: the gateway's worker processes share each port, and the
        #: kernel spreads new connections between them (``gateway.workers``).
        self.reuse_port = reuse_port
        self._listeners: dict[str, _Listener] = {}
        #: Bounds per listen address (``gateway.http``), keyed by (host, port) so that
        #: ``":8080"`` and ``"0.0.0.0:8080"`` name one listener.
        self._limits = {parse_listen(address): settings for address, settings in (limits or {}).items()}

    def limits(self, listen: str) -> HttpListenerSettings:
        """The bounds of ``listen``: its ``gateway.http`` entry, or the defaults."""
        return self._limits.get(parse_listen(listen)) or HttpListenerSettings()

    def mount(self, listen: str, prefix: str, app: Any, *, owner: str) -> None:
        lst = self._listeners.setdefault(listen, _Listener(listen))
        prefix = "/" + prefix.strip("/") if prefix.strip("/") else "/"
        existing = lst.mounts.get(prefix)
        if existing and existing[0] != owner:
            raise ValueError(f"{listen}{prefix} is already served by {existing[0]!r}")
        lst.mounts[prefix] = (owner, app)

    def unmount(self, listen: str, prefix: str) -> None:
        lst = self._listeners.get(listen)
        if lst:
            lst.mounts.pop("/" + prefix.strip("/") if prefix.strip("/") else "/", None)

    def _reserve_descriptors(self) -> None:
        """Raise the process's soft open-file limit towards the hard one so that every listener's
        ``max_connections`` fits beside the spool, logs and outbound connections (the common soft
        default, 1024, would otherwise run out first: accept() fails for every listener alike)."""
        needed = sum(self.limits(listen).max_connections for listen in self._listeners) + FD_RESERVE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            if soft < needed:
                event(self.log, "http.fd_limit_low", logging.WARNING, open_files=soft, needed=needed,
                      hint="raise the open-file limit (ulimit -n) or lower gateway.http max_connections")

    def serving(self) -> bool:
        """Whether every listen address that has mounts accepts connections: readiness waits for
        it, or ``/readyz`` (on the admin address, started first) would answer before the data
        plane's port is bound."""
        return all(lst.server is not None and lst.server.started for lst in self._listeners.values() if lst.mounts)

    async def start(self) -> None:
        """Start a server for every listen address that has mounts and none yet."""
        self._reserve_descriptors()
        for lst in self._listeners.values():
            if lst.task is None and lst.mounts:
                await self._start(lst)
        served = {parse_listen(listen) for listen in self._listeners}
        for host, port in self._limits.keys() - served:
            event(self.log, "http.limits_unused", logging.WARNING, listen=f"{host}:{port}",
                  hint="gateway.http names an address no connector or the admin API listens on")

    async def _start(self, lst: _Listener) -> None:
        host, port = parse_listen(lst.listen)
        tls: RenewingTls | None = None
        if (files := self.limits(lst.listen).tls) is not None:
            try:
                tls = RenewingTls(files.cert, files.key, log=self.log, name=lst.listen)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"cannot serve TLS on {lst.listen}: {exc}") from None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {lst.listen}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        limits = self.limits(lst.listen)
        # proxy_headers off: the peer is the TCP peer (an X-Forwarded-For from a local process is
        # not trusted), and one ASGI layer less per request (measured: 5 % of a REST → MQTT request).
        config = _GuardedConfig(
            lst, http=_GuardedProtocol, ws="none", lifespan="off", log_config=None, access_log=False,
            server_header=False, proxy_headers=False, timeout_keep_alive=math.ceil(limits.idle_timeout),
            timeout_graceful_shutdown=5,
            ssl_context_factory=None if tls is None else lambda _config, _default: tls.context,
        )
        config.guard = lst.guard = _Guard(lst.listen, limits, self.log)
        server = _Server(config)
        lst.server, lst.sock = server, sock
        lst.task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{lst.listen}")
        for _ in range(200):
            if server.started or lst.task.done():
                break
            await asyncio.sleep(0.01)
        if lst.task.done():
            failure = lst.task.exception()
            raise OSError(f"HTTP server on {lst.listen} did not start: {failure}")
        lst.guard.start()
        event(self.log, "http.listening", listen=lst.listen, mounts=",".join(sorted(lst.mounts)),
              tls=tls is not None)

    async def stop(self) -> None:
        for lst in self._listeners.values():
            if lst.server is not None:
                lst.server.should_exit = True
            if lst.guard is not None:
                lst.guard.stop()
        for lst in self._listeners.values():
            if lst.task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(lst.task, timeout=10)
                lst.task = None
                lst.server = None
            if lst.sock is not None:
                lst.sock.close()
                lst.sock = None
