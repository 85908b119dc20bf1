"""rest — HTTP in (a lean ASGI app on the shared data-plane listener) and HTTP out (aiohttp).

Inbound
  Address: ``listen: "0.0.0.0:8080"`` plus ``endpoints`` (path globs and methods). The envelope
  subject is the request path; attributes carry method, query, peer; ``x-*`` and ``ce-*``
  request headers become envelope headers (never ``authorization`` or cookies). JSON, text and
  binary bodies pass as they came; CloudEvents in binary (``ce-*`` headers) and structured
  (``application/cloudevents+json``) mode become envelopes with the event's id.
  Answers: ``202`` + ``{"id": …}`` once delivered or spooled; the reply of a request/reply route
  with its status; ``400``/``401``/``403``/``404``/``405``/``408``/``413``/``415``/``422`` as
  problem+json; ``503`` + ``Retry-After`` when the gateway cannot take responsibility now;
  ``502``/``504`` for a request/reply target's failure or timeout. Auth per connector:
  ``bearer`` tokens or an ``api_key`` header (secrets by reference), or an explicit ``none``.
  ``GET <prefix>/openapi.json`` describes the configured endpoints.
  The hot path does not go through FastAPI or pydantic: measured, the framework is the limit.

Outbound
  Address: ``base_url`` in the connector (the host is fixed in config; a route may template only
  the path and query). 2xx = delivered (the body is the reply); 408, 429, 5xx, timeouts and
  connection errors = transient; other 4xx = permanent. ``Idempotency-Key: <envelope id>`` is
  sent so receivers can deduplicate retries.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import aiohttp
from pydantic import Field, field_validator

from gateway.sdk import (
    ByteSize,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deadlines,
    Deliver,
    Duration,
    Envelope,
    Health,
    InFlight,
    Outcome,
    PermanentError,
    Receive,
    Reply,
    Scope,
    Secret,
    Send,
    Status,
    Strict,
    SubstitutionCheck,
    Target,
    TargetOptions,
    TransientError,
    basic_authorization,
    current_secret,
    event,
    from_cloudevent,
    media_type,
    send_problem,
)

_HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
_DROP_HEADERS = {"authorization", "cookie", "x-api-key", "proxy-authorization"}


class Endpoint(Strict):
    path: str = "/**"
    methods: list[str] = Field(default_factory=lambda: ["POST"])
    #: Media types accepted (``application/json``, ``text/*``); omitted: any. Others get 415.
    content_types: list[str] | None = None

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        up = [m.upper() for m in v]
        bad = [m for m in up if m not in _HTTP_METHODS]
        if bad:
            raise ValueError(f"unsupported method(s) {bad}; use {sorted(_HTTP_METHODS)}")
        return up


class InboundAuth(Strict):
    #: ``none`` must be chosen explicitly; the default config listens on loopback only.
    type: Literal["none", "bearer", "api_key"]
    tokens: list[Secret] = Field(default_factory=list)
    header: str = "x-api-key"


class OutboundAuth(Strict):
    type: Literal["bearer", "basic"]
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None


class RestConfig(ConnectorConfig):
    type: Literal["rest"] = "rest"
    # inbound
    listen: str | None = None
    prefix: str = "/"
    endpoints: list[Endpoint] = Field(default_factory=lambda: [Endpoint()])
    auth: InboundAuth | None = None
    max_body: ByteSize = 1024 * 1024
    read_timeout: Duration = 10.0
    # outbound
    base_url: str | None = None
    timeout: Duration = 10.0
    max_connections: int = 100
    outbound_auth: OutboundAuth | None = None
    verify_tls: bool = True
    ca_file: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        return v.rstrip("/")

    def model_post_init(self, _: Any) -> None:
        if self.listen is not None and self.auth is None:
            raise ValueError("an inbound REST connector needs 'auth' (type: bearer, api_key, or an explicit none)")
        if self.auth and self.auth.type in ("bearer", "api_key"):
            if not self.auth.tokens:
                raise ValueError("auth needs at least one token (tokens: [\"${API_TOKEN}\"])")
            if any(len(t.get_secret_value().strip()) < 8 for t in self.auth.tokens):
                raise ValueError("an auth token is empty or shorter than 8 characters (is its variable set?)")


class RestTarget(TargetOptions):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    #: Appended to base_url; may be templated. Values are percent-encoded per segment.
    path: str = "/"
    query: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)

    # A value from a message is one path segment, never a new segment, query or host. Query
    # values are percent-encoded when the URL is built; a route's ``headers`` are the core's
    # (checked for CR, LF and NUL as rendered).
    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        "path": SubstitutionCheck(each=lambda v: quote(str(v), safe="")),
    }


class RestConnector(Connector):
    kind = "rest"
    Config = RestConfig
    Options = RestTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, RestConfig)
        self.cfg = config
        self._deliver: Deliver | None = None
        self._session: aiohttp.ClientSession | None = None
        self._accepting = False
        self._inflight = InFlight()
        self._deadlines = Deadlines()
        self._endpoints = [(re.compile(_glob_to_regex(e.path)), set(e.methods), e.content_types)
                           for e in config.endpoints]
        self._tokens = [t.get_secret_value().strip().encode() for t in (config.auth.tokens if config.auth else [])]
        # Credentials never travel on in the envelope, whatever header carries them.
        self._secret_headers = _DROP_HEADERS | ({config.auth.header.lower()} if config.auth else set())

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        if self.cfg.base_url and self._session is None:
            ssl: Any = None
            if not self.cfg.verify_tls:
                ssl = False
            elif self.cfg.ca_file:
                import ssl as ssl_mod

                ssl = ssl_mod.create_default_context(cafile=self.cfg.ca_file)
            connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ssl=ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout), auto_decompress=True)

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

    async def close(self) -> None:
        if self.cfg.listen is not None:
            self.ctx.http.unmount(self.cfg.listen, self.cfg.prefix)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def health(self) -> Health:
        return Health(True)

    # --- inbound (ASGI) ----------------------------------------------------------------

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
        headers = _headers(scope["headers"])
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
                body = await _read_body(receive, self.cfg.max_body)
        except _TooLarge:
            await self._refuse(send, scope, 413, "Content Too Large", f"the body limit is {self.cfg.max_body} bytes")
            return
        except TimeoutError:
            await self._refuse(send, scope, 408, "Request Timeout", f"the body did not arrive within "
                               f"{self.cfg.read_timeout:g}s")
            return
        except _Disconnected:
            return  # nothing delivered, nothing acknowledged
        try:
            env = self._envelope(scope, headers, body)
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

    def _envelope(self, scope: Scope, headers: dict[str, str], body: bytes) -> Envelope:
        content_type = headers.get("content-type", "application/octet-stream")
        query = scope.get("query_string", b"").decode("latin-1")
        client = scope.get("client")
        attributes: dict[str, Any] = {
            "http_method": scope["method"], "query": dict(parse_qsl(query)) if query else {},
            "peer": f"{client[0]}:{client[1]}" if client else "",
        }
        idem = headers.get("idempotency-key")
        if idem:
            if len(idem) > 200:
                raise ValueError("Idempotency-Key is longer than 200 characters")
            attributes["idempotency_key"] = idem
        kept = {k: v for k, v in headers.items() if (k.startswith("x-") or k.startswith("ce-"))
                and k not in self._secret_headers}
        mt = media_type(content_type)
        if mt == "application/cloudevents+json":
            try:
                event_obj = json.loads(body)
            except ValueError:
                raise ValueError("the structured CloudEvent is not valid JSON") from None
            if not isinstance(event_obj, dict):
                raise ValueError("a structured CloudEvent must be a JSON object")
            ce = from_cloudevent(event_obj, source=self.name, protocol="rest")
            return ce.evolve(subject=ce.subject or scope["path"], attributes={**ce.attributes, **attributes},
                             headers={**kept, **ce.headers})
        if "ce-specversion" in headers:
            missing = [h for h in ("ce-id", "ce-source", "ce-type") if not headers.get(h)]
            if missing:
                raise ValueError(f"binary-mode CloudEvent is missing {', '.join(missing)}")
            attributes.update(ce_source=headers["ce-source"], ce_type=headers["ce-type"])
            return Envelope(id=headers["ce-id"][:200], source=self.name, protocol="rest",
                            subject=headers.get("ce-subject") or scope["path"], body=body,
                            content_type=content_type, headers=kept, attributes=attributes)
        return Envelope(source=self.name, protocol="rest", subject=scope["path"], body=body,
                        content_type=content_type, headers=kept, attributes=attributes)

    async def _answer(self, send: Send, env: Envelope, outcome: Outcome) -> None:
        st = outcome.status
        # A repeated Idempotency-Key is answered with the first message's id.
        env_id = outcome.envelope_id or env.id
        if st is Status.ACCEPTED and outcome.reply is not None:
            r = outcome.reply
            await _respond(send, r.status if 200 <= r.status < 300 else 200, r.body, r.content_type.encode(),
                           [(b"x-envelope-id", env_id.encode())])
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
            await _respond(send, 202, body, b"application/json", [(b"x-envelope-id", env_id.encode())])
        else:
            code, kind, message = client_failure(outcome)
            extra: dict[str, Any] = {"envelope_id": env.id}
            upstream = _upstream(outcome.detail or {})
            if upstream:
                extra["upstream"] = upstream
            errors = _field_errors(outcome.detail or {})
            if errors:
                extra["errors"] = errors
            headers = [(b"x-envelope-id", env.id.encode())]
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
                    "responses": {
                        "202": {"description": "Accepted: delivered or durably spooled",
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

    # --- outbound ----------------------------------------------------------------------

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        if not self.cfg.base_url:
            raise PermanentError(f"connector {self.name!r} has no base_url to send to")
        if self._session is None:
            await self.open()
        assert self._session is not None
        opts = target.options
        assert isinstance(opts, RestTarget)
        url = self.cfg.base_url + _safe_path(opts.path)
        if opts.query:
            url += "?" + urlencode(opts.query)
        headers = {k: v for k, v in env.headers.items() if k.lower().startswith(("x-", "ce-"))}
        headers.update(opts.headers)
        headers["Idempotency-Key"] = env.id
        headers.setdefault("Content-Type", env.content_type)
        oa = self.cfg.outbound_auth
        if oa is not None:
            # read per request: a token renewed in its file is used from the next request on
            if oa.type == "bearer" and oa.token is not None:
                headers["Authorization"] = f"Bearer {current_secret(oa.token)}"
            elif oa.type == "basic":  # not aiohttp's BasicAuth: deprecated
                headers["Authorization"] = basic_authorization(oa.username or "", current_secret(oa.password) or "")
        body = env.body if opts.method != "GET" else None
        try:
            async with self._session.request(opts.method, url, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                data = await resp.content.read(16 * 1024 * 1024 + 1)
                status = resp.status
                ctype = resp.headers.get("content-type", "application/octet-stream")
        except TimeoutError as exc:
            raise TransientError(f"{opts.method} {_redact(url)}: timed out", code=504,
                                 detail={"message": "the upstream service did not answer in time"}) from exc
        except aiohttp.ClientError as exc:
            raise TransientError(f"{opts.method} {_redact(url)}: {type(exc).__name__}: {exc}", code=503,
                                 detail={"message": "the upstream service cannot be reached"}) from exc
        if len(data) > 16 * 1024 * 1024:
            raise PermanentError(f"{opts.method} {_redact(url)}: reply larger than 16 MiB")
        if 200 <= status < 300:
            return Reply(body=data, content_type=ctype, status=status)
        snippet = data[:300].decode("utf-8", errors="replace")
        detail = {"status": status, "body": snippet, "message": f"the upstream service answered HTTP {status}"}
        if status in (408, 429) or status >= 500:
            raise TransientError(f"{opts.method} {_redact(url)}: HTTP {status}", detail=detail,
                                 code=502 if status >= 500 else 503)
        raise PermanentError(f"{opts.method} {_redact(url)}: HTTP {status}", detail=detail, code=status)


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


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _Disconnected
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not msg.get("more_body"):
            return b"".join(chunks)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in raw:
        key = k.decode("latin-1").lower()
        val = v.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
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


def _safe_path(path: str) -> str:
    """Percent-encode each segment of a rendered path so a value cannot add a host or a query."""
    if not path.startswith("/"):
        path = "/" + path
    segments = path.split("/")
    if any(s in ("..", ".") for s in segments):
        raise PermanentError(f"rendered path {path!r} contains '.' or '..' segments")
    return "/".join(quote(s, safe="@:!$&'()*+,;=-._~%") for s in segments)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
