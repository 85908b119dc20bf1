"""Small ASGI helpers shared by the SOAP service and the REST façade (no framework on the hot path)."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
from collections.abc import Iterable
from typing import Any

from connectors.soap.config import InboundAuth, Listener
from gateway.sdk import Outcome, Receive, Scope, Send, tracecontext
from gateway.sdk import read_body as sdk_read_body

_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
#: Request headers that never become envelope headers.
_SECRET_HEADERS = {"authorization", "cookie", "proxy-authorization", "x-api-key"}


async def read_body(receive: Receive, limit: int, within: float) -> bytes:
    """The whole body (:func:`gateway.sdk.read_body`), or ``TimeoutError`` after ``within`` seconds."""
    return await asyncio.wait_for(sdk_read_body(receive, limit), timeout=within)


def headers_of(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    raw: Iterable[tuple[bytes, bytes]] = scope.get("headers") or []
    for k, v in raw:
        key = k.decode("latin-1").lower()
        val = v.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


def forwarded_headers(headers: dict[str, str]) -> dict[str, str]:
    """``x-*`` and ``ce-*`` request headers, as the REST inbound keeps them."""
    return {k: v for k, v in headers.items() if k.startswith(("x-", "ce-")) and k not in _SECRET_HEADERS}


def trace_header(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    """The ``traceparent`` answer header (the context of the gateway's own hop for the message),
    parsed and written again so only a valid context in canonical form reaches a header."""
    ctx = tracecontext.parse(outcome.traceparent)
    return [(b"traceparent", ctx.traceparent.encode("ascii"))] if ctx is not None else []


async def respond(send: Send, status: int, body: bytes, content_type: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def problem(send: Send, status: int, title: str, detail: str, *, headers: list[tuple[bytes, bytes]] | None = None,
                  **extra: Any) -> None:
    """An RFC 9457 problem+json answer; ``extra`` adds members (errors, fault, envelope_id)."""
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    doc.update({k: v for k, v in extra.items() if v is not None})
    await respond(send, status, json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8"),
                  "application/problem+json", headers)


class Authenticator:
    """Checks ``Authorization`` against the configured credentials in constant time."""

    def __init__(self, auth: InboundAuth):
        self.type = auth.type
        self._tokens = [t.get_secret_value().encode() for t in auth.tokens]
        self._users = {u.username: u.password.get_secret_value().encode() for u in auth.users}

    def challenge(self) -> list[tuple[bytes, bytes]]:
        if self.type == "basic":
            return [(b"www-authenticate", b'Basic realm="gateway", charset="UTF-8"')]
        if self.type == "bearer":
            return [(b"www-authenticate", b"Bearer")]
        return []

    def check(self, headers: dict[str, str]) -> tuple[int, str] | None:
        """None when allowed; else (401 or 403, reason)."""
        if self.type == "none":
            return None
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        presented = presented.strip()
        if self.type == "bearer":
            if scheme.lower() != "bearer" or not presented:
                return 401, "a bearer token is required"
            ok = False
            for token in self._tokens:
                ok |= hmac.compare_digest(presented.encode(), token)
            return None if ok else (403, "the credentials are not valid")
        if scheme.lower() != "basic" or not presented:
            return 401, "HTTP basic authentication is required"
        try:
            user, _, password = base64.b64decode(presented, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return 401, "malformed basic credentials"
        expected = self._users.get(user)
        # Compare even for an unknown user so timing does not reveal which users exist.
        ok = hmac.compare_digest(password.encode(), expected if expected is not None else b"\0" * 16)
        return None if ok and expected is not None else (403, "the credentials are not valid")


def public_base(listener: Listener, scope: Scope, headers: dict[str, str]) -> str:
    """The URL clients reach this face at: ``public_url`` if configured, else from Host."""
    if listener.public_url:
        return listener.public_url.rstrip("/")
    host = headers.get("host", "")
    if not _HOST.match(host) or len(host) > 255:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    scheme = scope.get("scheme", "http")
    return f"{scheme}://{host}{listener.prefix}"
