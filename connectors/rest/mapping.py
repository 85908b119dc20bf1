"""HTTP ⇄ envelope for the REST connector: a received request to an envelope, an envelope to the
headers of a request sent. Pure functions; the sockets are in :mod:`connectors.rest.inbound` and
:mod:`connectors.rest.outbound`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from gateway.sdk import UNPARSED, Envelope, Scope, from_cloudevent, media_type, tracecontext

__all__ = ["http_headers", "request_headers", "to_envelope"]

_TRACE_FIELDS = (tracecontext.TRACEPARENT, tracecontext.TRACESTATE)
_CE_TRACE = frozenset(f"ce-{k}" for k in _TRACE_FIELDS)


def http_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI's raw headers by lower-case name; a repeated header's values joined with ``, ``."""
    out: dict[str, str] = {}
    for k, v in raw:
        key = k.decode("latin-1").lower()
        val = v.decode("latin-1")
        out[key] = f"{out[key]}, {val}" if key in out else val
    return out


def to_envelope(scope: Scope, headers: Mapping[str, str], body: bytes, *, source: str,
                secret_headers: set[str], event: Any = UNPARSED) -> Envelope:
    """The envelope of a received request: subject = path, ``x-*`` and ``ce-*`` headers kept
    (not ``secret_headers``), a CloudEvent (binary or structured mode) read as one, a valid
    ``traceparent``/``tracestate`` pair as the envelope's trace context attributes (an invalid one
    is ignored: the message starts a new trace).

    Raises ``ValueError`` for a request the caller must fix (the REST answer is 400).
    """
    content_type = headers.get("content-type", "application/octet-stream")
    query = scope.get("query_string", b"").decode("latin-1")
    client = scope.get("client")
    attributes: dict[str, Any] = {
        "http_method": scope["method"], "query": dict(parse_qsl(query)) if query else {},
        "peer": f"{client[0]}:{client[1]}" if client else "",
        **tracecontext.inbound_attributes(headers),  # the caller's W3C trace context, when valid
    }
    idem = headers.get("idempotency-key")
    if idem:
        if len(idem) > 200:
            raise ValueError("Idempotency-Key is longer than 200 characters")
        attributes["idempotency_key"] = idem
    kept = {k: v for k, v in headers.items() if (k.startswith("x-") or k.startswith("ce-"))
            and k not in secret_headers}
    mt = media_type(content_type)
    if mt == "application/cloudevents+json":
        if event is UNPARSED:  # the inbound parses it first (json_or_none): here only small ones
            try:
                event = json.loads(body)
            except ValueError:
                event = None
        if event is None:
            raise ValueError("the structured CloudEvent is not JSON the gateway reads: invalid, or past the nesting or "
                             "value bounds (see Limits)")
        event_obj = event
        if not isinstance(event_obj, dict):
            raise ValueError("a structured CloudEvent must be a JSON object")
        ce = from_cloudevent(event_obj, source=source, protocol="rest")
        ce_headers, trace = _event_trace(ce.headers)
        if tracecontext.TRACEPARENT in attributes:
            trace = {}
        return ce.evolve(subject=ce.subject or scope["path"], attributes={**ce.attributes, **trace, **attributes},
                         headers={**kept, **ce_headers})
    if "ce-specversion" in headers:
        missing = [h for h in ("ce-id", "ce-source", "ce-type") if not headers.get(h)]
        if missing:
            raise ValueError(f"binary-mode CloudEvent is missing {', '.join(missing)}")
        attributes.update(ce_source=headers["ce-source"], ce_type=headers["ce-type"])
        return Envelope(id=headers["ce-id"][:200], source=source, protocol="rest",
                        subject=headers.get("ce-subject") or scope["path"], body=body,
                        content_type=content_type, headers=kept, attributes=attributes)
    return Envelope(source=source, protocol="rest", subject=scope["path"], body=body,
                    content_type=content_type, headers=kept, attributes=attributes)

def _event_trace(headers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A structured CloudEvent's distributed tracing extension, which ``from_cloudevent`` keeps as
    ``ce-traceparent``/``ce-tracestate`` headers: (the other headers, its context attributes).
    Used when the protocol's own field gave no context."""
    trace = tracecontext.inbound_attributes(lambda name: headers.get(f"ce-{name}"))
    return {k: v for k, v in headers.items() if k not in _CE_TRACE}, trace



def request_headers(env: Envelope, route_headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a request sent for ``env``: its ``x-*`` and ``ce-*`` headers, the route's,
    its trace context (``traceparent``/``tracestate``: the context of this attempt, which a route
    cannot override), ``Idempotency-Key`` (the envelope id, so the receiver can deduplicate
    retries) and its content type unless the route set one. Credentials are added by the sender."""
    headers = {k: v for k, v in env.headers.items() if k.lower().startswith(("x-", "ce-"))}
    headers.update((k, v) for k, v in route_headers.items() if k.lower() not in _TRACE_FIELDS)
    headers.update(tracecontext.outbound_fields(env))
    headers["Idempotency-Key"] = env.id
    headers.setdefault("Content-Type", env.content_type)
    return headers
