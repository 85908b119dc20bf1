"""The connector SDK: the one module of the core a connector imports.

A connector (ours in ``connectors/``, or a third party's behind an entry point in the
``gateway.connectors`` group) imports from the core only ``gateway.sdk``; ``make lint`` enforces
that for ours (import-linter, ``[tool.importlinter]`` in pyproject.toml). Everything else in
``gateway`` may change shape from one release to the next.

The surface
-----------
* The contract (:mod:`gateway.contract`): :class:`Connector`, :class:`ConnectorConfig`,
  :class:`ConnectorContext`, :class:`TargetOptions`, :class:`Target`, :data:`Deliver`,
  :class:`Outcome`, :class:`Status`, :class:`Reply`, :class:`Health`, the errors
  :class:`GatewayError`, :class:`TransientError`, :class:`PermanentError`, and the substitution
  rules :class:`SubstitutionCheck`, :class:`TemplateText`, :data:`ONE_LINE`, :func:`one_line`.
* The envelope (:mod:`gateway.envelope`): :class:`Envelope`, :func:`from_cloudevent`,
  :func:`media_type`, :func:`is_json_type`, :func:`is_xml_type`, :func:`json_depth_exceeds`,
  :func:`json_or_none` (a body as JSON without holding the loop), :func:`structured_event`,
  :data:`PARSE_INLINE_BYTES`.
* Config field types (:mod:`gateway.config.models`): :data:`Duration` (``"30s"``),
  :data:`ByteSize` (``"10MiB"``), :data:`Secret` (``${ENV}`` or ``{file: …}``, never logged),
  :func:`current_secret` (a file secret read again), :class:`Strict` (a model refusing unknown keys).
* Logging: :func:`event` — one structured log line with a stable event name.
* HTTP, for connectors served on the shared listeners (``ctx.http.mount``): the ASGI types
  :data:`Scope`, :data:`Receive`, :data:`Send`; :func:`send_problem` (an RFC 9457 answer),
  :func:`read_body` (a bounded request body: :class:`BodyTooLarge`, :class:`ClientDisconnected`)
  and :func:`basic_authorization` (an ``Authorization: Basic`` value).
* Bounded async work: :class:`Deadlines` (cheap per-message timeouts), :class:`GroupThread` and
  :class:`Closed` (blocking work in groups on a thread), :func:`cancel_and_wait`, :func:`within`,
  :func:`retrieve`, :class:`InFlight` (what ``stop_listening(drain)`` waits for) and
  :class:`Backoff` (capped, jittered, resettable waits for every reconnect and retry loop).
* Trace context: :mod:`gateway.tracecontext` as ``tracecontext`` — :func:`~gateway.tracecontext.inbound_attributes`
  turns a sender's ``traceparent``/``tracestate`` into envelope attributes,
  :func:`~gateway.tracecontext.outbound_fields` gives the fields to write for an envelope being sent,
  :data:`~gateway.tracecontext.MAIL_HEADER` names the mail header.
* TLS for a listener: :class:`RenewingTls` (a server context whose certificate and key are read
  again when their files change, so a renewed certificate needs no restart).

The promise
-----------
Every name above keeps its meaning and signature within a major version: a connector written
against it needs no change when the core is refactored. A name is added here only when a
connector needs it; one that goes away is deprecated for a minor version first.
"""

from __future__ import annotations

from gateway import tracecontext
from gateway.config.models import ByteSize, Duration, Secret, Strict, current_secret
from gateway.contract import (
    ONE_LINE,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    GatewayError,
    Health,
    Outcome,
    PermanentError,
    Reply,
    Status,
    SubstitutionCheck,
    Target,
    TargetOptions,
    TemplateText,
    TransientError,
    one_line,
)
from gateway.deadlines import Deadlines
from gateway.envelope import (
    PARSE_INLINE_BYTES,
    UNPARSED,
    Envelope,
    from_cloudevent,
    is_json_type,
    is_xml_type,
    json_depth_exceeds,
    json_or_none,
    media_type,
    structured_event,
)
from gateway.groupthread import Closed, GroupThread
from gateway.http import (
    BodyTooLarge,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    basic_authorization,
    read_body,
    send_problem,
)
from gateway.logs import event
from gateway.tasks import Backoff, InFlight, cancel_and_wait, retrieve, within
from gateway.tls import RenewingTls

__all__ = [
    "ONE_LINE",
    "PARSE_INLINE_BYTES",
    "UNPARSED",
    "Backoff",
    "BodyTooLarge",
    "ByteSize",
    "ClientDisconnected",
    "Closed",
    "Connector",
    "ConnectorConfig",
    "ConnectorContext",
    "Deadlines",
    "Deliver",
    "Duration",
    "Envelope",
    "GatewayError",
    "GroupThread",
    "Health",
    "InFlight",
    "Outcome",
    "PermanentError",
    "Receive",
    "RenewingTls",
    "Reply",
    "Scope",
    "Secret",
    "Send",
    "Status",
    "Strict",
    "SubstitutionCheck",
    "Target",
    "TargetOptions",
    "TemplateText",
    "TransientError",
    "basic_authorization",
    "cancel_and_wait",
    "current_secret",
    "event",
    "from_cloudevent",
    "is_json_type",
    "is_xml_type",
    "json_depth_exceeds",
    "json_or_none",
    "media_type",
    "one_line",
    "read_body",
    "retrieve",
    "send_problem",
    "structured_event",
    "tracecontext",
    "within",
]
