"""The dead-letter API: list, show, replay (to the original or another connector) and purge."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request

from gateway.admin.auth import Principal
from gateway.admin.body import read_json
from gateway.admin.port import AdminPort
from gateway.logs import event

#: The logger of the gateway's own events (who replayed or purged what).
_log = logging.getLogger("gateway")


def dead_letters_api(app: FastAPI, runtime: AdminPort, auth: Any, editor: Any) -> None:
    """``GET /api/dead-letters``, ``GET /api/dead-letters/{id}``, ``POST .../replay`` and ``POST .../purge``."""

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
            items, total = await runtime.dead_letters(flt, limit)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot be read now: {exc}") from None
        return {"dead_letters": [dl.summary(d) for d in items], "total": total}

    @app.get("/api/dead-letters/{dl_id}")
    async def dead_letter(dl_id: int, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        item = await runtime.dead_letter(dl_id)
        if item is None:
            raise HTTPException(404, f"no dead letter {dl_id}")
        return item.as_dict()

    @app.post("/api/dead-letters/replay")
    async def replay(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        """``{"ids": [...]}`` or ``{"filter": {route, connector, reason, envelope_id, since, until}}``
        or ``{"all": true}``; ``"connector"`` sends them to that connector instead of the original."""
        from gateway.delivery import deadletters as dl
        from gateway.delivery.store import SpoolError

        body = await read_json(request)
        try:
            ids, flt = dl.selection_from(body, filter_at="filter")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        to = body.get("connector")
        if to is not None:
            target = runtime.connectors().get(to) if isinstance(to, str) else None
            if target is None or not target.outbound:
                raise HTTPException(422, f"connector {to!r} is not a configured outbound connector")
        try:
            count = await runtime.replay_dead_letters(ids, flt, connector=to, by=p.name)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot take the replay now: {exc}") from None
        event(_log, "dead_letters.replayed", by=p.name, count=count, to=to or "")
        return {"replayed": count}

    @app.post("/api/dead-letters/purge")
    async def purge(request: Request, p: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        """``{"ids": [...]}``, a filter (route, connector, reason, envelope_id, since, until), or ``{"all": true}``."""
        from gateway.delivery import deadletters as dl
        from gateway.delivery.store import SpoolError

        body = await read_json(request)
        try:
            ids, flt = dl.selection_from(body)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            n = await runtime.purge_dead_letters(ids, flt)
        except SpoolError as exc:
            raise HTTPException(503, f"the spool cannot purge now: {exc}") from None
        event(_log, "dead_letters.purged", by=p.name, count=n)
        return {"purged": n}
