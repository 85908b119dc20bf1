"""The delivery's trace context, and the seam OpenTelemetry spans plug into.

Every message the delivery takes gets the context of the gateway's own hop
(:meth:`Tracing.received`): a child of the context its sender gave, or a new trace. Every target
attempt, direct or spooled, retries included, hands its connector an envelope whose context is a
child of that (:meth:`Tracing.attempt`), so each outbound message carries the context of its own
hop; the spool keeps the envelope's context, so a retry or a replayed dead letter continues the
same trace.

This module is the tracing-off path: it never imports OpenTelemetry, and what it adds per
message is the context handling above (which propagation needs anyway) and a few attribute
writes. With ``gateway.tracing.enabled``, the runtime loads :mod:`gateway.otel`
(:func:`gateway.runtime.build_tracing`), whose :class:`~gateway.otel.OtelTracing` overrides these
hooks to record spans with the same ids.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from gateway import tracecontext
from gateway.tracecontext import TraceContext

if TYPE_CHECKING:
    from gateway.contract import Connector, Outcome, Reply, Target
    from gateway.envelope import Envelope
    from gateway.routing.router import CompiledRoute, Planned


class TracingUnavailable(Exception):
    """Tracing is enabled in routes.yaml but the OpenTelemetry packages are not installed."""


class Hop:
    """The gateway's own hop for one inbound message (its inbound span, when spans are on)."""

    __slots__ = ("context",)

    def __init__(self, context: TraceContext):
        self.context = context

    def finish(self, outcome: Outcome) -> Outcome:
        """The outcome answered for this message, carrying the hop's ``traceparent``."""
        return dataclasses.replace(outcome, traceparent=self.context.traceparent)


class Attempt:
    """One send of one envelope to one target: the envelope to hand the connector (the same id,
    the context of this attempt) and, with spans on, the attempt's span."""

    __slots__ = ("context", "envelope")

    def __init__(self, envelope: Envelope, context: TraceContext):
        self.envelope = envelope
        self.context = context

    @property
    def exemplar(self) -> dict[str, str] | None:
        """The exemplar of the latency this attempt is measured by: with spans on, its trace id
        (when sampled, so the exemplar leads to a trace that exists); off, none (an exemplar
        costs more than the observation)."""
        return None

    def failed(self, error: BaseException) -> None:
        """The send failed with ``error``; :func:`note` calls until :meth:`end` describe what the
        delivery did about it (a retry, a dead letter)."""

    def end(self, reply: Reply | None = None) -> None:
        """The attempt is settled (``reply``: the peer's answer, when the caller has it)."""


#: The attempt whose failure is being settled in this task (spans on only), for :func:`note`.
_settling: ContextVar[Any] = ContextVar("gateway_tracing_settling", default=None)


def note(name: str, **attributes: str | int | float) -> None:
    """Note ``name`` (``gateway.retry``, ``gateway.dead_letter``) on the failed attempt being
    settled in this task, if spans are on and there is one."""
    attempt = _settling.get()
    if attempt is not None:
        attempt.event(name, attributes)


class Tracing:
    """Trace context without spans: what runs when tracing is off (or the extra is absent)."""

    enabled = False

    def received(self, env: Envelope) -> tuple[Envelope, Hop]:
        """``env`` with the context of the gateway's hop: a child of the one it came with, or a new
        trace. The same envelope id."""
        parent = tracecontext.of(env)
        ctx = parent.child() if parent is not None else tracecontext.new_trace()  # a new trace's root
        return tracecontext.with_context(env, ctx), Hop(ctx)

    def routed(self, env: Envelope, route: CompiledRoute, plans: list[Planned | Any]) -> list[Planned | Any]:
        """The plans of one matched route (spans on: carrying the route's span context)."""
        return plans

    def attempt(self, env: Envelope, spec: Target, conn: Connector, number: int = 1) -> Attempt:
        """Attempt ``number`` of sending ``env`` to ``spec``: a child context of the envelope's."""
        parent = tracecontext.of(env)
        ctx = parent.child() if parent is not None else tracecontext.new_trace()
        return Attempt(tracecontext.with_context(env, ctx), ctx)

    def shutdown(self) -> None:
        """Export what is still queued (spans on); called once, when the gateway stops."""
