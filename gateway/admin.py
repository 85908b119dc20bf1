"""The admin listener: probes, metrics, the authenticated admin API and the web editor.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers). Everything under
``/api`` needs a bearer token from ``gateway.admin.tokens`` (stored as sha256 digests; role
``viewer`` reads, ``editor`` writes). With no tokens configured, ``/api`` answers only clients
on loopback, so a fresh install is never an open admin API.

``POST /api/login`` trades a token (plus a one-time code, RFC 6238 TOTP, for a token that has a
second factor) for a session token with a limited life; the web editor at ``/ui/`` uses only
that. An editor token with a second factor presented directly as a bearer token reads only
(viewer): writing needs the code. Every change is logged with the token's name.

Config endpoints (see the README, "Editing routing rules"): ``GET /api/config``, ``GET|PUT /api/routes`` (the PUT
carries ``If-Match: "<version>"``; an edit of a stale version answers ``409``),
``POST /api/routes/validate``, ``POST /api/routes/test`` (dry run, nothing sent),
``POST /api/reload``, ``GET /api/history``, ``GET /api/history/diff``,
``GET /api/history/{version}``, ``POST /api/history/{version}/rollback``, ``GET /api/schema``,
``GET /api/overview`` (routes and connectors with health and counters) and ``GET /api/live``
(the last messages per route).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from gateway.config.loader import LoadedConfig, load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.contract import Outcome
from gateway.envelope import Envelope
from gateway.history import unified_diff
from gateway.logs import event
from gateway.metrics import CONTENT_TYPE
from gateway.reload import ReloadFailed, ReloadRefused, merge_document, version_of

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_log = logging.getLogger("gateway.admin")

#: Largest config text or request body the config API reads.
MAX_CONFIG_BYTES = 1024 * 1024
#: Life of a session from POST /api/login.
SESSION_SECONDS = 8 * 3600
#: TOTP (RFC 6238) parameters: the common authenticator-app defaults.
TOTP_STEP, TOTP_DIGITS = 30, 6


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Principal:
    def __init__(self, name: str, role: str, via: str = "token"):
        self.name = name
        self.role = role
        #: How it was authenticated: token, session or loopback.
        self.via = via


# --- second factor ---------------------------------------------------------------------------


def totp_code(secret_b32: str, counter: int) -> str:
    """The RFC 6238 code (HMAC-SHA1, 6 digits) of a base32 secret for one time step."""
    key = base64.b32decode(secret_b32.replace(" ", "").upper() + "=" * (-len(secret_b32.replace(" ", "")) % 8))
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def _totp_secret(token: Any) -> str | None:
    """The token's TOTP secret, when the config gives it one (``totp: "${ADMIN_TOTP}"``)."""
    secret = getattr(token, "totp", None)
    if secret is None:
        return None
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
    return value or None


@dataclass
class _Session:
    name: str
    role: str
    expires: float


@dataclass
class AuthState:
    """Sessions from POST /api/login and the last TOTP step each token used (no replays)."""

    sessions: dict[str, _Session] = field(default_factory=dict)
    last_step: dict[str, int] = field(default_factory=dict)
    #: Recent failed logins per client address (at most 20 kept per client, 1,000 clients).
    failures: dict[str, collections.deque[float]] = field(default_factory=dict)

    def throttled(self, client: str) -> bool:
        q = self.failures.get(client)
        return q is not None and len(q) == q.maxlen and time.time() - q[0] < 60

    def failed(self, client: str) -> None:
        if client not in self.failures and len(self.failures) >= 1000:
            self.failures.pop(next(iter(self.failures)))
        self.failures.setdefault(client, collections.deque(maxlen=20)).append(time.time())

    def create(self, name: str, role: str) -> str:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.expires < now]:
            del self.sessions[key]
        token = "gws_" + secrets.token_urlsafe(32)
        self.sessions[hash_token(token)] = _Session(name, role, now + SESSION_SECONDS)
        return token

    def lookup(self, token: str) -> _Session | None:
        s = self.sessions.get(hash_token(token))
        if s is None or s.expires < time.time():
            return None
        return s

    def verify_totp(self, name: str, secret: str, code: str, now: float | None = None) -> bool:
        """Accept the code of this step or its neighbours, each step once."""
        if not (code.isdigit() and len(code) == TOTP_DIGITS):
            return False
        step = int((now if now is not None else time.time()) // TOTP_STEP)
        for candidate in (step - 1, step, step + 1):
            try:
                ok = hmac.compare_digest(totp_code(secret, candidate), code)
            except (ValueError, TypeError):
                return False
            if ok:
                if candidate <= self.last_step.get(name, -1):
                    return False
                self.last_step[name] = candidate
                return True
        return False


def _match_token(runtime: Runtime, presented: str) -> Any:
    digest = hash_token(presented.strip())
    found = None
    for t in runtime.config.model.gateway.admin.tokens:
        expected = t.sha256 or (hash_token(t.token.get_secret_value()) if t.token else "")
        if expected and hmac.compare_digest(expected.lower(), digest) and found is None:
            found = t
    return found


def make_auth(runtime: Runtime, state: AuthState | None = None) -> Any:
    auth_state = state or AuthState()

    def authenticate(request: Request) -> Principal:
        tokens = runtime.config.model.gateway.admin.tokens
        header = request.headers.get("authorization", "")
        if not tokens:
            if _is_loopback(request.client.host if request.client else None):
                return Principal("local", "editor", "loopback")
            raise HTTPException(403, "the admin API is open to loopback only until gateway.admin.tokens is set")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
        session = auth_state.lookup(presented.strip())
        if session is not None:
            # A session lives only while its token is still configured with that role.
            t = next((t for t in tokens if t.name == session.name), None)
            if t is not None:
                return Principal(session.name, session.role if t.role == "editor" else "viewer", "session")
        t = _match_token(runtime, presented)
        if t is not None:
            role = "viewer" if t.role == "editor" and _totp_secret(t) else t.role
            return Principal(t.name, role, "token")
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    return authenticate


def make_editor(auth: Any) -> Any:
    def editor(p: Principal = Depends(auth)) -> Principal:  # noqa: B008 - FastAPI's dependency idiom
        if p.role != "editor":
            hint = " (this token has a second factor: log in with POST /api/login and a one-time code)" \
                if p.via == "token" else ""
            raise HTTPException(403, f"token {p.name!r} has role {p.role!r}; this needs 'editor'{hint}")
        return p

    return editor


def build_admin(runtime: Runtime, live: LiveLog | None = None) -> FastAPI:
    app = FastAPI(title="gateway admin", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    auth_state = AuthState()
    auth = make_auth(runtime, auth_state)
    editor = make_editor(auth)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_seconds": round(time.time() - runtime.started_at, 1)}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, detail = runtime.readiness()
        return JSONResponse(detail, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        runtime.readiness()  # refresh gauges derived from health
        return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE)

    _config_api(app, runtime, auth, editor, auth_state, live or LiveLog())
    _editor_ui(app)

    @app.get("/api/connectors")
    async def connectors(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        out = {}
        for name, slot in runtime.slots.items():
            h = slot.health()
            out[name] = {"type": type(slot.connector).kind, "up": h.up, "detail": h.detail, "state": slot.state,
                         "inbound": slot.inbound, "circuit": runtime.delivery.circuit(name)}
        return {"connectors": out}

    @app.get("/api/dead-letters")
    async def dead_letters(
        _: Principal = Depends(auth),  # noqa: B008
        route: str | None = None, connector: str | None = None, reason: str | None = None,
        envelope_id: str | None = None, since: float | None = None, until: float | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        from gateway.delivery import deadletters as dl
        from gateway.delivery.store import DeadLetterFilter, SpoolError

        flt = DeadLetterFilter(route, connector, reason, envelope_id, since, until)
        try:
            items = await runtime.spool.dead_letters(flt, limit)
            total = await runtime.spool.count_dead_letters(flt)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot be read now: {exc}") from None
        return {"dead_letters": [dl.summary(d) for d in items], "total": total}

    @app.get("/api/dead-letters/{dl_id}")
    async def dead_letter(dl_id: int, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        item = await runtime.spool.dead_letter_by_id(dl_id)
        if item is None:
            raise HTTPException(404, f"no dead letter {dl_id}")
        return item.as_dict()

    @app.post("/api/dead-letters/replay")
    async def replay(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        """``{"ids": [...]}`` or ``{"filter": {route, connector, reason, envelope_id, since, until}}``
        or ``{"all": true}``; ``"connector"`` sends them to that connector instead of the original."""
        from gateway.delivery import deadletters as dl
        from gateway.delivery.store import SpoolError

        body = await _json(request)
        try:
            ids, flt = dl.selection_from(body, filter_at="filter")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        to = body.get("connector")
        if to is not None:
            slot = runtime.slots.get(to) if isinstance(to, str) else None
            if slot is None or not type(slot.connector).supports_outbound:
                raise HTTPException(422, f"connector {to!r} is not a configured outbound connector")
        try:
            targets = await runtime.spool.replay(ids, flt, connector=to)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot take the replay now: {exc}") from None
        await runtime.delivery.replayed(targets)
        event(runtime.log, "dead_letters.replayed", by=p.name, count=len(targets), to=to or "")
        return {"replayed": len(targets)}

    @app.post("/api/dead-letters/purge")
    async def purge(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        """``{"ids": [...]}``, a filter (route, connector, reason, envelope_id, since, until), or ``{"all": true}``."""
        from gateway.delivery import deadletters as dl
        from gateway.delivery.store import SpoolError

        body = await _json(request)
        try:
            ids, flt = dl.selection_from(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            n = await runtime.spool.purge(ids, flt)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot purge now: {exc}") from None
        event(runtime.log, "dead_letters.purged", by=p.name, count=n)
        return {"purged": n}

    return app


async def _json(request: Request, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    try:
        body = json.loads(await _read_body(request, limit) or b"{}")
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    return body


# --- the config API --------------------------------------------------------------------------


def _config_api(app: FastAPI, runtime: Runtime, auth: Any, editor: Any, auth_state: AuthState,
                live: LiveLog) -> None:
    reloader = runtime.reloader

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        body = await _json(request)
        token, otp = body.get("token"), body.get("otp")
        if not isinstance(token, str) or not token.strip():
            raise HTTPException(422, "body must be {\"token\": \"...\", \"otp\": \"123456\" (if required)}")
        client = request.client.host if request.client else ""
        if auth_state.throttled(client):
            raise HTTPException(429, "too many failed logins; wait a minute", headers={"Retry-After": "60"})
        t = _match_token(runtime, token)
        if t is None:
            auth_state.failed(client)
            await asyncio.sleep(0.2)
            event(_log, "admin.login_failed", logging.WARNING, client=client, reason="token")
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        secret = _totp_secret(t)
        if secret and t.role == "editor":
            if not isinstance(otp, str) or not otp:
                return JSONResponse({"detail": "this token needs a one-time code", "otp_required": True},
                                    status_code=401)
            if not auth_state.verify_totp(t.name, secret, otp.strip()):
                auth_state.failed(client)
                event(_log, "admin.login_failed", logging.WARNING, client=client, token=t.name, reason="otp")
                return JSONResponse({"detail": "the one-time code is wrong or was used already",
                                     "otp_required": True}, status_code=401)
        session = auth_state.create(t.name, t.role)
        event(_log, "admin.login", token=t.name, role=t.role, client=client, second_factor=bool(secret))
        return JSONResponse({"session": session, "name": t.name, "role": t.role, "expires_in": SESSION_SECONDS})

    @app.post("/api/logout")
    async def logout(request: Request, p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        presented = request.headers.get("authorization", "").partition(" ")[2].strip()
        auth_state.sessions.pop(hash_token(presented), None)
        return {"logged_out": p.name}

    @app.get("/api/whoami")
    async def whoami(p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"name": p.name, "role": p.role, "via": p.via}

    @app.get("/api/config")
    async def config(response: Response, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        cfg = runtime.config
        response.headers["ETag"] = f'"{cfg.version}"'
        return {"version": cfg.version, "path": runtime.config_path, "routes": len(cfg.router),
                "connectors": sorted(cfg.connectors), "last_reload": reloader.status.as_dict(),
                "history": [e.as_dict() for e in reloader.history.entries()]}

    @app.get("/api/routes", response_model=None)
    async def routes(request: Request, _: Principal = Depends(auth)) -> Any:  # noqa: B008
        cfg = runtime.config
        etag = {"ETag": f'"{cfg.version}"'}
        if "yaml" in request.headers.get("accept", "") or request.query_params.get("format") == "yaml":
            return PlainTextResponse(cfg.source.text, media_type="application/yaml", headers=etag)
        return JSONResponse({
            "version": cfg.version,
            "routes": [
                {"name": r.name, "from": r.sources, "subjects": r.subjects, "when": r.config.match.when,
                 "mode": r.mode, "targets": [t.connector for t in r.targets], "reply": r.wants_reply}
                for r in cfg.router.routes
            ],
            # The file as written (before ${VAR} substitution, so no secret value appears).
            "document": json.loads(json.dumps(yaml.safe_load(cfg.source.text) or {}, default=str)),
        }, headers=etag)

    @app.put("/api/routes")
    async def put_routes(request: Request, p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        base = _if_match(request)
        text = await _config_text(request, runtime.config.source.text)
        return await _save(text, base, p, "")

    @app.post("/api/routes/validate")
    async def validate(request: Request, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        text = await _config_text(request, runtime.config.source.text)
        running = runtime.config
        out: dict[str, Any] = {"version": version_of(text), "running": running.version,
                               "diff": unified_diff(running.source.text, text, f"running ({running.version})",
                                                    "candidate")}
        try:
            cfg = await _candidate(runtime, text)
        except ConfigError as exc:
            return {**out, "valid": False, "errors": [i.as_dict() for i in exc.issues]}
        return {**out, "valid": True, "errors": [], "routes": len(cfg.router), "connectors": sorted(cfg.connectors)}

    @app.post("/api/routes/test")
    async def test_routes(request: Request, _: Principal = Depends(auth)) -> JSONResponse:  # noqa: B008
        from gateway.dryrun import SampleError, dry_run, run_tests, sample_envelope

        body = await _json(request, MAX_CONFIG_BYTES)
        text = body.get("config")
        if text is not None and not isinstance(text, str):
            raise HTTPException(422, "config is the candidate routes.yaml as a string")
        try:
            cfg = runtime.config if text is None else await _candidate(runtime, text)
        except ConfigError as exc:
            return JSONResponse({"detail": "the candidate config is invalid",
                                 "errors": [i.as_dict() for i in exc.issues]}, status_code=422)
        try:
            if "tests" in body:
                cases = run_tests(cfg, {"tests": _yaml_or_value(body["tests"])})
                return JSONResponse({"version": cfg.version, "tests": [
                    {"name": c.name, "ok": c.ok, "failures": c.failures, "result": c.result} for c in cases]})
            messages = body.get("messages", [body["message"]] if "message" in body else None)
            if not isinstance(messages, list) or not messages:
                raise SampleError("give message (one sample), messages (a list) or tests")
            results = []
            for i, raw in enumerate(messages[:100]):
                try:
                    results.append(dry_run(cfg, sample_envelope(_yaml_or_value(raw), cfg)))
                except SampleError as exc:
                    raise SampleError(f"messages[{i}]: {exc}") from None
        except SampleError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=422)
        return JSONResponse({"version": cfg.version, "sent": False, "results": results})

    @app.post("/api/reload")
    async def reload_file(p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        try:
            result = await reloader.from_file(by=p.name)
        except ConfigError as exc:
            return _invalid(exc)
        except ReloadRefused as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except ReloadFailed as exc:
            return JSONResponse({"detail": f"reload failed: {exc}"}, status_code=500)
        return JSONResponse(result, headers={"ETag": f'"{result["version"]}"'})

    @app.get("/api/history")
    async def history(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"running": runtime.config.version, "entries": [e.as_dict() for e in reloader.history.entries()]}

    @app.get("/api/history/diff")
    async def history_diff(
        _: Principal = Depends(auth),  # noqa: B008
        from_: str = Query(..., alias="from"), to: str | None = None,
    ) -> dict[str, Any]:
        to = to or runtime.config.version
        return {"from": from_, "to": to,
                "diff": unified_diff(_history_text(runtime, from_), _history_text(runtime, to), from_, to)}

    @app.get("/api/history/{version}", response_model=None)
    async def history_version(version: str, request: Request, _: Principal = Depends(auth)) -> Any:  # noqa: B008
        text = _history_text(runtime, version)
        if "json" in request.headers.get("accept", ""):
            return {"version": version, "text": text}
        return PlainTextResponse(text, media_type="application/yaml")

    @app.post("/api/history/{version}/rollback")
    async def rollback(version: str, request: Request, p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        base = _if_match(request)
        return await _save(_history_text(runtime, version), base, p, f"rollback to {version}")

    @app.get("/api/schema")
    async def schema(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        from gateway.registry import Registry
        from gateway.schema import build_schema

        kinds = {}
        for kind in runtime.registry.kinds():
            try:
                kinds[kind] = runtime.registry.get(kind)
            except Exception as exc:  # a kind that cannot load is left out of the suggestions
                event(_log, "schema.kind_unavailable", logging.DEBUG, kind=kind, error=str(exc))
        return build_schema(Registry(kinds, use_entry_points=False))

    @app.get("/api/overview")
    async def overview(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return _overview(runtime)

    @app.get("/api/live")
    async def live_view(_: Principal = Depends(auth), limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:  # noqa: B008
        return {"version": runtime.config.version, "routes": live.recent(limit)}

    @app.get("/api/live/{envelope_id}/sample")
    async def live_sample(envelope_id: str, _: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        sample = live.sample(envelope_id)
        if sample is None:
            raise HTTPException(404, f"no recorded sample for {envelope_id} (only recent text bodies are kept)")
        return sample

    async def _save(text: str, base: str, p: Principal, note: str) -> JSONResponse:
        try:
            result = await reloader.save_and_apply(text, base=base, by=p.name, note=note)
        except ConfigError as exc:
            return _invalid(exc)
        except ReloadRefused as exc:
            return JSONResponse({"detail": str(exc), "running": exc.current or runtime.config.version},
                                status_code=exc.status)
        except ReloadFailed as exc:
            return JSONResponse({"detail": f"saved, but applying it failed: {exc}"}, status_code=500)
        return JSONResponse(result, headers={"ETag": f'"{result["version"]}"'})


def _invalid(exc: ConfigError) -> JSONResponse:
    return JSONResponse({"detail": f"the config is invalid ({len(exc.issues)} problem(s)); the running routes stay",
                         "errors": [i.as_dict() for i in exc.issues]}, status_code=422)


def _if_match(request: Request) -> str:
    raw = request.headers.get("if-match", "").strip()
    if not raw:
        raise HTTPException(428, "If-Match is required: send the version your edit is based on "
                                 "(the ETag of GET /api/routes)")
    return raw.removeprefix("W/").strip('"')


async def _candidate(runtime: Runtime, text: str) -> LoadedConfig:
    path = runtime.config_path or "routes.yaml"
    return await asyncio.to_thread(load_config_text, text, file=path,
                                   base_dir=os.path.dirname(os.path.abspath(path)), registry=runtime.registry)


def _history_text(runtime: Runtime, version: str) -> str:
    if version == runtime.config.version:
        return runtime.config.source.text
    text = runtime.reloader.history.text(version)
    if text is None:
        raise HTTPException(404, f"version {version!r} is not in the history")
    return text


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body limit is {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _config_text(request: Request, current: str) -> str:
    """The candidate routes.yaml of a request: YAML text, {"yaml": text}, or JSON top-level keys
    to merge into the current file (round-trip: comments and layout stay)."""
    raw = await _read_body(request, MAX_CONFIG_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the config must be UTF-8") from None
    if "json" not in request.headers.get("content-type", ""):
        return text
    try:
        body = json.loads(text or "{}")
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    if isinstance(body.get("yaml"), str):
        return str(body["yaml"])
    unknown = set(body) - {"gateway", "connectors", "routes"}
    if unknown or not body:
        raise HTTPException(422, "a JSON body is {\"yaml\": \"...\"} or any of gateway, connectors, routes")
    try:
        return merge_document(current, body)
    except ConfigError as exc:
        raise HTTPException(422, str(exc)) from None


def _yaml_or_value(raw: Any) -> Any:
    """A sample pasted as YAML/JSON text, or already structured."""
    if isinstance(raw, str):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            from gateway.dryrun import SampleError

            raise SampleError(f"the sample is not valid YAML/JSON: {exc}") from None
    return raw


# --- overview and the live view --------------------------------------------------------------


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out.append((dict(sample.labels), float(sample.value)))
    return out


def _overview(runtime: Runtime) -> dict[str, Any]:
    m = runtime.metrics
    routed: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for labels, value in _samples(m.routed):
        routed[labels["route"]][labels["outcome"]] = value
    delivered: dict[str, float] = collections.defaultdict(float)
    sent: dict[str, float] = collections.defaultdict(float)
    for labels, value in _samples(m.delivered):
        delivered[labels["route"]] += value
        sent[labels["connector"]] += value
    failed: dict[str, float] = collections.defaultdict(float)
    for labels, value in _samples(m.failures):
        failed[labels["route"]] += value
    received = {labels["connector"]: value for labels, value in _samples(m.received)}
    routes = []
    for r in runtime.config.router.routes:
        counts = routed.get(r.name, {})
        routes.append({"name": r.name, "from": r.sources, "subjects": r.subjects, "mode": r.mode,
                       "targets": [t.connector for t in r.targets],
                       "matched": counts.get("matched", 0), "dead_lettered": counts.get("dead_lettered", 0),
                       "delivered": delivered.get(r.name, 0), "failed": failed.get(r.name, 0)})
    connectors = {}
    for name, slot in runtime.slots.items():
        h = slot.health()
        connectors[name] = {"type": type(slot.connector).kind, "up": h.up, "detail": h.detail, "state": slot.state,
                            "inbound": slot.inbound, "received": received.get(name, 0), "sent": sent.get(name, 0)}
    unmatched = routed.get("", {}).get("unmatched", 0)
    return {"version": runtime.config.version, "routes": routes, "connectors": connectors, "unmatched": unmatched,
            "last_reload": runtime.reloader.status.as_dict()}


class LiveLog:
    """The last messages per route (id, time, outcome, targets, config version), for the editor.

    It wraps the ``Deliver`` callable: the routing state is read right before the inner
    ``deliver`` takes its own snapshot (no await in between), so both see the same version. The
    hot path only appends to a bounded ring; which routes took each message is worked out when
    someone looks (``recent``), so an unwatched gateway pays almost nothing. Recent UTF-8
    bodies up to ``max_sample`` bytes are kept as dry-run samples, served to editors only.
    """

    def __init__(self, per_route: int = 50, samples: int = 50, max_sample: int = 64 * 1024, ring: int = 500):
        self.per_route = per_route
        self.max_sample = max_sample
        self._routes: dict[str, collections.deque[dict[str, Any]]] = {}
        self._samples: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._max_samples = samples
        # (envelope, routing state, selection if already known, outcome, time)
        self._ring: collections.deque[tuple[Envelope, Any, list[Any] | None, Outcome, float]] = \
            collections.deque(maxlen=ring)

    def observe(self, env: Envelope, state: Any, outcome: Outcome) -> None:
        """A :meth:`Delivery.add_observer` hook: ``state`` is what the message was routed under."""
        if len(env.body) <= self.max_sample:
            self._ring.append((env, state, None, outcome, time.time()))
        else:  # do not hold large bodies: select now, keep the envelope without its body
            with contextlib.suppress(Exception):
                self._ring.append((env.evolve(body=b""), state, state.router.select(env), outcome, time.time()))

    def _drain(self) -> None:
        while self._ring:
            env, state, selected, outcome, at = self._ring.popleft()
            try:
                self.record(env, state.router.select(env) if selected is None else selected, state.version,
                            outcome, at)
            except Exception as exc:  # the live view must never fail a request
                event(_log, "live.record_failed", logging.DEBUG, envelope_id=env.id, error=str(exc))

    def record(self, env: Envelope, selected: list[Any], version: str, outcome: Outcome,
               at: float | None = None) -> None:
        when = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
        entry = {"id": env.id, "time": when.isoformat(timespec="milliseconds"), "source": env.source,
                 "subject": env.subject, "outcome": outcome.status.value, "reason": outcome.reason,
                 "version": version}
        for sel in selected or [None]:
            route = sel.route if sel is not None else None
            name = route.name if route is not None else ""
            targets = [t.connector for t in route.targets] if route is not None and not sel.error else []
            q = self._routes.get(name)
            if q is None:
                q = self._routes[name] = collections.deque(maxlen=self.per_route)
            q.append({**entry, "route": name, "targets": targets})
        if env.body and len(env.body) <= self.max_sample:
            try:
                body = env.body.decode("utf-8")
            except UnicodeDecodeError:
                return
            self._samples[env.id] = {"source": env.source, "subject": env.subject, "content_type": env.content_type,
                                     "headers": dict(env.headers), "body": body}
            while len(self._samples) > self._max_samples:
                self._samples.popitem(last=False)

    def recent(self, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
        """Newest first, per route ('' = no route matched)."""
        self._drain()
        return {name: list(q)[-limit:][::-1] for name, q in self._routes.items()}

    def sample(self, envelope_id: str) -> dict[str, Any] | None:
        self._drain()
        s = self._samples.get(envelope_id)
        return dict(s) if s is not None else None


# --- the web editor --------------------------------------------------------------------------

_STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "admin_static")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _editor_ui(app: FastAPI) -> None:
    """Plain files, no build step, nothing from a CDN: the page works offline."""

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/", status_code=307)

    @app.get("/ui/", include_in_schema=False)
    async def ui_index() -> FileResponse:
        return _static("index.html")

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str) -> FileResponse:
        return _static(name)


def _static(name: str) -> FileResponse:
    ext = os.path.splitext(name)[1]
    path = os.path.join(_STATIC, name)
    if "/" in name or name.startswith(".") or ext not in _STATIC_TYPES or not os.path.isfile(path):
        raise HTTPException(404, f"no such file: {name}")
    return FileResponse(path, media_type=_STATIC_TYPES[ext], headers=_UI_HEADERS)


def mount_admin(runtime: Runtime) -> None:
    live = LiveLog()
    runtime.delivery.add_observer(live.observe)
    runtime.http.mount(runtime.config.model.gateway.admin.listen, "/", build_admin(runtime, live), owner="admin")
