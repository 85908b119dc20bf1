"""The admin listener: probes, metrics, and the authenticated admin API.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers). Everything under
``/api`` needs a bearer token from ``gateway.admin.tokens`` (stored as sha256 digests; role
``viewer`` reads, ``editor`` writes). With no tokens configured, ``/api`` answers only clients
on loopback, so a fresh install is never an open admin API.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from gateway.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from gateway.runtime import Runtime


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
    def __init__(self, name: str, role: str):
        self.name = name
        self.role = role


def make_auth(runtime: Runtime) -> Any:
    def authenticate(request: Request) -> Principal:
        tokens = runtime.config.model.gateway.admin.tokens
        header = request.headers.get("authorization", "")
        if not tokens:
            if _is_loopback(request.client.host if request.client else None):
                return Principal("local", "editor")
            raise HTTPException(403, "the admin API is open to loopback only until gateway.admin.tokens is set")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
        digest = hash_token(presented.strip())
        for t in tokens:
            expected = t.sha256 or (hash_token(t.token.get_secret_value()) if t.token else "")
            if expected and hmac.compare_digest(expected, digest):
                return Principal(t.name, t.role)
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    return authenticate


def make_editor(auth: Any) -> Any:
    def editor(p: Principal = Depends(auth)) -> Principal:  # noqa: B008 - FastAPI's dependency idiom
        if p.role != "editor":
            raise HTTPException(403, f"token {p.name!r} has role {p.role!r}; this needs 'editor'")
        return p

    return editor


def build_admin(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="gateway admin", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    auth = make_auth(runtime)
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

    @app.get("/api/config")
    async def config(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"version": runtime.config.version, "path": runtime.config_path,
                "routes": len(runtime.config.router), "history": runtime.config_history}

    @app.get("/api/routes", response_model=None)
    async def routes(request: Request, _: Principal = Depends(auth)) -> Any:  # noqa: B008
        if "yaml" in request.headers.get("accept", "") or request.query_params.get("format") == "yaml":
            return PlainTextResponse(runtime.config.source.text, media_type="application/yaml")
        return {
            "version": runtime.config.version,
            "routes": [
                {"name": r.name, "from": r.sources, "subjects": r.subjects, "when": r.config.match.when,
                 "mode": r.mode, "targets": [t.connector for t in r.targets], "reply": r.wants_reply}
                for r in runtime.config.router.routes
            ],
        }

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
        since: float | None = None, until: float | None = None, limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        items = await runtime.spool.dead_letters(route=route, connector=connector, reason=reason, since=since,
                                                 until=until, limit=limit)
        return {"dead_letters": [_summary(d.as_dict()) for d in items]}

    @app.get("/api/dead-letters/{dl_id}")
    async def dead_letter(dl_id: int, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        item = await runtime.spool.dead_letter_by_id(dl_id)
        if item is None:
            raise HTTPException(404, f"no dead letter {dl_id}")
        return item.as_dict()

    @app.post("/api/dead-letters/replay")
    async def replay(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        body = await _json(request)
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise HTTPException(422, "body must be {\"ids\": [1, 2, ...], \"connector\": optional}")
        connector = body.get("connector")
        if connector is not None and connector not in runtime.slots:
            raise HTTPException(422, f"unknown connector {connector!r}")
        n = await runtime.spool.replay(ids, connector=connector)
        await runtime.delivery.start(list(runtime.slots))
        runtime.log.info("dead_letters.replayed", extra={"fields": {"by": p.name, "count": n}})
        return {"replayed": n}

    @app.post("/api/dead-letters/purge")
    async def purge(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        body = await _json(request)
        ids = body.get("ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)):
            raise HTTPException(422, "ids must be a list of integers")
        filters = {k: body[k] for k in ("route", "connector", "reason") if k in body}
        if ids is None and not filters and body.get("all") is not True:
            raise HTTPException(422, "say which: ids, a filter (route/connector/reason), or all: true")
        n = await runtime.spool.purge(ids, **filters)
        runtime.log.info("dead_letters.purged", extra={"fields": {"by": p.name, "count": n}})
        return {"purged": n}

    return app


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    env = d.pop("envelope")
    d["subject"] = env.get("subject")
    d["source"] = env.get("source")
    d.pop("options", None)
    return d


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    return body


def mount_admin(runtime: Runtime) -> None:
    runtime.http.mount(runtime.config.model.gateway.admin.listen, "/", build_admin(runtime), owner="admin")
