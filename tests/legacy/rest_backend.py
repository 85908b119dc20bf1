"""A small REST service (the "new" side of SOAP → REST) over real HTTP on 127.0.0.1.

``POST /calc/<Operation>`` computes the calculator's operations from JSON and answers JSON
shaped like the WSDL's output element; ``POST /echo`` returns its body byte for byte. Failure hooks:
Add with a = 404 → 404 problem+json; a = 500 → 500; a = 7777 → answers after 3 s;
Multiply with a = 1 → a reply with an extra field and a wrong type for ``result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


async def _app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path = scope["path"]
    status, out, ctype = 200, None, "application/json"
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        data = None
    if path == "/echo":  # the bytes as they came: no JSON library in the way
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    if path.startswith("/calc/") and isinstance(data, dict):
        op = path.rsplit("/", 1)[1]
        a, b = data.get("a"), data.get("b")
        if op == "Add" and a == 404:
            status, ctype = 404, "application/problem+json"
            out = {"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no such account 404"}
        elif op == "Add" and a == 500:
            status, out = 500, {"error": "database down"}
        elif op == "Add" and a == 7777:
            await asyncio.sleep(3)
            out = {"result": a + b}
        elif op == "Add":
            out = {"result": a + b}
        elif op == "Subtract":
            out = {"result": a - b}
        elif op == "Multiply":
            out = {"result": "many", "unexpected": True} if a == 1 else {"result": a * b}
        elif op == "Sum":
            values = data.get("value", [])
            out = {"total": float(sum(values)), "count": len(values)}
        else:
            status, out = 404, {"title": "unknown operation"}
    else:
        status, out = 400, {"title": "bad request"}
    payload = json.dumps(out).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


@contextlib.contextmanager
def rest_backend() -> Iterator[str]:
    """Run the REST service until the block ends; yields its base URL."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app, lifespan="off", log_level="warning", access_log=False))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rest-backend")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the REST backend did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
