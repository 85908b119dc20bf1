"""What a caller is told when the gateway could not answer with a reply. Pure.

Callers never see the gateway's internals (backend URLs, exception texts, stack traces): the
message comes from the outcome's code, plus what the upstream service itself said to its callers
(a SOAP faultstring, a problem+json ``detail``/``title``, validation errors). The full reason
is logged with the envelope id instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gateway.sdk import Outcome, Status

_REJECTED = {
    400: "the request was refused", 401: "the backend refused the gateway's credentials",
    403: "the request is not allowed", 404: "not found",
    409: "the request conflicts with the current state", 413: "the message is too large",
    415: "the message has an unsupported content type", 422: "the request was not accepted",
    501: "the operation is not supported by the gateway", 502: "the backend failed",
}


@dataclass
class Failure:
    client: bool  # the caller's fault (SOAP Client/Sender, HTTP 4xx) or not
    status: int  # HTTP status for a REST caller
    message: str
    retry_after: int | None = None
    #: What the upstream said: faultcode/faultstring/detail, errors, status.
    upstream: dict[str, Any] = field(default_factory=dict)


def describe(outcome: Outcome) -> Failure:
    detail = dict(outcome.detail or {})
    upstream: dict[str, Any] = {}
    said = upstream_message(detail)
    for key in ("faultcode", "faultstring", "detail", "subcodes", "errors"):
        if detail.get(key) is not None:
            upstream[key] = detail[key]
    if isinstance(detail.get("status"), int):
        upstream["status"] = detail["status"]
    if outcome.status is Status.RETRY:
        code = outcome.code if outcome.code in (502, 503, 504) else 503
        message = ("the service did not answer in time; retry later" if code == 504
                   else "the service is unavailable right now; retry later")
        return Failure(False, code, _join(message, said), int(max(1, outcome.retry_after or 5)), upstream)
    code = outcome.code if outcome.code and 400 <= outcome.code < 600 else 422
    message = _REJECTED.get(code, "the request was refused" if code < 500 else "the backend failed")
    return Failure(code < 500, code, _join(message, said), None, upstream)


def _join(message: str, said: str | None) -> str:
    return f"{message}: {said}" if said else message


def upstream_message(detail: dict[str, Any]) -> str | None:
    """The human message the upstream gave: a SOAP faultstring or a problem+json detail/title."""
    if detail.get("faultstring"):
        return str(detail["faultstring"])[:500]
    body = detail.get("body")
    if isinstance(body, str) and body.strip().startswith("{"):
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if isinstance(doc, dict):
            for key in ("detail", "title", "message", "error"):
                if isinstance(doc.get(key), str) and doc[key]:
                    return str(doc[key])[:500]
    return None
