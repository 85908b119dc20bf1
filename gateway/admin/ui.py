"""The web editor at ``/ui/``: its static files, served with a strict content security policy."""

from __future__ import annotations

import os

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

_STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "admin_static")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def editor_ui(app: FastAPI) -> None:
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
