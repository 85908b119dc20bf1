"""The config API: read, validate, dry-run, save and apply routes.yaml, reload, history and rollback, schema.

Every write goes through :meth:`~gateway.admin.port.AdminPort.save_and_apply`: an edit carries
``If-Match: "<version>"`` and an edit of a stale version answers ``409``. An invalid config
answers ``422`` with every problem and its line; the running routes stay. Both refusals are
logged with who, what and why (``config.refused``, ``config.invalid``).

A config in a request is at most ``gateway.admin.max_config_bytes`` (``413`` past it). Its
parsing and validation, diffs, round-trip merges, dry runs and the JSON rendering of a whole
document run in the reloader's config worker, never on the event loop; when the worker's queue
is full the request is answered ``503`` + ``Retry-After`` (the admin API's own concurrency: no
other protocol is touched).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from gateway.admin.auth import Principal
from gateway.admin.body import parse_json, read_body
from gateway.admin.port import AdminPort
from gateway.config.loader import LoadedConfig, load_config_text
from gateway.config.yamlsrc import ConfigError, decode, load_data
from gateway.history import unified_diff
from gateway.logs import event
from gateway.reload import ReloadFailed, ReloadRefused, merge_document, version_of
from gateway.reload.worker import WorkerBusy

_log = logging.getLogger("gateway.admin")

T = TypeVar("T")

#: Dry-run samples and route test cases one request may hold.
MAX_SAMPLES = 100
MAX_TESTS = 1000


def config_api(app: FastAPI, runtime: AdminPort, auth: Any, editor: Any) -> None:
    """``/api/config``, ``/api/routes`` (and its validate, test), ``/api/reload``, ``/api/history``, ``/api/schema``."""

    async def config_body(request: Request) -> bytes:
        return await read_body(request, runtime.config.model.gateway.admin.max_config_bytes)

    @app.get("/api/config")
    async def config(response: Response, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        cfg = runtime.config
        response.headers["ETag"] = f'"{cfg.version}"'
        return {"version": cfg.version, "path": runtime.config_path, "routes": len(cfg.router),
                "connectors": sorted(cfg.connectors), "last_reload": runtime.last_reload(),
                "history": runtime.history()}

    @app.get("/api/routes", response_model=None)
    async def routes(request: Request, _: Principal = Depends(auth)) -> Any:  # noqa: B008
        cfg = runtime.config
        etag = {"ETag": f'"{cfg.version}"'}
        if "yaml" in request.headers.get("accept", "") or request.query_params.get("format") == "yaml":
            return PlainTextResponse(cfg.source.text, media_type="application/yaml", headers=etag)
        body = await _work(runtime, functools.partial(_routes_json, cfg))
        return Response(body, media_type="application/json", headers=etag)

    @app.put("/api/routes")
    async def put_routes(request: Request, p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        base = _if_match(request)
        raw = await config_body(request)
        job = functools.partial(_candidate_text, raw, request.headers.get("content-type", ""),
                                runtime.config.source.text, runtime.config_path or "routes.yaml")
        try:
            text = await runtime.run_config_job(job)
        except WorkerBusy as exc:
            runtime.record_refused(str(exc), by=p.name, base=base, status=503)
            raise _busy(exc) from None
        except ConfigError as exc:
            runtime.record_invalid(exc, p.name)
            return _invalid(exc)
        return await _save(text, base, p, "")

    @app.post("/api/routes/validate")
    async def validate(request: Request, _: Principal = Depends(auth)) -> JSONResponse:  # noqa: B008
        raw = await config_body(request)
        job = functools.partial(_validate, runtime, runtime.config, raw, request.headers.get("content-type", ""))
        return await _work(runtime, job)

    @app.post("/api/routes/test")
    async def test_routes(request: Request, _: Principal = Depends(auth)) -> JSONResponse:  # noqa: B008
        raw = await config_body(request)
        return await _work(runtime, functools.partial(_test_routes, runtime, runtime.config, raw))

    @app.post("/api/reload")
    async def reload_file(p: Principal = Depends(editor)) -> JSONResponse:  # noqa: B008
        try:
            result = await runtime.reload_from_file(by=p.name)
        except WorkerBusy as exc:
            raise _busy(exc) from None
        except ConfigError as exc:
            return _invalid(exc)
        except ReloadRefused as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except ReloadFailed as exc:
            return JSONResponse({"detail": f"reload failed: {exc}"}, status_code=500)
        return JSONResponse(result, headers={"ETag": f'"{result["version"]}"'})

    @app.get("/api/history")
    async def history(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"running": runtime.config.version, "entries": runtime.history()}

    @app.get("/api/history/diff")
    async def history_diff(
        _: Principal = Depends(auth),  # noqa: B008
        from_: str = Query(..., alias="from"), to: str | None = None,
    ) -> dict[str, Any]:
        to = to or runtime.config.version
        old, new = _history_text(runtime, from_), _history_text(runtime, to)
        diff = await _work(runtime, functools.partial(unified_diff, old, new, from_, to))
        return {"from": from_, "to": to, "diff": diff}

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

    async def _save(text: str, base: str, p: Principal, note: str) -> JSONResponse:
        try:
            result = await runtime.save_and_apply(text, base=base, by=p.name, note=note)
        except WorkerBusy as exc:
            runtime.record_refused(str(exc), by=p.name, base=base, status=503, version=version_of(text))
            raise _busy(exc) from None
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


def _busy(exc: WorkerBusy) -> HTTPException:
    return HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)})


async def _work(runtime: AdminPort, job: Callable[[], T]) -> T:
    """``job()`` in the config worker; 503 + Retry-After when its queue is full."""
    try:
        return await runtime.run_config_job(job)
    except WorkerBusy as exc:
        raise _busy(exc) from None


def _if_match(request: Request) -> str:
    raw = request.headers.get("if-match", "").strip()
    if not raw:
        raise HTTPException(428, "If-Match is required: send the version your edit is based on "
                                 "(the ETag of GET /api/routes)")
    return raw.removeprefix("W/").strip('"')


# --- jobs of the config worker (run in its thread, never on the event loop) ----------------------


def _routes_json(cfg: LoadedConfig) -> bytes:
    return json.dumps({
        "version": cfg.version,
        "routes": [
            {"name": r.name, "from": r.sources, "subjects": r.subjects, "when": r.config.match.when,
             "mode": r.mode, "targets": [t.connector for t in r.targets], "reply": r.wants_reply}
            for r in cfg.router.routes
        ],
        # The file as written (before ${VAR} substitution, so no secret value appears).
        "document": load_data(cfg.source.text, cfg.source.file) or {},
    }, default=str).encode("utf-8")


def _validate(runtime: AdminPort, running: LoadedConfig, raw: bytes, content_type: str) -> JSONResponse:
    out: dict[str, Any] = {"version": "", "running": running.version, "diff": ""}
    try:
        text = _candidate_text(raw, content_type, running.source.text, runtime.config_path or "routes.yaml")
        out["version"] = version_of(text)
        out["diff"] = unified_diff(running.source.text, text, f"running ({running.version})", "candidate")
        cfg = _candidate(runtime, text)
    except ConfigError as exc:
        return JSONResponse({**out, "valid": False, "errors": [i.as_dict() for i in exc.issues]})
    return JSONResponse({**out, "valid": True, "errors": [], "routes": len(cfg.router),
                         "connectors": sorted(cfg.connectors)})


def _test_routes(runtime: AdminPort, running: LoadedConfig, raw: bytes) -> JSONResponse:
    from gateway.dryrun import SampleError, dry_run, run_tests, sample_envelope

    body = parse_json(raw)
    text = body.get("config")
    if text is not None and not isinstance(text, str):
        raise HTTPException(422, "config is the candidate routes.yaml as a string")
    try:
        cfg = running if text is None else _candidate(runtime, text)
    except ConfigError as exc:
        return JSONResponse({"detail": "the candidate config is invalid",
                             "errors": [i.as_dict() for i in exc.issues]}, status_code=422)
    try:
        if "tests" in body:
            tests = _yaml_or_value(body["tests"])
            if isinstance(tests, list) and len(tests) > MAX_TESTS:
                raise SampleError(f"at most {MAX_TESTS} tests in one request")
            cases = run_tests(cfg, {"tests": tests})
            return JSONResponse({"version": cfg.version, "tests": [
                {"name": c.name, "ok": c.ok, "failures": c.failures, "result": c.result} for c in cases]})
        messages = body.get("messages", [body["message"]] if "message" in body else None)
        if not isinstance(messages, list) or not messages:
            raise SampleError("give message (one sample), messages (a list) or tests")
        results = []
        for i, sample in enumerate(messages[:MAX_SAMPLES]):
            try:
                results.append(dry_run(cfg, sample_envelope(_yaml_or_value(sample), cfg)))
            except SampleError as exc:
                raise SampleError(f"messages[{i}]: {exc}") from None
    except SampleError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    return JSONResponse({"version": cfg.version, "sent": False, "results": results})


def _candidate(runtime: AdminPort, text: str) -> LoadedConfig:
    path = runtime.config_path or "routes.yaml"
    return load_config_text(text, file=path, base_dir=os.path.dirname(os.path.abspath(path)),
                            registry=runtime.registry)


def _history_text(runtime: AdminPort, version: str) -> str:
    if version == runtime.config.version:
        return runtime.config.source.text
    text = runtime.history_text(version)
    if text is None:
        raise HTTPException(404, f"version {version!r} is not in the history")
    return text


def _candidate_text(raw: bytes, content_type: str, current: str, file: str) -> str:
    """The candidate routes.yaml of a request: YAML text, {"yaml": text}, or JSON top-level keys
    to merge into the current file (round-trip: comments and layout stay). ConfigError for text
    that is not UTF-8 (with its line)."""
    text = decode(raw, file)
    if "json" not in content_type:
        return text
    body = parse_json(raw)
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
            return load_data(raw)
        except ConfigError as exc:
            from gateway.dryrun import SampleError

            raise SampleError(f"the sample is not valid YAML/JSON: {exc}") from None
    return raw
