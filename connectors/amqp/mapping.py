"""The AMQP 0-9-1 envelope mapping both ways (the options are in :mod:`connectors.amqp.config`).
Pure: no sockets here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from connectors.amqp.config import _EXCHANGE_NAME, AmqpTarget
from gateway.sdk import UNPARSED, Envelope, PermanentError, from_cloudevent, media_type, tracecontext

_CE_PREFIXES = ("cloudEvents:", "cloudEvents_")
_MAX_ID = 200
#: The application headers that carry the W3C trace context (``traceparent``/``tracestate``,
#: the names of the W3C "Trace Context: AMQP" draft); in CloudEvents binary mode the same context
#: is the distributed tracing extension, ``cloudEvents:traceparent``.
TRACE_HEADERS = (tracecontext.TRACEPARENT, tracecontext.TRACESTATE)
#: Header names never copied from an envelope: the trace context goes out as the attempt's own.
_CE_TRACE = frozenset(f"ce-{k}" for k in TRACE_HEADERS)
_NOT_COPIED = frozenset((*TRACE_HEADERS, *_CE_TRACE))


# --- inbound ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One consumed message as plain values."""

    body: bytes
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    content_type: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


def header_text(value: Any) -> str:
    """An AMQP field value as the envelope's str header value."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_jsonable, ensure_ascii=False, separators=(",", ":"))
    return "" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def to_envelope(source: str, msg: Delivery, default_content_type: str, *, event: Any = UNPARSED) -> Envelope:
    """The envelope for one consumed message.

    Subject is the routing key. Attributes ``amqp.exchange``, ``amqp.routing_key``,
    ``amqp.redelivered`` and each property that is set (``amqp.message_id``, ``amqp.type``,
    ``amqp.app_id``, ``amqp.priority``, ``amqp.delivery_mode``, ``amqp.expiration``,
    ``amqp.timestamp``, ``amqp.user_id``); headers = AMQP application headers as text, except
    ``traceparent``/``tracestate`` (or, in CloudEvents binary mode, ``cloudEvents:traceparent``/
    ``cloudEvents:tracestate``): a valid context becomes the envelope's trace context attributes,
    an invalid one is dropped (the message starts a new trace). The
    envelope id is the message id when it has one (stable across redeliveries) or the
    CloudEvents id in binary mode (``cloudEvents:*`` headers, which become ``ce-*`` headers).
    """
    attributes: dict[str, Any] = {"amqp.exchange": msg.exchange, "amqp.routing_key": msg.routing_key,
                                  "amqp.redelivered": msg.redelivered}
    for key in ("message_id", "type", "app_id", "priority", "delivery_mode", "expiration", "user_id"):
        value = getattr(msg, key)
        if value is not None:
            attributes[f"amqp.{key}"] = value
    if msg.timestamp is not None:
        attributes["amqp.timestamp"] = msg.timestamp.isoformat()
    if "x-delivery-count" in msg.headers:
        attributes["amqp.delivery_count"] = msg.headers["x-delivery-count"]
    headers: dict[str, str] = {}
    ce: dict[str, str] = {}
    for key, value in msg.headers.items():
        prefix = next((p for p in _CE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            ce[key[len(prefix):]] = header_text(value)
        else:
            headers[key] = header_text(value)
    trace = tracecontext.inbound_attributes(headers) or tracecontext.inbound_attributes(ce)
    for key in TRACE_HEADERS:
        headers.pop(key, None)
        ce.pop(key, None)
    attributes.update(trace)
    content_type = msg.content_type or default_content_type
    kwargs: dict[str, Any] = {}
    if msg.message_id:
        kwargs["id"] = msg.message_id[:_MAX_ID]
    if media_type(content_type) == "application/cloudevents+json":
        try:
            if event is UNPARSED:  # the inbound parses it first (json_or_none): here only small ones
                event = json.loads(msg.body)
            env = from_cloudevent(event, source=source, protocol="amqp") if isinstance(event, dict) else None
        except ValueError:
            env = None
        if env is not None:
            ce_headers, event_trace = _event_trace(env.headers)
            if trace:
                event_trace = {}
            return env.evolve(subject=msg.routing_key, headers={**headers, **ce_headers},
                              attributes={**env.attributes, **event_trace, **attributes},
                              correlation_id=msg.correlation_id,
                              reply_to=msg.reply_to)
    if all(ce.get(k) for k in ("specversion", "id", "source", "type")):
        attributes.update(ce_source=ce["source"], ce_type=ce["type"])
        kwargs["id"] = ce["id"][:_MAX_ID]
    headers.update({f"ce-{k}": v for k, v in ce.items()})
    return Envelope(source=source, protocol="amqp", subject=msg.routing_key, body=msg.body,
                    content_type=content_type, headers=headers, attributes=attributes,
                    correlation_id=msg.correlation_id, reply_to=msg.reply_to, **kwargs)


def _event_trace(headers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A structured CloudEvent's distributed tracing extension, which ``from_cloudevent`` keeps as
    ``ce-traceparent``/``ce-tracestate`` headers: (the other headers, its context attributes).
    Used when the protocol's own field gave no context."""
    trace = tracecontext.inbound_attributes(lambda name: headers.get(f"ce-{name}"))
    return {k: v for k, v in headers.items() if k not in _CE_TRACE}, trace


# --- outbound --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    exchange: str
    routing_key: str
    body: bytes
    mandatory: bool
    properties: dict[str, Any]


def to_publish(env: Envelope, opts: AmqpTarget, *, persistent: bool, mandatory: bool, max_body: int) -> Publish:
    """What to publish for ``env``; raises :class:`PermanentError` when it cannot be published."""
    exchange = opts.exchange
    if not _EXCHANGE_NAME.match(exchange):
        raise PermanentError(f"exchange name {exchange!r} is not valid (letters, digits, - _ . :, ≤ 127)", code=422)
    routing_key = opts.routing_key if opts.routing_key is not None else default_routing_key(env)
    if len(routing_key.encode("utf-8", "surrogatepass")) > 255:
        raise PermanentError("routing key is longer than 255 bytes", code=422)
    if "\0" in routing_key:
        raise PermanentError("routing key contains NUL", code=422)
    if len(env.body) > max_body:
        raise PermanentError(f"body of {len(env.body)} bytes is over the limit of {max_body}", code=413)
    headers: dict[str, Any] = {k: v for k, v in env.headers.items() if k.lower() not in _NOT_COPIED}
    trace = tracecontext.outbound_fields(env)
    if opts.cloudevents:
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("ce-")}
        headers.update({f"cloudEvents:{k}": v for k, v in ce_attributes(env).items()})
        headers.update({f"cloudEvents:{k}": v for k, v in trace.items()})
    headers.update(trace)
    props: dict[str, Any] = {
        "content_type": env.content_type,
        "headers": headers,
        "delivery_mode": 2 if (persistent if opts.persistent is None else opts.persistent) else 1,
        "message_id": env.id,
        "timestamp": env.time,
        "app_id": "gateway",
    }
    correlation = opts.correlation_id if opts.correlation_id is not None else env.correlation_id
    if correlation:
        props["correlation_id"] = correlation
    reply_to = opts.reply_to if opts.reply_to is not None else env.reply_to
    if reply_to:
        props["reply_to"] = reply_to
    if opts.expiration is not None:
        props["expiration"] = str(int(opts.expiration * 1000))
    if opts.priority is not None:
        props["priority"] = opts.priority
    if opts.message_type:
        props["type"] = opts.message_type
    return Publish(exchange=exchange, routing_key=routing_key, body=env.body,
                   mandatory=mandatory if opts.mandatory is None else opts.mandatory, properties=props)


def default_routing_key(env: Envelope) -> str:
    """The envelope subject; an MQTT topic becomes dotted (``a/b/c`` → ``a.b.c``) as RabbitMQ's
    MQTT plugin does."""
    if env.protocol == "mqtt":
        return env.subject.replace("/", ".")
    return env.subject


def ce_attributes(env: Envelope) -> dict[str, str]:
    out = {
        "specversion": "1.0", "id": env.id,
        "source": str(env.attributes.get("ce_source", f"/gateway/{env.source}")),
        "type": str(env.attributes.get("ce_type", f"gateway.{env.protocol}.message")),
        "time": env.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if env.subject:
        out["subject"] = env.subject
    for key, value in env.headers.items():
        name = key.lower()
        if name.startswith("ce-") and name[3:].isalnum() and name[3:] not in out and name not in _NOT_COPIED:
            out[name[3:]] = value
    return out
