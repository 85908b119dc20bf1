"""The REST connector's inbound side: the ASGI app on the shared data-plane listener.

:class:`RestInbound` mounts itself under ``prefix`` on ``listen`` while listening, checks each
request (endpoint, method, content type, credentials, body size and read time) before it becomes
an envelope, hands the envelope to the router and answers the outcome (``202`` + id, a
request/reply route's reply, or problem+json), and serves ``<prefix>/openapi.json``. What a
caller is told is described in :mod:`connectors.rest`.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from connectors.rest.config import RestConfig
from connectors.rest.mapping import http_headers, to_envelope
from gateway.sdk import (
    BodyTooLarge,
    ClientDisconnected,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deadlines,
    Deliver,
    Envelope,
    InFlight,
    Outcome,
    PermanentError,
    Receive,
    Scope,
    Send,
    Status,
    event,
    media_type,
    read_body,
    send_problem,
    structured_event,
    tracecontext,
)

__all__ = ["RestInbound", "client_failure", "trace_header"]

_DROP_HEADERS = {"authorization", "cookie", "x-api-key", "proxy-authorization"}


class RestInbound(Connector):
    """Requests received, checked, delivered and answered."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, RestConfig)
        self.cfg = config
        self._deliver: Deliver | None = None
        self._accepting = False
        self._inflight = InFlight()
        self._deadlines = Deadlines()
        self._endpoints = [(re.compile(_glob_to_regex(e.path)), set(e.methods), e.content_types)
                           for e in config.endpoints]
        self._tokens = [t.get_secret_value().strip().encode() for t in (config.auth.tokens if config.auth else [])]
        # Credentials never travel on in the envelope, whatever header carries them.
        self._secret_headers = _DROP_HEADERS | ({config.auth.header.lower()} if config.auth else set())

    async def listen(self, deliver: Deliver) -> None:
        if self.cfg.listen is None:
            raise PermanentError(f"connector {self.name!r} is used as a source but has no 'listen' address")
        self._deliver = deliver
        self._accepting = True
        if self.cfg.auth is not None and self.cfg.auth.type == "none":
            host = self.cfg.listen.rpartition(":")[0].strip("[]")
            if host not in ("127.0.0.1", "::1", "localhost"):
                event(self.log, "rest.unauthenticated", logging.WARNING, connector=self.name,
                      listen=self.cfg.listen, hint="set auth: {type: bearer, tokens: [\"${API_TOKEN}\"]}")
        self.ctx.http.mount(self.cfg.listen, self.cfg.prefix, self, owner=self.name)

    async def stop_listening(self, drain: float) -> None:
        self._accepting = False
        await self._inflight.drained(drain)

    def _unmount(self) -> None:
        if self.cfg.listen is not None:
            self.ctx.http.unmount(self.cfg.listen, self.cfg.prefix)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if method == "GET" and path.rstrip("/").endswith("/openapi.json"):
            body = json.dumps(self.openapi()).encode()
            await _respond(send, 200, body, b"application/json")
            return
        if not self._accepting or self._deliver is None:
            await self._refuse(send, scope, 503, "Service Unavailable", "the gateway is not accepting messages",
                               [(b"retry-after", b"5")])
            return
        matching = [(methods, types) for rx, methods, types in self._endpoints if rx.match(path)]
        if not matching:
            await self._refuse(send, scope, 404, "Not Found", f"no endpoint is configured for {path}")
            return
        accepting = [types for methods, types in matching if method in methods]
        if not accepting:
            allow = ", ".join(sorted(set().union(*(m for m, _ in matching)))).encode()
            await self._refuse(send, scope, 405, "Method Not Allowed", f"{method} is not accepted on {path}",
                               [(b"allow", allow)])
            return
        headers = http_headers(scope["headers"])
        if all(types is not None for types in accepting):
            mt = media_type(headers.get("content-type", ""))
            if not any(fnmatch.fnmatch(mt, t) for types in accepting for t in types or []):
                wanted = ", ".join(sorted({t for types in accepting for t in types or []}))
                await self._refuse(send, scope, 415, "Unsupported Media Type",
                                   f"{mt or 'no content type'} is not accepted on {path}; send {wanted}")
                return
        denied = self._check_auth(headers)
        if denied:
            await self._refuse(send, scope, denied[0], denied[1], denied[2], [(b"www-authenticate", b"Bearer")]
                               if denied[0] == 401 else None)
            return
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.cfg.max_body):
            status, title = (413, "Content Too Large") if declared.isdigit() else (400, "Bad Request")
            await self._refuse(send, scope, status, title, f"the body limit is {self.cfg.max_body} bytes")
            return
        try:
            with self._deadlines.after(self.cfg.read_timeout):
                body = await read_body(receive, self.cfg.max_body)
        except BodyTooLarge:
            await self._refuse(send, scope, 413, "Content Too Large", f"the body limit is {self.cfg.max_body} bytes")
            return
        except TimeoutError:
            await self._refuse(send, scope, 408, "Request Timeout", f"the body did not arrive within "
                               f"{self.cfg.read_timeout:g}s")
            return
        except ClientDisconnected:
            return  # nothing delivered, nothing acknowledged
        try:
            document = await structured_event(body, headers.get("content-type", ""))
            env = to_envelope(scope, headers, body, source=self.name, secret_headers=self._secret_headers,
                              event=document)
        except ValueError as exc:
            await self._refuse(send, scope, 400, "Bad Request", str(exc)[:300])
            return
        with self._inflight:
            outcome = await self._deliver(env)
        await self._answer(send, env, outcome)

    async def _refuse(self, send: Send, scope: Scope, status: int, title: str, detail: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """A request refused before it became a message: the answer's id is in the log line."""
        error_id = await send_problem(send, status, title, detail, headers)
        client = scope.get("client")
        event(self.log, "rest.refused", logging.INFO, error_id=error_id, connector=self.name, status=status,
              reason=detail, method=scope.get("method"), path=scope.get("path"),
              peer=f"{client[0]}:{client[1]}" if client else "")

    def _check_auth(self, headers: dict[str, str]) -> tuple[int, str, str] | None:
        auth = self.cfg.auth
        if auth is None or auth.type == "none":
            return None
        if auth.type == "bearer":
            scheme, _, presented = headers.get("authorization", "").partition(" ")
            presented = presented.strip()
            if scheme.lower() != "bearer" or not presented:
                return 401, "Unauthorized", "a bearer token is required"
        else:
            presented = headers.get(auth.header.lower(), "").strip()
            if not presented:
                return 401, "Unauthorized", f"the {auth.header} header is required"
        candidate = presented.encode()
        if any(hmac.compare_digest(candidate, t) for t in self._tokens):
            return None
        return 403, "Forbidden", "the credentials are not valid"

    async def _answer(self, send: Send, env: Envelope, outcome: Outcome) -> None:
        st = outcome.status
        # A repeated Idempotency-Key is answered with the first message's id.
        env_id = outcome.envelope_id or env.id
        trace = trace_header(outcome)
        if st is Status.ACCEPTED and outcome.reply is not None:
            r = outcome.reply
            await _respond(send, r.status if 200 <= r.status < 300 else 200, r.body, r.content_type.encode(),
                           [(b"x-envelope-id", env_id.encode()), *trace])
        elif outcome.acknowledge:
            # The outcome's reason may name routes, connectors and hosts: the log line with this
            # id has it; the caller learns only what happened to its message.
            reason = _unparsed_body(outcome.reason) or _ACKNOWLEDGED.get(st, "")
            if st is Status.ACCEPTED and outcome.reason.startswith("duplicate"):
                reason = _DUPLICATE
            if reason:
                body = json.dumps({"id": env_id, "status": st.value, "reason": reason}).encode()
            else:  # the common answer, built without a dict; the same bytes json.dumps gives
                body = f'{{"id": {json.dumps(env_id)}, "status": "{st.value}"}}'.encode()
            await _respond(send, 202, body, b"application/json", [(b"x-envelope-id", env_id.encode()), *trace])
        else:
            code, kind, message = client_failure(outcome)
            extra: dict[str, Any] = {"envelope_id": env.id}
            upstream = _upstream(outcome.detail or {})
            if upstream:
                extra["upstream"] = upstream
            errors = _field_errors(outcome.detail or {})
            if errors:
                extra["errors"] = errors
            headers = [(b"x-envelope-id", env.id.encode()), *trace]
            if st is Status.RETRY:
                headers.append((b"retry-after", str(int(max(1, outcome.retry_after or 5))).encode()))
            await send_problem(send, code, _TITLES.get(code, "Unprocessable Content"), message, headers, extra,
                               kind=kind, problem_id=env.id)

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, Any] = {}
        for e in self.cfg.endpoints:
            ops = {}
            for m in e.methods:
                ops[m.lower()] = {
                    "summary": f"Send a message to the gateway ({self.name})",
                    "description": "Any body is accepted as is: JSON, text, binary, or a CloudEvent "
                                   "(binary mode with ce-* headers, or application/cloudevents+json). "
                                   f"Path pattern: {e.path}",
                    "requestBody": {"content": {"*/*": {"schema": {}}}},
                    "parameters": [{"name": "traceparent", "in": "header", "required": False,
                                    "description": "W3C Trace Context: the message continues this trace",
                                    "schema": {"type": "string"}}],
                    "responses": {
                        "202": {"description": "Accepted: delivered or durably spooled",
                                "headers": {"traceparent": {
                                    "description": "W3C Trace Context of the gateway's own hop for the message",
                                    "schema": {"type": "string"}}},
                                "content": {"application/json": {"schema": {
                                    "type": "object", "properties": {"id": {"type": "string"},
                                                                     "status": {"type": "string"}}}}}},
                        "200": {"description": "The reply of a request/reply route"},
                        **{str(c): {"description": _TITLES[c], "content": {"application/problem+json": {}}}
                           for c in (400, 401, 403, 404, 405, 408, 413, 422, 502, 503, 504)},
                    },
                }
            paths[_openapi_path(e.path)] = ops
        doc: dict[str, Any] = {"openapi": "3.1.0", "info": {"title": f"gateway: {self.name}", "version": "1"},
                               "paths": paths}
        if self.cfg.auth and self.cfg.auth.type != "none":
            scheme = ({"type": "http", "scheme": "bearer"} if self.cfg.auth.type == "bearer"
                      else {"type": "apiKey", "in": "header", "name": self.cfg.auth.header})
            doc["components"] = {"securitySchemes": {"auth": scheme}}
            doc["security"] = [{"auth": []}]
        return doc

_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


_ACKNOWLEDGED = {Status.DEAD_LETTERED: "the gateway kept the message as a dead letter for its operators",
                 Status.DROPPED: "the gateway's configuration drops this message"}
_DUPLICATE = "duplicate: answered from the Idempotency-Key record"
#: (status, problem kind, what the client is told) for a failure that has no client-facing
#: message of its own.
_RETRY_ANSWERS = {
    502: ("upstream-failed", "the service behind the gateway failed; retry later"),
    503: ("unavailable", "the gateway cannot take the message now; retry later"),
    504: ("upstream-timeout", "the service behind the gateway did not answer in time; retry later"),
}
_REJECT_ANSWERS = {
    404: ("no-route", "nothing here takes this message"),
    413: ("too-large", "the message is too large"),
    422: ("unprocessable", "the message cannot be delivered as sent: a value it needs is missing or not allowed"),
    502: ("upstream-failed", "the service behind the gateway failed"),
}


def trace_header(outcome: Outcome) -> list[tuple[bytes, bytes]]:
    """The ``traceparent`` answer header: the context of the gateway's own hop for the message,
    so a caller can follow it. Parsed and written again first: only a valid context, in its
    canonical form, ever reaches a response header."""
    ctx = tracecontext.parse(outcome.traceparent)
    return [(b"traceparent", ctx.traceparent.encode("ascii"))] if ctx is not None else []


def client_failure(outcome: Outcome) -> tuple[int, str, str]:
    """(HTTP status, problem kind, message) a caller is told about a RETRY or REJECTED outcome.

    Never the outcome's reason (it names routes, connectors, hosts and exceptions; the log line
    with the envelope id has it): a fixed text per status, or the client-facing ``message``
    an outbound connector put in its error's detail (``the upstream service answered HTTP 404``).
    """
    detail = outcome.detail or {}
    said = detail.get("message") if isinstance(detail.get("message"), str) else None
    upstream = isinstance(detail.get("status"), int) or "faultstring" in detail
    if outcome.status is Status.RETRY:
        code = outcome.code if outcome.code in _RETRY_ANSWERS else 503
        kind, text = _RETRY_ANSWERS[code]
        if code == 503 and (said or upstream):
            kind = "upstream-unavailable"
        return code, kind, said or text
    code = outcome.code if outcome.code and 400 <= outcome.code < 600 else 422
    if upstream:
        kind, text = ("upstream-failed", "the service behind the gateway failed") if code >= 500 else (
            "upstream-refused", "the service behind the gateway refused the request")
    else:
        kind, text = _REJECT_ANSWERS.get(code, ("refused", "the request was refused"))
        text = _unparsed_body(outcome.reason) or text
    return code, kind, said or text


def _unparsed_body(reason: str) -> str | None:
    """The parser's own words when the caller's body did not parse (``invalid JSON: …``): they
    are about the caller's input, and the one thing in a routing reason it can fix. The router
    words that reason ``route '<name>' needs the parsed body: <parser's words>``."""
    _, found, said = reason.partition(" needs the parsed body: ")
    return f"the body cannot be parsed: {said[:300]}" if found and said else None


def _field_errors(detail: Mapping[str, Any]) -> list[str]:
    """A target's schema check of the message (``/a: expected an integer``, from a SOAP
    operation's XSD): each names a JSON path of the payload and what the published contract wants
    there, which is what a caller fixes; at most 20, each cut at 300 characters."""
    errors = detail.get("errors")
    if not isinstance(errors, list):
        return []
    out = []
    for error in errors[:20]:
        text = f"{error.get('path') or '/'}: {error.get('message', '')}" if isinstance(error, dict) else error
        if isinstance(text, str):
            out.append(text[:300])
    return out


def _upstream(detail: Mapping[str, Any]) -> dict[str, Any]:
    """What the service behind a request/reply route told its callers: its status and its own
    message (a SOAP faultstring, a problem+json ``detail``/``title``), a SOAP fault's code and
    typed detail; never its raw body."""
    out: dict[str, Any] = {}
    if isinstance(detail.get("status"), int):
        out["status"] = detail["status"]
    said = detail.get("faultstring")
    body = detail.get("body")
    if not said and isinstance(body, str) and body.lstrip().startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            said = next((doc[k] for k in ("detail", "title", "message", "error")
                         if isinstance(doc.get(k), str) and doc[k]), None)
    if isinstance(said, str) and said:
        out["message"] = said[:500]
    # A SOAP fault is the backend's own answer to its caller: its code and typed detail too.
    if isinstance(detail.get("faultcode"), str):
        out["faultcode"] = detail["faultcode"]
    if "faultstring" in detail and detail.get("detail") is not None:
        out["detail"] = detail["detail"]
    return out


async def _respond(send: Send, status: int, body: bytes, content_type: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _glob_to_regex(pattern: str) -> str:
    parts = pattern.split("/")
    out = []
    for p in parts:
        if p == "**":
            out.append(".*")
        else:
            out.append(fnmatch.translate(p).removeprefix("(?s:").removesuffix(")\\Z").replace(".*", "[^/]*"))
    return "^" + "/".join(out).replace("/.*", "(/.*)?") + "$"


def _openapi_path(pattern: str) -> str:
    n = 0
    parts = []
    for p in pattern.split("/"):
        if "*" in p or "?" in p:
            n += 1
            parts.append("{" + ("rest" if p == "**" else f"p{n}") + "}")
        else:
            parts.append(p)
    return "/".join(parts) or "/"

