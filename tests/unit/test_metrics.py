"""The metrics' quick paths return what prometheus_client's own would."""

from __future__ import annotations

import pytest

from gateway.metrics import Metrics


def test_a_child_is_the_same_object_however_it_is_asked_for() -> None:
    m = Metrics()
    child = m.routed.labels("r", "matched")
    assert m.routed.labels("r", "matched") is child
    assert m.routed.labels(route="r", outcome="matched") is child


def test_counts_reach_the_exposition() -> None:
    m = Metrics()
    m.received.labels("api").inc()
    m.received.labels("api").inc(2)
    m.duration.labels("out").observe(0.003)
    assert m.registry.get_sample_value("gateway_messages_received_total", {"connector": "api"}) == 3
    assert m.registry.get_sample_value("gateway_delivery_duration_seconds_count", {"connector": "out"}) == 1


def test_misuse_is_still_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.received.inc()  # a labelled counter needs its labels
    with pytest.raises(ValueError):
        m.received.labels("api").inc(-1)
    with pytest.raises(ValueError):
        m.received.labels("a", "b")
    m.received.labels("api")
    m.received.remove("api")
    assert m.registry.get_sample_value("gateway_messages_received_total", {"connector": "api"}) is None
