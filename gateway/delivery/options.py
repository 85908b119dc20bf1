"""What the delivery engine is configured and measured with."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.metrics import Counter, Gauge, Metrics
from gateway.routing.router import Router


@dataclass
class RoutingState:
    """What one message is routed under; swapped atomically on reload."""

    router: Router
    unmatched: str
    version: str


@dataclass(frozen=True)
class DeliveryOptions:
    """Bounds and knobs of the delivery engine (``gateway.spool`` in routes.yaml)."""

    #: Sends in flight at once per outbound connector.
    concurrency: int = 16
    #: Jobs one send carries at most, for a connector that sends in batches (``Connector.batches``).
    batch: int = 256
    #: Spooled jobs waiting per outbound connector before new messages for it are refused.
    max_pending: int = 100_000
    #: Admission (see :class:`gateway.delivery.admission.Admission`): beyond this many jobs
    #: waiting for a connector, or once its oldest is ``admit_age`` seconds old (0: off), a new
    #: message for it waits up to ``admit_wait`` seconds for a delivery to make room.
    admit_depth: int = 10_000
    admit_age: float = 0.0
    admit_wait: float = 1.0
    #: Direct-mode messages being sent at once before new ones are refused.
    max_inflight: int = 1_000
    #: How long an idempotency key is remembered (seconds).
    idempotency_window: float = 86_400.0
    #: Consecutive transient failures that open a connector's circuit, and its cool-down.
    breaker_threshold: int = 5
    breaker_open: float = 1.0
    breaker_max_open: float = 60.0

    @classmethod
    def from_settings(cls, settings: Any) -> DeliveryOptions:
        """Read the fields ``settings`` (the ``gateway.spool`` model) has; defaults for the rest."""
        defaults = cls()
        return cls(**{f.name: getattr(settings, f.name, getattr(defaults, f.name)) for f in fields(cls)})

    def but(self, **changes: Any) -> DeliveryOptions:
        return DeliveryOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


class DeliveryMetrics:
    """The engine's metrics beyond :class:`gateway.metrics.Metrics` (registered on its registry)."""

    def __init__(self, registry: CollectorRegistry):
        self.retries = Counter(
            "gateway_delivery_retries_total", "Deliveries rescheduled after a transient failure.",
            ["connector", "route"], registry=registry)
        self.circuit = Gauge(
            "gateway_circuit_state", "Circuit breaker per outbound connector: 0 closed, 1 half-open, 2 open.",
            ["connector"], registry=registry)
        self.refused = Counter(
            "gateway_backpressure_refusals_total",
            "Messages refused with a temporary error because a bound was hit, by inbound connector and reason "
            "(backlog, age, pending, inflight, disk, spool_error, shutdown, storm_state).",
            ["connector", "reason"], registry=registry)
        self.duplicates = Counter(
            "gateway_idempotent_duplicates_total",
            "Messages answered from their idempotency record instead of being delivered again.",
            ["connector"], registry=registry)
        self.dropped = Counter(
            "gateway_delivery_dropped_total",
            "Deliveries that failed finally on a route with dead_letter: false (dropped, by reason).",
            ["route", "reason"], registry=registry)

    @classmethod
    def of(cls, metrics: Metrics) -> DeliveryMetrics:
        """The set registered on ``metrics`` (created on first use: one per registry)."""
        existing = getattr(metrics, "_delivery_metrics", None)
        if isinstance(existing, DeliveryMetrics):
            return existing
        created = cls(metrics.registry)
        setattr(metrics, "_delivery_metrics", created)  # noqa: B010 - one set per Metrics registry
        return created
