"""W3C Trace Context parsing and the envelope attributes that carry it."""

from __future__ import annotations

import pytest

from gateway import tracecontext as tc
from gateway.envelope import Envelope

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_traceparent_parses_with_its_state() -> None:
    ctx = tc.parse(VALID, "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.flags, ctx.sampled) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1, True)
    assert ctx.state == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert ctx.traceparent == VALID


@pytest.mark.parametrize("value", [
    None, "", "garbage", VALID.upper(),  # uppercase hex is not valid
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is forbidden
    VALID + "-extra",  # version 00 has exactly four fields
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    "0" * 10_000,
])
def test_invalid_traceparent_is_ignored(value: object) -> None:
    assert tc.parse(value) is None
    assert tc.inbound_attributes({"traceparent": value, "tracestate": "a=b"}) == {}


def test_future_version_keeps_the_known_fields() -> None:
    ctx = tc.parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds")
    assert ctx is not None and ctx.traceparent == VALID


def test_oversized_tracestate_is_dropped_not_the_parent() -> None:
    ctx = tc.parse(VALID, "a=" + "b" * 600)
    assert ctx is not None and ctx.state == ""


def test_child_is_the_same_trace_with_a_new_span() -> None:
    root = tc.new_trace()
    kid = root.child()
    assert kid.trace_id == root.trace_id and kid.span_id != root.span_id and kid.flags == root.flags
    assert tc.parse(root.traceparent) == root


def test_envelope_carries_the_context_through_the_spool_json() -> None:
    env = Envelope(source="rest", protocol="http", subject="/x",
                   attributes=tc.inbound_attributes({"traceparent": VALID, "tracestate": "k=v"}))
    again = Envelope.from_json(env.to_json())
    assert tc.trace_id_of(again) == "4bf92f3577b34da6a3ce929d0e0e4736"
    hop = tc.of(again)
    assert hop is not None
    sent = tc.with_context(again, hop.child())
    assert sent.id == env.id
    fields = tc.outbound_fields(sent)
    assert fields["traceparent"] != VALID and fields["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert fields["tracestate"] == "k=v"
    assert tc.outbound_fields(Envelope(source="s", protocol="p", subject="")) == {}
