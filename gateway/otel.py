"""OpenTelemetry spans for the delivery (``gateway.tracing.enabled``; the ``otel`` extra).

The only module that imports OpenTelemetry, and only :func:`gateway.tracing.build` imports it. It
records, with the ids the gateway carries (the W3C context in the envelope's attributes):

* one span per inbound message (``CONSUMER`` for brokers and mail, ``SERVER`` for REST and
  SOAP), a child of the sender's context; its ids become the envelope's context, its
  ``traceparent`` the outcome's;
* one ``INTERNAL`` span per matched route, a child of the inbound span; the route's planned
  envelopes carry its context, in memory and in the spool;
* one span per target attempt (``PRODUCER``, ``CLIENT`` for HTTP peers), a child of the route's
  span; its ids are what the connector writes into the outbound message. A failed attempt has
  status ERROR and the events ``gateway.retry`` or ``gateway.dead_letter`` the delivery noted.

Attributes follow the OpenTelemetry semantic conventions for messaging (``messaging.system``,
``messaging.destination.name``, ``messaging.operation.type``, ``messaging.message.id``...) and
HTTP (``http.request.method``, ``http.response.status_code``, ``url.path``,
``server.address``...), where the gateway knows them, plus ``gateway.envelope.id``,
``gateway.route`` and ``gateway.connector``.

Its own :class:`~opentelemetry.sdk.trace.TracerProvider`, never the global one: the admin API's
FastAPI would otherwise trace every probe and scrape. Finished spans go to a
:class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor`, which exports from its own thread;
when its queue is full a span is dropped and counted (``gateway_tracing_spans_dropped_total``),
the event loop never waits.
"""

from __future__ import annotations

import dataclasses
import weakref
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway import tracecontext
from gateway.config.models import TracingSettings, current_secret
from gateway.contract import Connector, GatewayError, Outcome, PermanentError, Reply, Target
from gateway.envelope import Envelope
from gateway.metrics import Counter, Metrics
from gateway.routing.router import CompiledRoute, Planned
from gateway.tracecontext import TraceContext
from gateway.tracing import Attempt, Hop, Tracing, _settling

#: ``messaging.system`` by connector kind / envelope protocol (the conventions' value where one
#: exists: RabbitMQ for AMQP 0-9-1).
_SYSTEM = {"amqp": "rabbitmq"}
#: Kinds whose peers speak HTTP: their spans are SERVER (inbound) and CLIENT (attempts).
_HTTP = frozenset({"rest", "soap"})
#: Where an attempt of each kind sends to (``messaging.destination.name``): a target option, or
#: the connector's own config for kinds with one destination (a file, a Maildir). Mail and XMPP
#: recipients are people's addresses: not recorded.
_DESTINATION = {"mqtt": ("options", "topic"), "amqp": ("options", "exchange"), "file": ("config", "path"),
                "maildir": ("config", "path")}


def _parent(ctx: TraceContext | None) -> Context | None:
    if ctx is None:
        return None
    state = TraceState.from_header([ctx.state]) if ctx.state else None
    sc = SpanContext(int(ctx.trace_id, 16), int(ctx.span_id, 16), is_remote=True,
                     trace_flags=TraceFlags(ctx.flags), trace_state=state)
    return set_span_in_context(NonRecordingSpan(sc))


def _context(span: Span, state: str) -> TraceContext:
    sc = span.get_span_context()
    return TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", int(sc.trace_flags), state)


class _NoExport(SpanExporter):
    """``exporter: none``: spans are made and batched as for a collector, then discarded."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _Processor(BatchSpanProcessor):
    """The SDK's batch processor, with a full queue counted in our metric (the SDK logs a
    warning per dropped span instead: on the event loop, as often as messages arrive)."""

    def __init__(self, exporter: SpanExporter, settings: TracingSettings, dropped: Counter):
        super().__init__(exporter, max_queue_size=settings.max_queue, max_export_batch_size=min(
            settings.max_batch, settings.max_queue), export_timeout_millis=settings.export_timeout * 1000)
        self._dropped = dropped
        inner = getattr(self, "_batch_processor", None)
        # A private deque: when a release renames it, drops are still bounded (by the SDK), just
        # logged instead of counted.
        self._queue: Any = getattr(inner, "_queue", None)
        self._limit = settings.max_queue

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= self._limit:
            self._dropped.inc()
            return
        super().on_end(span)


class OtelHop(Hop):
    __slots__ = ("_span",)

    def __init__(self, context: TraceContext, span: Span):
        super().__init__(context)
        self._span = span

    def finish(self, outcome: Outcome) -> Outcome:
        span = self._span
        if span.is_recording():
            span.set_attribute("gateway.outcome", outcome.status.value)
            if outcome.status.value in ("retry", "rejected"):
                span.set_attribute("error.type", outcome.status.value)
                span.set_status(Status(StatusCode.ERROR, outcome.reason[:200]))
        span.end()
        return super().finish(outcome)


class OtelAttempt(Attempt):
    __slots__ = ("_span", "_token")

    def __init__(self, envelope: Envelope, context: TraceContext, span: Span):
        super().__init__(envelope, context)
        self._span = span
        self._token: Token[Any] | None = None

    @property
    def exemplar(self) -> dict[str, str] | None:
        return {"trace_id": self.context.trace_id} if self.context.sampled else None

    def failed(self, error: BaseException) -> None:
        span = self._span
        if span.is_recording():
            kind = ("permanent" if isinstance(error, PermanentError) else "timeout"
                    if isinstance(error, TimeoutError) else "transient" if isinstance(error, GatewayError)
                    else type(error).__qualname__)
            span.set_attribute("error.type", kind)
            status = error.detail.get("status") if isinstance(error, GatewayError) else None
            if isinstance(status, int):  # the peer's own answer (REST, SOAP), not the gateway's
                span.set_attribute("http.response.status_code", status)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200] or kind))
            self._token = _settling.set(self)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self._span.add_event(name, attributes)

    def end(self, reply: Reply | None = None) -> None:
        if self._token is not None:
            _settling.reset(self._token)
            self._token = None
        if reply is not None and self._span.is_recording():
            self._span.set_attribute("http.response.status_code", reply.status)
        self._span.end()


class OtelTracing(Tracing):
    """Trace context with spans (see the module's docstring)."""

    enabled = True

    def __init__(self, settings: TracingSettings, metrics: Metrics):
        self.dropped = Counter("gateway_tracing_spans_dropped_total",
                               "Finished spans dropped because the export queue was full.",
                               registry=metrics.registry)
        exporter: SpanExporter
        if settings.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            headers = {k: current_secret(v) for k, v in settings.headers.items()}
            exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=headers or None,
                                        timeout=settings.export_timeout)
        else:
            exporter = _NoExport()
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                                       sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)))
        self.processor = _Processor(exporter, settings, self.dropped)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("gateway")
        self._timeout_ms = int(settings.export_timeout * 1000)
        #: Static attributes of each outbound connector's attempts (its peer's address).
        self._peers: weakref.WeakKeyDictionary[Connector, dict[str, Any]] = weakref.WeakKeyDictionary()

    def received(self, env: Envelope) -> tuple[Envelope, Hop]:
        parent = tracecontext.of(env)
        protocol = env.protocol
        http = protocol in _HTTP
        attrs: dict[str, Any] = {"gateway.envelope.id": env.id, "gateway.connector": env.source}
        if http:
            method = str(env.attributes.get("http_method") or "POST")
            attrs["http.request.method"] = method
            if protocol == "rest":
                attrs["url.path"] = env.subject
            else:
                attrs["rpc.system"] = "soap"
                attrs["rpc.method"] = env.subject
            peer = env.attributes.get("peer")
            if isinstance(peer, str) and peer:
                attrs["client.address"] = peer.rpartition(":")[0] or peer
            name, kind = f"{method} {env.source}", SpanKind.SERVER
        else:
            attrs.update({"messaging.system": _SYSTEM.get(protocol, protocol), "messaging.operation.type": "process",
                          "messaging.destination.name": env.subject, "messaging.message.id": env.id,
                          "messaging.message.body.size": len(env.body)})
            if env.correlation_id:
                attrs["messaging.message.conversation_id"] = env.correlation_id
            name, kind = f"process {env.source}", SpanKind.CONSUMER
        span = self.tracer.start_span(name, context=_parent(parent), kind=kind, attributes=attrs)
        ctx = _context(span, parent.state if parent is not None else "")
        return tracecontext.with_context(env, ctx), OtelHop(ctx, span)

    def routed(self, env: Envelope, route: CompiledRoute, plans: list[Planned | Any]) -> list[Planned | Any]:
        parent = tracecontext.of(env)
        span = self.tracer.start_span(f"route {route.name}", context=_parent(parent), kind=SpanKind.INTERNAL,
                                      attributes={"gateway.route": route.name})
        span.end()
        ctx = _context(span, parent.state if parent is not None else "")
        return [dataclasses.replace(p, envelope=tracecontext.with_context(p.envelope, ctx))
                if isinstance(p, Planned) else p for p in plans]

    def attempt(self, env: Envelope, spec: Target, conn: Connector, number: int = 1) -> Attempt:
        parent = tracecontext.of(env)
        kind_name = conn.kind
        http = kind_name in _HTTP
        attrs: dict[str, Any] = {"gateway.envelope.id": env.id, "gateway.route": spec.route,
                                 "gateway.connector": spec.connector, "gateway.attempt": number}
        attrs.update(self._peer(conn))
        options = spec.options
        if http:
            method = str(getattr(options, "method", "POST"))
            attrs["http.request.method"] = method
            path = getattr(options, "path", None)
            if isinstance(path, str):
                attrs["url.path"] = path
            if number > 1:
                attrs["http.request.resend_count"] = number - 1
            name, kind = f"{method} {spec.connector}", SpanKind.CLIENT
        else:
            where, field = _DESTINATION.get(kind_name, ("", ""))
            dest = getattr(options, field, None) if where == "options" else None
            if kind_name == "amqp":
                key = getattr(options, "routing_key", None) or env.subject
                attrs["messaging.rabbitmq.destination.routing_key"] = str(key)
            attrs.update({"messaging.system": _SYSTEM.get(kind_name, kind_name), "messaging.operation.type": "send",
                          "messaging.message.id": env.id})
            if isinstance(dest, str) and dest:
                attrs["messaging.destination.name"] = dest
            name, kind = f"send {spec.connector}", SpanKind.PRODUCER
        span = self.tracer.start_span(name, context=_parent(parent), kind=kind, attributes=attrs)
        ctx = _context(span, parent.state if parent is not None else "")
        return OtelAttempt(tracecontext.with_context(env, ctx), ctx, span)

    def _peer(self, conn: Connector) -> dict[str, Any]:
        """Attributes every attempt of a connector shares: its configured peer's ``server.address``
        and ``server.port`` (never its credentials), the destination of a one-destination kind."""
        try:
            return self._peers[conn]
        except (KeyError, TypeError):
            pass
        out: dict[str, Any] = {}
        where, field = _DESTINATION.get(conn.kind, ("", ""))
        path = getattr(conn.config, field, None) if where == "config" else None
        if isinstance(path, str):
            out["messaging.destination.name"] = path
        url = getattr(conn.config, "base_url", None) or getattr(conn.config, "url", None)
        if isinstance(url, str) and "://" in url:
            try:
                parts = urlsplit(url)
                if parts.hostname:
                    out["server.address"] = parts.hostname
                if parts.port:
                    out["server.port"] = parts.port
            except ValueError:
                pass
        try:
            self._peers[conn] = out
        except TypeError:
            pass
        return out

    def shutdown(self) -> None:
        # The SDK's processor would wait 30 s for a collector that does not answer; ours waits
        # export_timeout (through the private batcher when it is there, else the SDK's own wait).
        batcher = getattr(self.processor, "_batch_processor", None)
        if batcher is not None:
            batcher.shutdown(timeout_millis=self._timeout_ms)
        self.provider.shutdown()
