"""Shared HTTP listeners for the data plane and the admin API.

Several connectors may serve one port (REST at ``/``, SOAP at ``/soap``): each mounts an ASGI
app under a path prefix on a listen address; the hub runs one uvicorn server per address and
dispatches by longest prefix. Sockets are bound by us, so a busy port is an error we report,
not a ``sys.exit`` inside uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from gateway.logs import event

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
                       extra: Mapping[str, Any] | None = None) -> None:
    """An RFC 9457 problem+json response; ``extra`` adds extension members."""
    problem = {"type": "about:blank", "title": title, "status": status, "detail": detail, **(extra or {})}
    body = json.dumps(problem, default=str, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/problem+json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


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

    def __init__(self, log: logging.Logger, *, limit_concurrency: int = 1000, keep_alive: float = 5.0):
        self.log = log
        self._listeners: dict[str, _Listener] = {}
        self.limit_concurrency = limit_concurrency
        self.keep_alive = keep_alive

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

    async def start(self) -> None:
        """Start a server for every listen address that has mounts and none yet."""
        for lst in self._listeners.values():
            if lst.task is None and lst.mounts:
                await self._start(lst)

    async def _start(self, lst: _Listener) -> None:
        host, port = parse_listen(lst.listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {lst.listen}: {exc.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        # proxy_headers off: the peer is the TCP peer (an X-Forwarded-For from a local process is
        # not trusted), and one ASGI layer less per request (measured: 5 % of a REST → MQTT request).
        config = uvicorn.Config(
            lst, lifespan="off", log_config=None, access_log=False, server_header=False, proxy_headers=False,
            limit_concurrency=self.limit_concurrency, timeout_keep_alive=int(self.keep_alive),
            h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=5,
        )
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
        event(self.log, "http.listening", listen=lst.listen, mounts=",".join(sorted(lst.mounts)))

    async def stop(self) -> None:
        for lst in self._listeners.values():
            if lst.server is not None:
                lst.server.should_exit = True
        for lst in self._listeners.values():
            if lst.task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(lst.task, timeout=10)
                lst.task = None
                lst.server = None
            if lst.sock is not None:
                lst.sock.close()
                lst.sock = None
