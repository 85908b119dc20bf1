"""Every metric the gateway exports. The core owns the names; connectors emit none of their own.

Labels stay low-cardinality: connector, route, outcome, reason — never a topic or an address.
A :class:`Metrics` has its own registry, so tests and several runtimes never share state.

Every counter series the running config makes knowable (per connector and route, with the
outcomes and reasons listed here) exists from the moment the config is applied, at 0
(:meth:`Metrics.start_at_zero`): a series that appeared only with its first event would make
``increase()`` miss that event, and alerts fire only on the second. A reload adds the series of
new routes and connectors and removes those of removed ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Self

import prometheus_client
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics import MetricWrapperBase

# The *_created series double the exposition for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The fixed label values the delivery engine and workers count with; each series starts at 0.
#: ``gateway_inbound_outcomes_total{outcome}``: :class:`gateway.contract.Status` values.
INBOUND_OUTCOMES = ("accepted", "dead_lettered", "dropped", "retry", "rejected")
#: ``gateway_messages_routed_total{outcome}`` of a named route.
ROUTE_OUTCOMES = ("matched", "suppressed", "digested", "rejected", "dropped", "dead_lettered")
#: ``gateway_messages_routed_total{route=""}``: messages no route matched.
UNMATCHED_OUTCOMES = ("unmatched", "dropped", "dead_lettered")
#: ``gateway_delivery_failures_total{outcome}``.
FAILURE_OUTCOMES = ("transient", "permanent")
#: ``gateway_messages_dead_lettered_total{reason}`` of a named route. A reason an inbound
#: connector gives for a message it refused itself (``too_large``) is not known in advance.
ROUTE_DEAD_LETTER_REASONS = ("permanent", "attempts", "max_age", "template", "parse", "corrupt",
                             "connector_missing")
#: ... and of ``route=""``: unmatched messages, digests of a removed route.
UNMATCHED_DEAD_LETTER_REASONS = ("unmatched", "orphaned")
#: ``gateway_backpressure_refusals_total{reason}``: why a message was refused with a temporary error.
REFUSAL_REASONS = ("backlog", "age", "pending", "inflight", "disk", "spool_error", "shutdown", "storm_state",
                   "worker")
#: ``gateway_delivery_dropped_total{reason}``: why a delivery on a route with ``dead_letter: false`` ended.
DROP_REASONS = ("permanent", "attempts", "max_age", "connector_missing")
#: ``gateway_config_reloads_total{outcome}``.
RELOAD_OUTCOMES = ("applied", "invalid", "failed")

#: The label values of each series a metric has from the start: ``{metric: {(value, ...), ...}}``.
Series = Mapping[MetricWrapperBase, Iterable[tuple[str, ...]]]


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
        self.forwarded = Counter(
            "gateway_messages_forwarded_total",
            "Messages a worker process took and handed to the worker that owns their state (gateway.workers).",
            ["connector"], registry=r)
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How much later than asked the event loop ran the watchdog's timer (ten times a second): "
            "how long every protocol waited behind the work that held the loop.",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

        self._at_zero: dict[MetricWrapperBase, set[tuple[str, ...]]] = {}

    def config_series(self, *, inbound: Collection[str], outbound: Collection[str],
                      targets: Mapping[str, Collection[str]]) -> dict[MetricWrapperBase, set[tuple[str, ...]]]:
        """The core's series a config makes knowable: ``inbound`` and ``outbound`` connector names,
        ``targets`` the target connectors of each route by route name."""
        pairs: set[tuple[str, ...]] = {(c, route) for route, connectors in targets.items() for c in connectors}
        return {
            self.received: {(c,) for c in inbound},
            self.inbound_outcomes: {(c, o) for c in inbound for o in INBOUND_OUTCOMES},
            self.routed: {(r, o) for r in targets for o in ROUTE_OUTCOMES} | {("", o) for o in UNMATCHED_OUTCOMES},
            self.delivered: pairs,
            self.failures: {(c, r, o) for c, r in pairs for o in FAILURE_OUTCOMES},
            self.dead_lettered: ({(r, why) for r in targets for why in ROUTE_DEAD_LETTER_REASONS}
                                 | {("", why) for why in UNMATCHED_DEAD_LETTER_REASONS}),
            self.connector_up: {(c,) for c in (*inbound, *outbound)},
            self.reloads: {(o,) for o in RELOAD_OUTCOMES},
        }

    def start_at_zero(self, series: Series) -> None:
        """Create each listed series (a counter at 0), and remove every series an earlier call
        listed that this one does not: those of routes and connectors a reload removed."""
        for metric, wanted in series.items():
            labels = set(wanted)
            for gone in self._at_zero.get(metric, set()) - labels:
                with contextlib.suppress(KeyError):
                    metric.remove(*gone)
            for values in labels:
                metric.labels(*values)
            self._at_zero[metric] = labels

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def negotiate(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format a scraper's ``Accept`` asks for, and its content type.
        Exemplars (the trace id of an observation: ``gateway.tracing``) exist only in the
        OpenMetrics format, which Prometheus asks for when its exemplar storage is on."""
        if "application/openmetrics-text" not in accept:
            return self.exposition(), CONTENT_TYPE
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
