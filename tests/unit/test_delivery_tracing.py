"""The delivery's W3C trace context (every hop and attempt) and, with ``gateway.tracing``, its spans.

Driven like an inbound connector drives the delivery (``deliver(env)``), with the scripted
connectors of test_delivery: what a sender gets back (``Outcome.traceparent``) and what each
target receives (the envelope's ``traceparent`` attribute, which outbound connectors write into
their protocol).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway import tracecontext as tc
from gateway.config.models import TracingSettings
from gateway.contract import Reply, Status, Target, TransientError
from gateway.envelope import Envelope
from gateway.otel import OtelTracing
from tests.gwtest import wait_for
from tests.unit.test_delivery import FAST, Harness, route

SENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _ctx(env: Envelope) -> tc.TraceContext:
    ctx = tc.of(env)
    assert ctx is not None, f"no trace context on {env.attributes}"
    return ctx


def _hop(traceparent: str | None) -> tc.TraceContext:
    ctx = tc.parse(traceparent)
    assert ctx is not None, f"no traceparent in the outcome: {traceparent!r}"
    return ctx


def _two_targets(mode: str = "spooled") -> str:
    return f"""  - name: r
    from: api
    mode: {mode}
    to: [{{connector: out}}, {{connector: other}}]
    {FAST}
"""


async def test_a_message_with_a_traceparent_keeps_its_trace(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        outcome = await h.send({"n": 1}, traceparent=SENT, tracestate="rojo=00f067aa0ba902b7")
        hop = _hop(outcome.traceparent)
        # The gateway's own hop: the sender's trace, a span of its own.
        assert hop.trace_id == TRACE and hop.span_id != "00f067aa0ba902b7" and hop.sampled
        await wait_for(lambda: h.out().delivered, what="delivery")
        sent = _ctx(h.out().calls[0][0])
        assert sent.trace_id == TRACE and sent.span_id not in (hop.span_id, "00f067aa0ba902b7")
        assert sent.state == "rojo=00f067aa0ba902b7"


async def test_a_message_without_one_starts_a_new_trace(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        first = _hop((await h.send({"n": 1})).traceparent)
        second = _hop((await h.send({"n": 2}, traceparent="00-zz-not-valid")).traceparent)
        assert first.trace_id != second.trace_id and TRACE not in (first.trace_id, second.trace_id)
        await wait_for(lambda: len(h.out().delivered) == 2, what="deliveries")
        assert {_ctx(e).trace_id for e, _ in h.out().calls} == {first.trace_id, second.trace_id}


async def test_each_target_attempt_gets_its_own_child_span(tmp_path: Path) -> None:
    for mode in ("spooled", "direct"):
        async with Harness(tmp_path / mode, _two_targets(mode)) as h:
            outcome = await h.send({"n": 1}, traceparent=SENT)
            hop = _hop(outcome.traceparent)
            await wait_for(lambda h=h: h.out().delivered and h.out("other").delivered, what=f"{mode} deliveries")
            a, b = _ctx(h.out().calls[0][0]), _ctx(h.out("other").calls[0][0])
            assert a.trace_id == b.trace_id == TRACE
            assert len({a.span_id, b.span_id, hop.span_id}) == 3, mode
            # Same message: the envelope id does not change with the context.
            assert h.out().calls[0][0].id == h.out("other").calls[0][0].id == outcome.envelope_id


async def test_a_retry_is_a_new_attempt_with_a_new_span_in_the_same_trace(tmp_path: Path) -> None:
    failures = 2

    async def flaky(env: Envelope, target: Target) -> Reply | None:
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientError("busy")
        return None

    async with Harness(tmp_path, route()) as h:
        h.out().behavior = flaky
        outcome = await h.send({"n": 1})
        await wait_for(lambda: h.out().delivered, what="delivery after two retries")
        contexts = [_ctx(e) for e, _ in h.out().calls]
        assert len(contexts) == 3
        assert {c.trace_id for c in contexts} == {_hop(outcome.traceparent).trace_id}
        assert len({c.span_id for c in contexts}) == 3


async def test_a_replayed_dead_letter_continues_the_same_trace(tmp_path: Path) -> None:
    from gateway.contract import PermanentError

    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("no")

    async with Harness(tmp_path, route()) as h:
        h.out().behavior = refuse
        outcome = await h.send({"n": 1}, traceparent=SENT)
        await wait_for(h.spool.count_dead_letters, what="dead letter")
        [dl] = await h.spool.dead_letters()
        h.out().behavior = lambda env, target: _none()
        await h.delivery.replayed(await h.spool.replay([dl.id]))
        await wait_for(lambda: h.out().delivered, what="the replay delivered")
        first, replayed = (_ctx(e) for e, _ in h.out().calls)
        assert first.trace_id == replayed.trace_id == TRACE and first.span_id != replayed.span_id
        assert h.out().calls[-1][0].id == outcome.envelope_id


async def _none() -> None:
    return None


async def test_every_answer_carries_the_hop_context(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(subject="/only"), unmatched="reject") as h:
        rejected = await h.send({"n": 1}, subject="/elsewhere", traceparent=SENT)
        assert rejected.status is Status.REJECTED and _hop(rejected.traceparent).trace_id == TRACE


def test_a_context_is_given_without_copying_or_parsing_the_message_again() -> None:
    env = Envelope(source="api", protocol="test", subject="/x", body=b'{"n": [1, 2, 3]}',
                   content_type="application/json", headers={"x-a": "1"}, attributes={"peer": "p"})
    data = env.data
    ctx = tc.new_trace()
    carried = tc.with_context(env, ctx)
    assert carried.data is data and carried.id == env.id and carried.headers == env.headers
    assert dict(carried.attributes) == {"peer": "p", "traceparent": ctx.traceparent}
    assert dict(env.attributes) == {"peer": "p"}  # the original is untouched
    assert Envelope.from_json(carried.to_json()).attributes["traceparent"] == ctx.traceparent


# --- OpenTelemetry spans ------------------------------------------------------------------


def _otel(h: Harness) -> InMemorySpanExporter:
    tracing = OtelTracing(TracingSettings(enabled=True, exporter="none"), h.metrics)
    memory = InMemorySpanExporter()
    tracing.processors.append(SimpleSpanProcessor(memory))
    h.delivery.tracing = h.delivery.dispatcher.tracing = tracing
    return memory


async def test_spans_inbound_route_attempt_with_the_gateway_ids(tmp_path: Path) -> None:
    failures = 1

    async def once_busy(env: Envelope, target: Target) -> Reply | None:
        nonlocal failures
        if failures:
            failures -= 1
            raise TransientError("busy", code=503)
        return None

    async with Harness(tmp_path, route()) as h:
        spans = _otel(h)
        h.out().behavior = once_busy
        outcome = await h.send({"n": 1}, traceparent=SENT)
        await wait_for(lambda: h.out().delivered, what="delivery")
        await wait_for(lambda: len(spans.get_finished_spans()) == 4, what="4 spans")
        by_name: dict[str, list] = {}
        for s in spans.get_finished_spans():
            by_name.setdefault(s.name, []).append(s)
        [inbound] = by_name["process api"]
        [routed] = by_name["route r"]
        failed, ok = sorted(by_name["send out"], key=lambda s: s.attributes["gateway.attempt"])
        hop = _hop(outcome.traceparent)
        # The inbound span is the gateway's hop: its ids are the answer's, its parent the sender's.
        assert (f"{inbound.context.trace_id:032x}", f"{inbound.context.span_id:016x}") == (hop.trace_id, hop.span_id)
        assert f"{inbound.parent.span_id:016x}" == "00f067aa0ba902b7" and inbound.kind is SpanKind.CONSUMER
        assert routed.parent.span_id == inbound.context.span_id and routed.kind is SpanKind.INTERNAL
        for attempt, (env, _) in zip((failed, ok), h.out().calls, strict=True):
            assert attempt.parent.span_id == routed.context.span_id and attempt.kind is SpanKind.PRODUCER
            # What the connector was handed is the attempt span's own context.
            assert _ctx(env).span_id == f"{attempt.context.span_id:016x}"
            assert attempt.attributes["gateway.envelope.id"] == outcome.envelope_id
            assert attempt.attributes["messaging.operation.type"] == "send"
        assert failed.status.status_code is StatusCode.ERROR and failed.attributes["error.type"] == "transient"
        assert [e.name for e in failed.events] == ["gateway.retry"] and failed.events[0].attributes["attempt"] == 1
        assert ok.status.status_code is StatusCode.UNSET and not ok.events
        assert inbound.attributes["messaging.destination.name"] == "/x"
        assert inbound.attributes["gateway.outcome"] == "accepted"
        assert routed.attributes["gateway.route"] == "r"
        # The delivery histogram's exemplar is the trace id, in the OpenMetrics format only.
        om, content_type = h.metrics.negotiate("application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text")
        assert f'trace_id="{TRACE}"' in om.decode()
        text, content_type = h.metrics.negotiate("text/plain")
        assert TRACE not in text.decode() and content_type.startswith("text/plain")


async def test_a_dead_letter_is_an_event_of_the_last_attempt(tmp_path: Path) -> None:
    async def down(env: Envelope, target: Target) -> Reply | None:
        raise TransientError("down")

    async with Harness(tmp_path, route(extra="on_failure: {retry: {attempts: 2, initial: 0.02, max: 0.05}}")) as h:
        spans = _otel(h)
        h.out().behavior = down
        await h.send({"n": 1})
        await wait_for(h.spool.count_dead_letters, what="dead letter")
        await wait_for(lambda: len([s for s in spans.get_finished_spans() if s.name == "send out"]) == 2,
                       what="both attempts' spans")
        first, last = sorted((s for s in spans.get_finished_spans() if s.name == "send out"),
                             key=lambda s: s.attributes["gateway.attempt"])
        assert [e.name for e in first.events] == ["gateway.retry"]
        assert [e.name for e in last.events] == ["gateway.dead_letter"]
        assert last.events[0].attributes["reason"] == "attempts"


async def test_sampling_records_new_traces_by_ratio_and_follows_a_senders_flag(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        tracing = OtelTracing(TracingSettings(enabled=True, exporter="none", sample_ratio=0.0), h.metrics)
        memory = InMemorySpanExporter()
        tracing.processors.append(SimpleSpanProcessor(memory))
        h.delivery.tracing = h.delivery.dispatcher.tracing = tracing
        new = _hop((await h.send({"n": 1})).traceparent)
        unsampled = _hop((await h.send({"n": 2}, traceparent=SENT[:-2] + "00")).traceparent)
        sampled = _hop((await h.send({"n": 3}, traceparent=SENT)).traceparent)
        await wait_for(lambda: len(h.out().delivered) == 3, what="deliveries")
        # Not recorded, still carried: the flag says so downstream.
        assert (new.sampled, unsampled.sampled, sampled.sampled) == (False, False, True)
        assert {_ctx(e).sampled for e, _ in h.out().calls} == {False, True}
        await wait_for(lambda: len(memory.get_finished_spans()) == 3, what="the sampled message's spans")
        assert {f"{s.context.trace_id:032x}" for s in memory.get_finished_spans()} == {TRACE}


def test_tracing_off_imports_no_opentelemetry_sdk() -> None:
    """FastAPI (the admin API) imports the OpenTelemetry *API* itself; the gateway adds nothing."""
    code = """
import json, sys
from gateway.config.models import TracingSettings
from gateway.metrics import Metrics
from gateway.runtime import build_tracing
t = build_tracing(TracingSettings(), Metrics())
print(json.dumps([type(t).__name__, sorted(m for m in sys.modules
                  if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter", "gateway.otel")))]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["Tracing", []]


def test_enabled_without_the_extra_is_a_clear_error() -> None:
    code = """
import sys
sys.modules["opentelemetry.sdk"] = None  # as if gateway[otel] were not installed
from gateway.config.models import TracingSettings
from gateway.metrics import Metrics
from gateway.runtime import build_tracing
from gateway.tracing import TracingUnavailable
try:
    build_tracing(TracingSettings(enabled=True), Metrics())
except TracingUnavailable as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'gateway[otel]'" in out and "gateway.tracing.enabled" in out
