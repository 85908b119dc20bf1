"""Every metric the gateway exports. The core owns the names; connectors emit none of their own.

Labels stay low-cardinality: connector, route, outcome, reason — never a topic or an address.
A :class:`Metrics` has its own registry, so tests and several runtimes never share state.
"""

from __future__ import annotations

from typing import Any, Self

import prometheus_client
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

# The *_created series double the exposition for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QuickLabels:
    """``labels(...)`` without the library's argument checks and lock once the child exists.

    Every message looks up a few children; the library validates, converts and locks on each
    call. A child, once made, stays in the parent's own table until ``remove``/``clear``, so
    reading that table first returns the same object the slow path would.
    """

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Self:
        if not labelkwargs:
            try:
                child: Self = self._metrics[labelvalues]  # type: ignore[attr-defined]
                return child
            except (AttributeError, KeyError, TypeError):
                pass
        return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc,no-any-return]


class Counter(_QuickLabels, prometheus_client.Counter):
    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if exemplar is None and amount >= 0:
            try:
                self._value.inc(amount)  # what the library does after its checks, on a child
                return
            except AttributeError:  # a parent with labels: the library says what is wrong
                pass
        super().inc(amount, exemplar)


class Gauge(_QuickLabels, prometheus_client.Gauge):
    pass


class Histogram(_QuickLabels, prometheus_client.Histogram):
    pass


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "gateway_messages_received_total", "Messages handed to the router by an inbound connector.",
            ["connector"], registry=r)
        self.inbound_outcomes = Counter(
            "gateway_inbound_outcomes_total",
            "Outcomes answered to inbound senders (accepted, dead_lettered, dropped, retry, rejected).",
            ["connector", "outcome"], registry=r)
        self.routed = Counter(
            "gateway_messages_routed_total",
            "Route decisions: matched, unmatched, dropped, rejected or dead_lettered.",
            ["route", "outcome"], registry=r)
        self.delivered = Counter(
            "gateway_messages_delivered_total", "Messages an outbound connector delivered.",
            ["connector", "route"], registry=r)
        self.failures = Counter(
            "gateway_delivery_failures_total", "Failed delivery attempts (outcome: transient or permanent).",
            ["connector", "route", "outcome"], registry=r)
        self.dead_lettered = Counter(
            "gateway_messages_dead_lettered_total", "Messages written to the dead letters, by reason.",
            ["route", "reason"], registry=r)
        self.duration = Histogram(
            "gateway_delivery_duration_seconds", "Time an outbound send took, successful or not.",
            ["connector"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.spool_depth = Gauge(
            "gateway_spool_depth", "Deliveries waiting in the durable spool.", ["connector"], registry=r)
        self.spool_oldest = Gauge(
            "gateway_spool_oldest_age_seconds", "Age of the oldest delivery waiting in the spool.",
            ["connector"], registry=r)
        self.connector_up = Gauge(
            "gateway_connector_up", "1 when the connector is connected and healthy.", ["connector"], registry=r)
        self.routes_loaded = Gauge("gateway_routes_loaded", "Routes in the running config.", registry=r)
        self.config_info = Gauge(
            "gateway_config_info", "The running config version (content hash) as a label.", ["version"],
            registry=r)
        self.reloads = Counter(
            "gateway_config_reloads_total", "Config reload attempts (outcome: applied, invalid, failed).",
            ["outcome"], registry=r)
        self.ready = Gauge("gateway_ready", "1 when the gateway reports ready.", registry=r)
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How much later than asked the event loop ran the watchdog's timer (ten times a second): "
            "how long every protocol waited behind the work that held the loop.",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
