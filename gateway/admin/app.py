"""The admin listener's ASGI app: the open probes and metrics, and the API and editor routes put together."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from gateway.admin.api_config import config_api
from gateway.admin.api_deadletters import dead_letters_api
from gateway.admin.api_graph import graph_api
from gateway.admin.api_messages import messages_api
from gateway.admin.api_overview import overview_api
from gateway.admin.auth import AuthState, Principal, login_api, make_auth, make_editor
from gateway.admin.live import LiveLog
from gateway.admin.port import AdminPort
from gateway.admin.ui import editor_ui
from gateway.contract import HttpMount
from gateway.logs import event

_log = logging.getLogger("gateway.admin")


def build_admin(runtime: AdminPort, live: LiveLog | None = None) -> FastAPI:
    app = FastAPI(title="gateway admin", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    auth_state = AuthState()
    auth = make_auth(runtime, auth_state)
    admin = runtime.config.model.gateway.admin
    if admin.tokens and admin.session_key is None:
        event(_log, "admin.session_key_unset", detail="sessions are signed with a key of this process: "
              "they hold on this replica only (set gateway.admin.session_key to share them)")
    editor = make_editor(auth)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "uptime_seconds": round(time.time() - runtime.started_at, 1)}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Can this pod accept work now (see :meth:`AdminPort.readiness`)? ``?verbose`` adds every
        connector, outbound ones included, which never make the pod unready."""
        ready, detail = runtime.readiness()
        if "verbose" not in request.query_params:
            del detail["connectors"]
        return JSONResponse(detail, status_code=200 if ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        runtime.readiness()  # refresh gauges derived from health
        body, content_type = runtime.metrics.negotiate(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    login_api(app, runtime, auth, auth_state)
    config_api(app, runtime, auth, editor)
    overview_api(app, runtime, auth, editor, live or LiveLog())
    editor_ui(app)

    @app.get("/api/connectors")
    async def connectors(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        out = {}
        for name, c in runtime.connectors().items():
            out[name] = {"type": c.kind, "up": c.up, "detail": c.detail, "state": c.state,
                         "inbound": c.inbound, "circuit": runtime.circuit(name)}
        return {"connectors": out}

    dead_letters_api(app, runtime, auth, editor)
    graph_api(app, runtime, auth, editor)
    messages_api(app, runtime, auth)

    return app


def mount_admin(runtime: AdminPort, http: HttpMount, *, listen: str | None = None) -> None:
    """Serve the admin app on ``gateway.admin.listen`` (or ``listen``: a worker process's private
    address) through ``http`` (before the listeners start)."""
    live = LiveLog()
    runtime.observe(live.observe)
    http.mount(listen or runtime.config.model.gateway.admin.listen, "/", build_admin(runtime, live), owner="admin")
