"""The MQTT envelope mapping both ways (the options are in :mod:`connectors.mqtt.config`). Pure:
no sockets here.

The mapping works on plain values (topic, payload, a dict of MQTT 5 properties) so it is
table-tested without a broker; :mod:`connectors.mqtt` converts paho's objects at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.mqtt.config import MqttTarget, topic_error
from gateway.sdk import UNPARSED, Envelope, PermanentError, from_cloudevent, media_type, tracecontext

#: CloudEvents context attributes carried as MQTT 5 user properties (binary mode).
CE_CONTEXT = ("specversion", "id", "source", "type", "subject", "time", "dataschema")
_MAX_ID = 200
#: The user properties that carry the W3C trace context (the names of the W3C "Trace Context:
#: MQTT" draft, which are also the CloudEvents distributed tracing extension's in binary mode).
TRACE_PROPERTIES = (tracecontext.TRACEPARENT, tracecontext.TRACESTATE)
#: Header names never copied to user properties: the trace context goes out as the attempt's own.
_CE_TRACE = frozenset(f"ce-{k}" for k in TRACE_PROPERTIES)
_NOT_COPIED = frozenset((*TRACE_PROPERTIES, *_CE_TRACE))


# --- inbound: MQTT → envelope ----------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """One received PUBLISH as plain values."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    content_type: str | None = None
    user_properties: Sequence[tuple[str, str]] = ()
    correlation_data: bytes | None = None
    response_topic: str | None = None
    message_expiry: int | None = None
    payload_format: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def to_envelope(source: str, msg: Incoming, default_content_type: str, *, event: Any = UNPARSED) -> Envelope:
    """The envelope for one MQTT message.

    Subject is the topic. Attributes: ``mqtt.topic``, ``mqtt.qos``, ``mqtt.retain``, ``mqtt.dup``
    and, when present, ``mqtt.message_expiry`` and ``mqtt.payload_format``. MQTT 5 user
    properties become headers (a repeated name joins its values with ``, ``). CloudEvents binary
    mode (user properties ``specversion``, ``id``, ``source``, ``type``…) gives the envelope the
    event's id and ``ce-*`` headers; a structured event (``application/cloudevents+json``) is
    unpacked as the REST connector does.
    """
    attributes: dict[str, Any] = {"mqtt.topic": msg.topic, "mqtt.qos": msg.qos, "mqtt.retain": msg.retain,
                                  "mqtt.dup": msg.dup}
    if msg.message_expiry is not None:
        attributes["mqtt.message_expiry"] = msg.message_expiry
    if msg.payload_format is not None:
        attributes["mqtt.payload_format"] = msg.payload_format
    props: dict[str, str] = {}
    for key, value in msg.user_properties:
        props[key] = f"{props[key]}, {value}" if key in props else value
    if tracecontext.TRACEPARENT in props or tracecontext.TRACESTATE in props:
        attributes.update(tracecontext.inbound_attributes(props))
        props = {k: v for k, v in props.items() if k not in TRACE_PROPERTIES}
    content_type = msg.content_type or default_content_type
    correlation = _correlation(msg.correlation_data)
    if media_type(content_type) == "application/cloudevents+json":
        if event is UNPARSED:  # the inbound parses it first (json_or_none): here only small ones
            import json

            try:
                event = json.loads(msg.payload)
            except ValueError:
                event = None
        if isinstance(event, dict):
            try:
                ce = from_cloudevent(event, source=source, protocol="mqtt")
            except ValueError:
                ce = None
            if ce is not None:
                ce_headers, trace = _event_trace(ce.headers)
                if tracecontext.TRACEPARENT in attributes:
                    trace = {}
                return ce.evolve(subject=msg.topic, headers={**props, **ce_headers},
                                 attributes={**ce.attributes, **trace, **attributes}, correlation_id=correlation,
                                 reply_to=msg.response_topic)
    kwargs: dict[str, Any] = {}
    if all(props.get(k) for k in ("specversion", "id", "source", "type")):
        attributes.update(ce_source=props["source"], ce_type=props["type"])
        kwargs["id"] = props["id"][:_MAX_ID]
        props = {f"ce-{k}": v for k, v in props.items()}
    return Envelope(source=source, protocol="mqtt", subject=msg.topic, body=msg.payload, content_type=content_type,
                    headers=props, attributes=attributes, correlation_id=correlation,
                    reply_to=msg.response_topic, **kwargs)


def _correlation(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()


def _event_trace(headers: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A structured CloudEvent's distributed tracing extension, which ``from_cloudevent`` keeps as
    ``ce-traceparent``/``ce-tracestate`` headers: (the other headers, its context attributes).
    Used when the protocol's own field gave no context."""
    trace = tracecontext.inbound_attributes(lambda name: headers.get(f"ce-{name}"))
    return {k: v for k, v in headers.items() if k not in _CE_TRACE}, trace


# --- outbound: envelope → MQTT ---------------------------------------------------------------


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None = None
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    correlation_data: bytes | None = None
    response_topic: str | None = None
    message_expiry: int | None = None
    #: The ``traceparent``/``tracestate`` user properties, after the others: apart because they
    #: differ for every message while the rest is mostly shared by a route's messages.
    trace: list[tuple[str, str]] = field(default_factory=list)


def to_publish(env: Envelope, opts: MqttTarget, default_qos: int, max_payload: int) -> Outgoing:
    """What to publish for ``env``; raises :class:`PermanentError` when it cannot be published."""
    err = topic_error(opts.topic, opts.topic_levels)
    if err:
        raise PermanentError(f"topic {opts.topic!r}: {err}", code=422)
    if len(env.body) > max_payload:
        raise PermanentError(f"payload of {len(env.body)} bytes is over the limit of {max_payload}", code=413)
    if opts.response_topic is not None:
        response_topic: str | None = opts.response_topic
    else:
        response_topic = env.reply_to
    if response_topic is not None:
        rerr = topic_error(response_topic)
        if rerr:
            raise PermanentError(f"response topic {response_topic!r}: {rerr}", code=422)
    correlation = opts.correlation_data if opts.correlation_data is not None else env.correlation_id
    props = [(k, v) for k, v in env.headers.items() if k.lower() not in _NOT_COPIED]
    if opts.cloudevents:
        props = ce_properties(env) + [(k, v) for k, v in props if not k.lower().startswith("ce-")]
    expiry = int(opts.message_expiry) if opts.message_expiry else None
    return Outgoing(
        topic=opts.topic, payload=env.body, qos=default_qos if opts.qos is None else opts.qos, retain=opts.retain,
        content_type=env.content_type, user_properties=props,
        correlation_data=correlation.encode("utf-8") if correlation else None,
        response_topic=response_topic or None, message_expiry=expiry,
        trace=list(tracecontext.outbound_fields(env).items()),
    )


def ce_properties(env: Envelope) -> list[tuple[str, str]]:
    """CloudEvents binary mode for MQTT 5: context attributes and extensions as user properties."""
    out = [
        ("specversion", "1.0"), ("id", env.id),
        ("source", str(env.attributes.get("ce_source", f"/gateway/{env.source}"))),
        ("type", str(env.attributes.get("ce_type", f"gateway.{env.protocol}.message"))),
        ("time", env.time.isoformat().replace("+00:00", "Z")),
    ]
    if env.subject:
        out.append(("subject", env.subject))
    seen = {k for k, _ in out}
    for key, value in env.headers.items():
        name = key.lower()
        if name.startswith("ce-") and name[3:].isalnum() and name[3:] not in seen and name not in _NOT_COPIED:
            out.append((name[3:], value))
    return out
