"""Request bodies of the admin API: read up to a limit (``413`` beyond it), JSON objects only."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request

#: Largest config text or request body the config API reads.
MAX_CONFIG_BYTES = 1024 * 1024


async def read_json(request: Request, limit: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    try:
        body = json.loads(await read_body(request, limit) or b"{}")
    except ValueError:
        raise HTTPException(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(422, "body must be a JSON object")
    return body


async def read_body(request: Request, limit: int) -> bytes:
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

