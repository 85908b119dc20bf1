"""Serve the spyne services over real HTTP on 127.0.0.1 (uvicorn in a thread of its own, so a
test's event loop and a blocking client can both talk to it)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from a2wsgi import WSGIMiddleware
from spyne.server.wsgi import WsgiApplication

from tests.legacy.services import calculator_app, orders_app

# spyne logs every Fault it sends (with a traceback) at ERROR: expected traffic in these tests.
logging.getLogger("spyne").setLevel(logging.CRITICAL)


class _Dispatch:
    """path prefix → ASGI app"""

    def __init__(self, mounts: dict[str, Any]):
        self.mounts = mounts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        for prefix, app in self.mounts.items():
            if scope["path"] == prefix or scope["path"].startswith(prefix + "/"):
                await app(scope, receive, send)
                return
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})


@dataclass
class Legacy:
    base: str

    @property
    def calculator11(self) -> str:
        return f"{self.base}/calculator/soap11"

    @property
    def calculator12(self) -> str:
        return f"{self.base}/calculator/soap12"

    @property
    def orders(self) -> str:
        return f"{self.base}/orders/soap"


def build_app() -> _Dispatch:
    def wsgi(app: Any) -> Any:
        return WSGIMiddleware(WsgiApplication(app), workers=8)

    return _Dispatch({
        "/calculator/soap11": wsgi(calculator_app("1.1")),
        "/calculator/soap12": wsgi(calculator_app("1.2")),
        "/orders/soap": wsgi(orders_app()),
    })


@contextlib.contextmanager
def legacy_service(port: int = 0, *, certfile: str | None = None, keyfile: str | None = None,
                   app: Any = None) -> Iterator[Legacy]:
    """Run the legacy services (or ``app``) until the block ends; HTTPS when given a cert."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app or build_app(), lifespan="off", log_level="warning", access_log=False,
                            ssl_certfile=certfile, ssl_keyfile=keyfile)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="legacy-soap")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the legacy SOAP service did not start")
        time.sleep(0.01)
    try:
        scheme = "https" if certfile else "http"
        yield Legacy(f"{scheme}://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class Capture:
    """An ASGI app that records each request and answers with a fixed response (wire checks)."""

    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = "text/xml; charset=utf-8"):
        self.status, self.body, self.content_type = status, body, content_type
        self.requests: list[tuple[str, dict[str, str], bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else ""),
                              headers, body))
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", self.content_type.encode()),
                                (b"content-length", str(len(self.body)).encode())]})
        await send({"type": "http.response.body", "body": self.body})
