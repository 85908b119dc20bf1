"""Messages between worker processes: each is routed in the worker that owns its state.

Storm control (dedupe, throttle, digest, alarm: :mod:`gateway.routing.storm`) decides from state
it holds in memory and keeps in its store; two processes deciding from two copies would each let
a storm's first alert through, each count a throttle's limit, each send a digest. So one worker
decides them all: worker 0. Another worker that receives a message a storm-controlled route
selects sends it (the envelope, id and all) to worker 0's private admin listener, where it is
routed as if it had arrived there; worker 0's outcome is the answer to the sender, so a message is
acknowledged only once worker 0 has taken responsibility for it (spooled, folded into a digest,
suppressed). When worker 0 cannot be reached (restarting), the sender is asked to retry.

An ``Idempotency-Key`` is remembered in the spool of the worker that took the message; a retry
of it may come on another connection, to another worker. So a keyed message is routed by the
worker its (source, key) hashes to, whichever took it. Other messages never leave the worker
that received them.
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiohttp

from gateway.contract import Outcome, Reply, Status
from gateway.envelope import Envelope
from gateway.http import BodyTooLarge, ClientDisconnected, Receive, Scope, Send, read_body, send_problem
from gateway.workers import CLIENT_HEADER, FORWARD_PATH, SECRET_HEADER

#: A forwarded envelope comes from a sibling worker that already took it whole: bounded only so
#: that a bug cannot make worker 0 buffer without end.
_MAX_FORWARDED = 512 * 1024 * 1024
#: How long a forwarding worker waits for worker 0's outcome: longer than any direct send's
#: deadline there, shorter than the timeouts of the protocols that wait on it.
_TIMEOUT = 60.0


def outcome_to_json(outcome: Outcome) -> bytes:
    reply = outcome.reply
    return json.dumps({
        "status": outcome.status.value, "envelope_id": outcome.envelope_id, "reason": outcome.reason,
        "retry_after": outcome.retry_after, "code": outcome.code,
        "detail": dict(outcome.detail) if outcome.detail is not None else None,
        "reply": None if reply is None else {
            "body": base64.b64encode(reply.body).decode("ascii"), "content_type": reply.content_type,
            "headers": dict(reply.headers), "status": reply.status},
    }, default=str).encode()


def outcome_from_json(raw: Mapping[str, Any]) -> Outcome:
    r = raw.get("reply")
    reply = None if r is None else Reply(base64.b64decode(r["body"]), r["content_type"], r["headers"], r["status"])
    return Outcome(Status(raw["status"]), raw["envelope_id"], raw["reason"], reply, raw["retry_after"],
                   raw["code"], raw["detail"])


def receiver(deliver: Callable[[Envelope], Awaitable[Outcome]], secret: str) -> Callable[
        [Scope, Receive, Send], Awaitable[None]]:
    """The ASGI app every worker serves at :data:`~gateway.workers.FORWARD_PATH` on its private
    listener: routes a sibling's envelope with ``deliver`` (here, whatever its owner) and answers
    its outcome as JSON."""
    expected = secret.encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        given = dict(scope.get("headers") or []).get(SECRET_HEADER.encode(), b"")
        if scope["method"] != "POST" or not hmac.compare_digest(given, expected):
            await send_problem(send, 404, "Not Found", f"nothing is served at {scope.get('path', '')}")
            return
        try:
            env = Envelope.from_json(await read_body(receive, _MAX_FORWARDED))
        except (BodyTooLarge, ClientDisconnected, ValueError, KeyError) as exc:
            await send_problem(send, 400, "Bad Request", type(exc).__name__)
            return
        body = outcome_to_json(await deliver(env))
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class Forwarder:
    """A worker's way to its siblings: :meth:`__call__` is :attr:`Delivery.forward`."""

    def __init__(self, peers: Sequence[str], secret: str):
        self.urls = [f"http://{listen}{FORWARD_PATH}" for listen in peers]
        self.secret = secret
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, env: Envelope, worker: int) -> Outcome:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT))
        async with self._session.post(self.urls[worker], data=env.to_json().encode(), headers={
                SECRET_HEADER: self.secret, "content-type": "application/json"}) as resp:
            if resp.status != 200:
                raise ConnectionError(f"answered {resp.status}")
            return outcome_from_json(await resp.json())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def client_from_parent(app: ASGIApp, secret: str) -> ASGIApp:
    """``app`` (a worker's admin API) seeing the client the parent proxied for, not the parent.

    Every proxied request reaches the worker from 127.0.0.1; the admin API lets loopback clients
    in when no token is configured and counts failed logins per client address, so it must see
    the real one. The parent sends it in :data:`~gateway.workers.CLIENT_HEADER` beside the secret;
    a request without the right secret keeps its own address (a local process on the private
    port) and both headers are removed either way.
    """
    expected = secret.encode()
    names = {SECRET_HEADER.encode(), CLIENT_HEADER.encode()}

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers") or []
            ours = {k: v for k, v in headers if k in names}
            if ours:
                scope = {**scope, "headers": [(k, v) for k, v in headers if k not in names]}
                given = ours.get(SECRET_HEADER.encode(), b"")
                host, _, port = ours.get(CLIENT_HEADER.encode(), b"").decode("latin-1").rpartition(" ")
                if hmac.compare_digest(given, expected) and host and port.isdigit():
                    scope["client"] = (host, int(port))
        await app(scope, receive, send)

    return wrapped


class ParentMount:
    """The :class:`~gateway.contract.HttpMount` a worker mounts its admin API through: each app
    wrapped by :func:`client_from_parent`."""

    def __init__(self, http: Any, secret: str):
        self.http = http
        self.secret = secret

    def mount(self, listen: str, prefix: str, app: Any, *, owner: str) -> None:
        self.http.mount(listen, prefix, client_from_parent(app, self.secret), owner=owner)

    def unmount(self, listen: str, prefix: str) -> None:
        self.http.unmount(listen, prefix)
