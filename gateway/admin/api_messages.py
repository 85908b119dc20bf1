"""The provenance API: what happened to one message, by any of its ids."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, HTTPException

from gateway.admin.auth import Principal
from gateway.admin.port import AdminPort

#: Longest id a lookup takes (the store keeps ids cut to 200 characters).
_MAX_ID = 1000


def messages_api(app: FastAPI, runtime: AdminPort, auth: Any) -> None:
    """``GET /api/messages/{id}`` (viewer role)."""

    @app.get("/api/messages/{key:path}")  # a Message-ID may hold a "/"
    async def message(key: str, _: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        """The records ``key`` names (envelope id, trace id or traceparent, Message-ID, correlation
        id, Idempotency-Key), in the order they arrived, each with its events in time order."""
        import sqlite3

        if not key.strip() or len(key) > _MAX_ID:
            raise HTTPException(422, f"give an id of 1 to {_MAX_ID} characters")
        if not runtime.config.model.gateway.provenance.enabled:
            raise HTTPException(404, "provenance is off (gateway.provenance.enabled: false)")
        try:
            records = await runtime.message_records(key)
        except sqlite3.Error as exc:
            raise HTTPException(503, f"the provenance store cannot be read now: {exc}") from None
        if not records:
            raise HTTPException(404, f"no message known by {key!r} (kept for "
                                     f"{runtime.config.model.gateway.provenance.retention:g} s)")
        return {"id": key, "messages": records}
