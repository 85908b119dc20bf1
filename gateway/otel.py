"""OpenTelemetry spans for the delivery (``gateway.tracing.enabled``; the ``otel`` extra).

The only module that imports OpenTelemetry, and only :func:`gateway.runtime.build_tracing` imports it. It
records, with the ids the gateway carries (the W3C context in the envelope's attributes):

* one span per inbound message (``CONSUMER`` for brokers and mail, ``SERVER`` for REST and
  SOAP), a child of the sender's context; its ids become the envelope's context, its
  ``traceparent`` the outcome's;
* one ``INTERNAL`` span per matched route, a child of the inbound span; the route's planned
  envelopes carry its context, in memory and in the spool;
* one span per target attempt (``PRODUCER``, ``CLIENT`` for HTTP peers), a child of the route's
  span; its ids are what the connector writes into the outbound message. A failed attempt has
  status ERROR and the events ``gateway.retry``, ``gateway.dead_letter`` or ``gateway.dropped``
  the delivery noted.

Attributes follow the OpenTelemetry semantic conventions for messaging (``messaging.system``,
``messaging.destination.name``, ``messaging.operation.type``, ``messaging.message.id``...) and
HTTP (``http.request.method``, ``http.response.status_code``, ``url.path``,
``server.address``...), where the gateway knows them, plus ``gateway.envelope.id``,
``gateway.route`` and ``gateway.connector``.

The SDK's pipeline from the finished span on: a :class:`~opentelemetry.sdk.trace.ReadableSpan`
handed to its :class:`~opentelemetry.sdk.trace.export.BatchSpanProcessor`, which exports from its
own thread with the SDK's OTLP/HTTP exporter; when its queue is full a span is dropped and counted
(``gateway_tracing_spans_dropped_total``), the event loop never waits. Not the SDK's ``Tracer``:
the gateway already has the ids, the parent and the sampling decision of every span (the W3C
context it carries), and the tracer's own bookkeeping (its context objects, locks and the
validation of each attribute) cost five times what the span itself does (bench/bench_tracing.py).
The sampling is the SDK's ParentBased(TraceIdRatio): a sender's sampled flag is followed, a new
trace is recorded when its id falls under the ratio's bound. No global tracer provider is set:
the admin API's FastAPI would otherwise trace every probe and scrape.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from contextvars import Token
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway import tracecontext
from gateway.config.models import TracingSettings, current_secret
from gateway.contract import Connector, GatewayError, Outcome, PermanentError, Reply, Target
from gateway.envelope import Envelope
from gateway.metrics import Counter, Metrics
from gateway.routing.router import CompiledRoute, Planned
from gateway.tracecontext import SAMPLED, TraceContext
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
_UNSET = Status(StatusCode.UNSET)


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


class _Span:
    """A span being recorded (only sampled ones are): what becomes its ReadableSpan at the end."""

    __slots__ = ("_owner", "attributes", "context", "events", "kind", "name", "parent", "start", "status")

    def __init__(self, owner: OtelTracing, name: str, kind: SpanKind, context: TraceContext,
                 parent: TraceContext | None, attributes: dict[str, Any], remote_parent: bool = False):
        self._owner = owner
        self.name = name
        self.kind = kind
        self.context = owner.span_context(context, False)
        self.parent = owner.span_context(parent, remote_parent) if parent is not None else None
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = _UNSET
        self.start = time.time_ns()

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        self.events.append(Event(name, attributes))

    def end(self) -> None:
        owner = self._owner
        span = ReadableSpan(self.name, self.context, self.parent, owner.resource, self.attributes, self.events,
                            (), self.kind, status=self.status, start_time=self.start, end_time=time.time_ns(),
                            instrumentation_scope=owner.scope)
        for processor in owner.processors:
            processor.on_end(span)


class OtelHop(Hop):
    __slots__ = ("_span",)

    def __init__(self, context: TraceContext, span: _Span | None):
        super().__init__(context)
        self._span = span

    def finish(self, outcome: Outcome) -> Outcome:
        span = self._span
        if span is not None:
            span.attributes["gateway.outcome"] = outcome.status.value
            if outcome.status.value in ("retry", "rejected"):
                span.attributes["error.type"] = outcome.status.value
                span.status = Status(StatusCode.ERROR, outcome.reason[:200])
            span.end()
        return super().finish(outcome)


class OtelAttempt(Attempt):
    __slots__ = ("_span", "_token")

    def __init__(self, envelope: Envelope, context: TraceContext, span: _Span | None):
        super().__init__(envelope, context)
        self._span = span
        self._token: Token[Any] | None = None

    @property
    def exemplar(self) -> dict[str, str] | None:
        return {"trace_id": self.context.trace_id} if self._span is not None else None

    def failed(self, error: BaseException) -> None:
        span = self._span
        if span is not None:
            kind = ("permanent" if isinstance(error, PermanentError) else "timeout"
                    if isinstance(error, TimeoutError) else "transient" if isinstance(error, GatewayError)
                    else type(error).__qualname__)
            span.attributes["error.type"] = kind
            status = error.detail.get("status") if isinstance(error, GatewayError) else None
            if isinstance(status, int):  # the peer's own answer (REST, SOAP), not the gateway's
                span.attributes["http.response.status_code"] = status
            span.status = Status(StatusCode.ERROR, str(error)[:200] or kind)
            self._token = _settling.set(span)

    def end(self, reply: Reply | None = None) -> None:
        span = self._span
        if span is None:
            return
        if self._token is not None:
            _settling.reset(self._token)
            self._token = None
        if reply is not None and span.kind is SpanKind.CLIENT:
            span.attributes["http.response.status_code"] = reply.status
        span.end()


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
        self.resource = Resource.create({"service.name": settings.service_name})
        self.scope = InstrumentationScope("gateway")
        self.processor = _Processor(exporter, settings, self.dropped)
        #: Where finished spans go (the batch processor; a test adds its own).
        self.processors: list[SpanProcessor] = [self.processor]
        #: New traces whose id's low 64 bits fall under this are recorded (TraceIdRatio's rule).
        self._bound = TraceIdRatioBased.get_bound_for_rate(settings.sample_ratio)
        self._timeout_ms = int(settings.export_timeout * 1000)
        self._states: dict[str, TraceState] = {}
        #: Static attributes of each outbound connector's attempts (its peer's address).
        self._peers: weakref.WeakKeyDictionary[Connector, dict[str, Any]] = weakref.WeakKeyDictionary()

    def span_context(self, ctx: TraceContext, remote: bool) -> SpanContext:
        state = None
        if ctx.state:
            state = self._states.get(ctx.state)
            if state is None:  # a sender's vendor state: parsed once per distinct value, a few kept
                if len(self._states) >= 64:
                    self._states.clear()
                state = self._states[ctx.state] = TraceState.from_header([ctx.state])
        return SpanContext(int(ctx.trace_id, 16), int(ctx.span_id, 16), remote, TraceFlags(ctx.flags), state)

    def _new_trace(self) -> TraceContext:
        ctx = tracecontext.new_trace()
        if int(ctx.trace_id[16:], 16) < self._bound:
            return ctx
        return dataclasses.replace(ctx, flags=ctx.flags & ~SAMPLED)

    def received(self, env: Envelope) -> tuple[Envelope, Hop]:
        parent = tracecontext.of(env)
        ctx = parent.child() if parent is not None else self._new_trace()
        span = None
        if ctx.sampled:
            protocol = env.protocol
            attrs: dict[str, Any] = {"gateway.envelope.id": env.id, "gateway.connector": env.source}
            if protocol in _HTTP:
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
                attrs.update({"messaging.system": _SYSTEM.get(protocol, protocol),
                              "messaging.operation.type": "process", "messaging.destination.name": env.subject,
                              "messaging.message.id": env.id, "messaging.message.body.size": len(env.body)})
                if env.correlation_id:
                    attrs["messaging.message.conversation_id"] = env.correlation_id
                name, kind = f"process {env.source}", SpanKind.CONSUMER
            span = _Span(self, name, kind, ctx, parent, attrs, remote_parent=True)
        return tracecontext.with_context(env, ctx), OtelHop(ctx, span)

    def routed(self, env: Envelope, route: CompiledRoute, plans: list[Planned | Any]) -> list[Planned | Any]:
        parent = tracecontext.of(env)
        if parent is None or not parent.sampled:
            return plans  # not recorded: the attempts are children of the hop
        ctx = parent.child()
        _Span(self, f"route {route.name}", SpanKind.INTERNAL, ctx, parent, {"gateway.route": route.name}).end()
        return [dataclasses.replace(p, envelope=tracecontext.with_context(p.envelope, ctx))
                if isinstance(p, Planned) else p for p in plans]

    def attempt(self, env: Envelope, spec: Target, conn: Connector, number: int = 1) -> Attempt:
        parent = tracecontext.of(env)
        ctx = parent.child() if parent is not None else self._new_trace()
        span = None
        if ctx.sampled:
            kind_name = conn.kind
            attrs: dict[str, Any] = {"gateway.envelope.id": env.id, "gateway.route": spec.route,
                                     "gateway.connector": spec.connector, "gateway.attempt": number}
            attrs.update(self._peer(conn))
            options = spec.options
            if kind_name in _HTTP:
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
                attrs.update({"messaging.system": _SYSTEM.get(kind_name, kind_name),
                              "messaging.operation.type": "send", "messaging.message.id": env.id})
                if isinstance(dest, str) and dest:
                    attrs["messaging.destination.name"] = dest
                name, kind = f"send {spec.connector}", SpanKind.PRODUCER
            span = _Span(self, name, kind, ctx, parent, attrs)
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
        for processor in self.processors:
            processor.shutdown()
