"""The editor's picture of a config, and the way out when the file on disk is not the running one.

``GET /api/graph`` is the running config as a flow graph: each source connector, the routes that
take from it and their targets, every route with its storm controls (dedupe, throttle, digest,
alarm) and its lines in routes.yaml (the first and the last). ``POST /api/graph`` takes a
candidate routes.yaml (the editor's text, up to ``gateway.admin.max_config_bytes``) and answers
its graph with each route marked ``added``, ``changed`` or ``removed`` against the running one,
so a pending edit shows on the picture before it is applied. The graph needs YAML, not a valid
config: text the validator refuses still draws what it names (its errors come from
``/api/routes/validate``); text that is not YAML answers ``parsed: false`` with the errors.
Counters are not here: the page joins the graph with ``/api/overview`` by route and connector name.

``GET /api/config/file`` reports routes.yaml as it is on disk: its version, whether it differs
from the running version (edits are refused with ``409`` while it does), and its problems with
their lines. ``PUT /api/config/file`` (editors) replaces it: ``If-Match`` names the on-disk
version the editor saw, the body is the text to keep (the running version, or an edited one,
which is validated first and then applied as any edit). The replaced file's version and the new
one are logged with who did it (``config.file_replaced``).

All parsing runs in the reloader's config worker, never on the event loop (``503`` +
``Retry-After`` when it is full).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from gateway.admin.auth import Principal
from gateway.admin.body import read_body
from gateway.admin.port import AdminPort
from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError, Source, decode, load_text
from gateway.logs import event
from gateway.reload import ReloadFailed, ReloadRefused, version_of
from gateway.reload.worker import WorkerBusy

_log = logging.getLogger("gateway.admin")

T = TypeVar("T")

_STORM = ("alarm", "dedupe", "throttle", "digest")


def graph_api(app: FastAPI, runtime: AdminPort, auth: Any, editor: Any) -> None:
    """``GET|POST /api/graph`` and ``GET|PUT /api/config/file``."""
    cached: dict[str, dict[str, Any]] = {}

    async def work(job: Callable[[], T]) -> T:
        try:
            return await runtime.run_config_job(job)
        except WorkerBusy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None

    def inbound() -> set[str]:
        return {name for name, c in runtime.connectors().items() if c.inbound}

    @app.get("/api/graph")
    async def running_graph(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        cfg = runtime.config
        if cfg.version not in cached:
            graph = await work(functools.partial(graph_of, cfg.source, None, inbound()))
            cached.clear()
            cached[cfg.version] = {"version": cfg.version, **graph}
        return cached[cfg.version]

    @app.post("/api/graph")
    async def candidate_graph(request: Request, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        raw = await read_body(request, runtime.config.model.gateway.admin.max_config_bytes)
        running = runtime.config
        job = functools.partial(_candidate_graph, raw, running.source, runtime.config_path or "routes.yaml",
                                inbound())
        return {"running": running.version, **await work(job)}

    @app.get("/api/config/file")
    async def config_file(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        path = _path(runtime)
        text = await asyncio.to_thread(_read, path)
        running = runtime.config
        out: dict[str, Any] = {"path": path, "version": version_of(text), "running": running.version,
                               "differs": version_of(text) != version_of(running.source.text), "errors": []}
        if out["differs"]:
            out["text"] = text
            out["errors"] = await work(functools.partial(_problems, runtime, text))
            out["valid"] = not out["errors"]
        return out

    @app.put("/api/config/file")
    async def replace_file(request: Request, p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        seen = request.headers.get("if-match", "").strip().removeprefix("W/").strip('"')
        if not seen:
            raise HTTPException(428, "If-Match is required: the on-disk version you are replacing "
                                     "(GET /api/config/file)")
        path = _path(runtime)
        raw = await read_body(request, runtime.config.model.gateway.admin.max_config_bytes)
        try:
            text = decode(raw, path)
        except ConfigError as exc:
            return _invalid(exc)
        errors = await work(functools.partial(_problems, runtime, text))
        if errors:
            return JSONResponse({"detail": f"the text is invalid ({len(errors)} problem(s)); the file is unchanged",
                                 "errors": errors}, status_code=422)
        running = runtime.config
        try:
            replaced = await runtime.restore_running(seen, running)
        except ReloadRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        event(_log, "config.file_replaced", logging.WARNING, by=p.name, replaced=replaced,
              version=version_of(text), running=running.version)
        if text == running.source.text:
            return JSONResponse({"outcome": "restored", "version": running.version})
        try:
            result = await runtime.save_and_apply(text, base=running.version, by=p.name,
                                                  note=f"replaces the hand edit {replaced}")
        except WorkerBusy as exc:
            raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        except ConfigError as exc:
            return _invalid(exc)
        except ReloadRefused as exc:
            return JSONResponse({"detail": f"the file holds the running version again, but the edit was refused: "
                                           f"{exc}"}, status_code=exc.status)
        except ReloadFailed as exc:
            return JSONResponse({"detail": f"saved, but applying it failed: {exc}"}, status_code=500)
        return JSONResponse(result, headers={"ETag": f'"{result["version"]}"'})


def _path(runtime: AdminPort) -> str:
    if not runtime.config_path:
        raise HTTPException(404, "this gateway was started without a config file")
    return runtime.config_path


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError as exc:
        raise HTTPException(503, f"cannot read {path}: {exc.strerror}") from None


def _invalid(exc: ConfigError) -> JSONResponse:
    return JSONResponse({"detail": f"the text is invalid ({len(exc.issues)} problem(s))",
                         "errors": [i.as_dict() for i in exc.issues]}, status_code=422)


def _problems(runtime: AdminPort, text: str) -> list[dict[str, Any]]:
    path = runtime.config_path or "routes.yaml"
    try:
        load_config_text(text, file=path, base_dir=os.path.dirname(os.path.abspath(path)), registry=runtime.registry)
    except ConfigError as exc:
        return [i.as_dict() for i in exc.issues]
    return []


# --- the graph (jobs of the config worker) ------------------------------------------------------


def _candidate_graph(raw: bytes, running: Source, file: str, inbound: set[str]) -> dict[str, Any]:
    try:
        text = decode(raw, file)
        src = load_text(text, file)
    except ConfigError as exc:
        return {"parsed": False, "errors": [i.as_dict() for i in exc.issues]}
    return {"parsed": True, "version": version_of(text), **graph_of(src, running, inbound)}


def graph_of(src: Source, running: Source | None, inbound: set[str]) -> dict[str, Any]:
    """The flow graph of parsed routes.yaml. With ``running``, each route says how it differs
    from the route of that name there (``added``, ``changed``, ``removed`` or ``""``), and the
    routes only ``running`` has are listed, marked ``removed``, with no lines."""
    data = src.data if isinstance(src.data, dict) else {}
    raw_connectors = data.get("connectors") if isinstance(data.get("connectors"), dict) else {}
    before: dict[str, Any] = {}
    if running is not None and isinstance(running.data, dict) and isinstance(running.data.get("routes"), list):
        before = {str(r.get("name")): r for r in running.data["routes"] if isinstance(r, dict)}
    spans = _route_spans(src)
    routes = []
    seen: set[str] = set()
    for index, r in enumerate(data["routes"] if isinstance(data.get("routes"), list) else []):
        if not isinstance(r, dict):
            continue
        name = str(r.get("name", f"routes[{index}]"))
        seen.add(name)
        change = ""
        if running is not None:
            change = "added" if name not in before else "changed" if before[name] != r else ""
        routes.append(_route(name, r, spans.get(index), change))
    for name, r in before.items():
        if running is not None and name not in seen:
            routes.append(_route(name, r, None, "removed"))
    connectors: dict[str, dict[str, Any]] = {}
    for name, c in (raw_connectors or {}).items():
        kind = c.get("type") if isinstance(c, dict) else None
        connectors[str(name)] = {"type": str(kind or "?"), "inbound": name in inbound, "outbound": False}
    for r in routes:
        for name in r["from"]:
            connectors.setdefault(name, {"type": "?", "inbound": False, "outbound": False})["inbound"] = True
        for name in r["to"]:
            connectors.setdefault(name, {"type": "?", "inbound": False, "outbound": False})["outbound"] = True
    return {"routes": routes, "connectors": connectors}


def _route(name: str, r: dict[str, Any], span: tuple[int, int] | None, change: str) -> dict[str, Any]:
    sources = r.get("from")
    targets: list[Any] = r["to"] if isinstance(r.get("to"), list) else []
    match: dict[str, Any] = r["match"] if isinstance(r.get("match"), dict) else {}
    subjects = match.get("subject")
    return {
        "name": name,
        "from": [str(s) for s in (sources if isinstance(sources, list) else [sources] if sources else [])],
        "to": [str(t.get("connector")) for t in targets if isinstance(t, dict) and t.get("connector")],
        "subjects": [str(s) for s in (subjects if isinstance(subjects, list) else [subjects] if subjects else [])],
        "when": str(match.get("when") or ""),
        "mode": str(r.get("mode") or ("direct" if any(isinstance(t, dict) and t.get("reply") for t in targets)
                                      else "spooled")),
        "storm": {k: _storm_label(k, r[k]) for k in _STORM if isinstance(r.get(k), dict)},
        "lines": list(span) if span else None,
        "change": change,
    }


def _storm_label(kind: str, spec: dict[str, Any]) -> str:
    """The badge text: what the control does, in the words routes.yaml uses."""
    window = _duration(spec.get("window", 300))
    if kind == "throttle":
        then = " then digest" if spec.get("then") == "digest" else ""
        return f"{spec.get('limit', 1)} per {window}{then}"
    if kind == "alarm":
        return f"raise when {spec.get('raise_when', '?')}"
    return window


def _duration(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= seconds and value % seconds == 0:
            return f"{int(value // seconds)}{unit}"
    return f"{value:g}s"


def _route_spans(src: Source) -> dict[int, tuple[int, int]]:
    """The first and last line of each ``routes[i]`` entry."""
    spans: dict[int, tuple[int, int]] = {}
    for path, line in src.lines.items():
        if len(path) >= 2 and path[0] == "routes" and isinstance(path[1], int):
            first, last = spans.get(path[1], (line, line))
            spans[path[1]] = (min(first, line), max(last, line))
    return spans
