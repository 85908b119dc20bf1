"""Request bodies of the admin API: read up to a limit (``413`` beyond it), JSON objects only.

The config API reads configs up to ``gateway.admin.max_config_bytes``; every other body (login,
dead letters) up to :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request

from gateway.config.models import AdminSettings
from gateway.envelope import PARSE_INLINE_BYTES, json_steps

#: Largest JSON body the admin API reads where no other limit applies.
MAX_BODY_BYTES = 1024 * 1024
#: The default of ``gateway.admin.max_config_bytes``.
MAX_CONFIG_BYTES: int = AdminSettings.model_fields["max_config_bytes"].default


async def read_json(request: Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    return parse_json(await read_body(request, limit))


def parse_json(raw: bytes) -> dict[str, Any]:
    """A JSON object (400 for what is not JSON, 422 for JSON that is not an object).

    A body past ``PARSE_INLINE_BYTES`` is parsed in steps with the bounds of message bodies
    (nesting, values): called in a worker thread, the event loop takes the GIL between the steps,
    where ``json.loads`` would hold it for the whole document.
    """
    try:
        if len(raw) <= PARSE_INLINE_BYTES:
            body = json.loads(raw or b"{}")
        else:
            steps = json_steps(raw)
            while True:
                next(steps)
    except StopIteration as done:
        body = done.value
    except (ValueError, RecursionError):  # RecursionError: arrays or objects nested thousands deep
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
