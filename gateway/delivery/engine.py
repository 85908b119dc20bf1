"""From a routed message to an outcome: direct sends, the spool, retries and dead letters.

:meth:`Delivery.deliver` is the ``Deliver`` callable every inbound connector receives. It never
raises: whatever happens becomes an :class:`~gateway.contract.Outcome`.

* ``direct`` routes send to their targets now and answer when every target answered (a
  request/reply route returns the reply target's answer). A transient failure answers RETRY
  so the sender retries; a permanent one dead-letters the target (or, for request/reply,
  returns the failure to the caller).
* ``spooled`` routes render each target and write one job per target — together with any dead
  letters and the message's idempotency record — in one durable write, then answer ACCEPTED.
  Per-connector workers (:mod:`gateway.delivery.workers`) deliver with exponential backoff and
  jitter, a circuit breaker per
  connector, a timeout per attempt, and dead-letter after the route's attempts or maximum age
  (or at once on a permanent failure). A failing message is rescheduled behind the others, so
  it never blocks them.

Back pressure: a message is refused with RETRY (never ACCEPTED) while one of its spooled target
connectors already has ``max_pending`` jobs waiting, while ``max_inflight`` direct sends are
out, or while the spool has no room; :attr:`Delivery.pressure` feeds readiness. Before those
hard bounds, admission (:mod:`gateway.delivery.admission`) takes spooled messages in at the rate
their delivery sustains once a target's backlog reaches ``admit_depth``.

Idempotency: a message with ``attributes["idempotency_key"]`` (REST's ``Idempotency-Key``) that
repeats a key its source used within ``idempotency_window`` gets the first answer again — same
envelope id, same status — and is not delivered twice. Request/reply answers are not replayed.
The record is part of the acceptance: a spooled message's is written with its jobs; before a
direct send an "in progress" record with the envelope id is written durably, and finished with
the answer afterwards. A retry that finds an in-progress record (the gateway crashed during the
send, or the send ended in a retry answer) is sent again under the *same* envelope id, so the
receiver can deduplicate it; this process's own attempts with one key never overlap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from gateway.contract import Connector, Outcome, PermanentError, Reply, Status, TransientError
from gateway.deadlines import Deadlines
from gateway.delivery.options import DeliveryMetrics, DeliveryOptions, RoutingState
from gateway.delivery.provenance import Provenance
from gateway.delivery.store import Job, Remembered, SpoolBackend, SpoolError, SpoolFull
from gateway.delivery.workers import Dispatcher, Worker, count_dead, count_failure
from gateway.envelope import PARSE_INLINE_BYTES, Envelope, is_json_type
from gateway.logs import event
from gateway.metrics import Metrics
from gateway.routing.router import CompiledRoute, MessageScope, Planned
from gateway.routing.templates import TemplateError
from gateway.tracing import Attempt, Tracing

if TYPE_CHECKING:
    from gateway.routing.storm import StormControl

__all__ = ["Delivery", "DeliveryMetrics", "DeliveryOptions", "RoutingState"]

#: The status of an idempotency record whose direct send has started and not been answered.
IN_PROGRESS = "in_progress"


@dataclass
class _Dead:
    route: CompiledRoute | None
    connector: str
    reason: str
    envelope: Envelope
    error: str
    options: dict[str, Any] = field(default_factory=dict)


class Delivery:
    def __init__(
        self,
        *,
        state: RoutingState,
        connector: Callable[[str], Connector | None],
        spool: SpoolBackend,
        metrics: Metrics,
        log: logging.Logger,
        concurrency: int | None = None,
        options: DeliveryOptions | None = None,
    ):
        self.state = state
        self._connector = connector
        self.spool = spool
        self.metrics = metrics
        self.extra = DeliveryMetrics.of(metrics)
        self.log = log
        opts = options or DeliveryOptions()
        self.options = opts if concurrency is None else opts.but(concurrency=concurrency)
        self.dispatcher = Dispatcher(spool=lambda: self.spool, connector=connector, state=lambda: self.state,
                                     options=lambda: self.options, metrics=metrics, log=log)
        self._inflight_direct = 0
        self._deadlines = Deadlines()
        self._direct_tasks: set[asyncio.Future[Reply | None]] = set()
        #: Tasks sending a message's single direct target themselves, and those a drain cancelled.
        self._sending_here: set[asyncio.Task[Any]] = set()
        self._drained: set[asyncio.Task[Any]] = set()
        self._claims: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._closing = False
        self._forgot_at = 0.0
        #: Alert-storm control, set by the runtime.
        self.storm: StormControl | None = None
        #: Set by the runtime in each of several worker processes (see :mod:`gateway.workers`):
        #: ``forward(envelope, worker)`` routes a message in the worker that owns its state and
        #: returns that worker's outcome, or raises when it cannot be reached (the sender is then
        #: asked to retry). ``worker`` is this process's index, ``workers`` how many there are.
        self.forward: Callable[[Envelope, int], Awaitable[Outcome]] | None = None
        self.worker, self.workers = 0, 1
        self._storm_routes: tuple[RoutingState | None, bool] = (None, False)
        self._observers: list[Callable[[Envelope, RoutingState, Outcome], None]] = []
        #: The trace context of every hop (and its spans, with ``gateway.tracing``): set by the runtime.
        self.tracing = self.dispatcher.tracing = Tracing()

    def add_observer(self, fn: Callable[[Envelope, RoutingState, Outcome], None]) -> None:
        """Call ``fn(envelope, routing state it was routed under, outcome)`` after every message.
        Observers run on the hot path: they must be quick and must not raise."""
        self._observers.append(fn)

    @property
    def provenance(self) -> Provenance:
        """The record of each message's way (:mod:`gateway.delivery.provenance`); off until the runtime sets one."""
        return self.dispatcher.provenance

    @provenance.setter
    def provenance(self, recorder: Provenance) -> None:
        self.dispatcher.provenance = recorder

    @property
    def concurrency(self) -> int:
        return self.options.concurrency

    @property
    def _workers(self) -> dict[str, Worker]:
        # gateway.reload reads this (and _inflight_direct); prefer sending().
        return self.dispatcher.workers

    # --- the Deliver callable ----------------------------------------------------------

    async def deliver(self, env: Envelope, *, here: bool = False) -> Outcome:
        """Route ``env`` and answer its outcome. ``here``: a message another worker forwarded,
        routed in this one whatever its owner (the sender chose this worker as the owner)."""
        env, hop = self.tracing.received(env)  # the gateway's own hop: a child of the sender's context
        state = self.state  # one snapshot: this message finishes on the routes it started with
        try:
            outcome = await self._deliver(env, state, here)
        except Exception as exc:  # never let a bug become a protocol-level 500 with internals
            self.log.exception("delivery.bug", extra={"fields": {"envelope_id": env.id}})
            outcome = self._answer(env, Outcome.retry(env.id, f"internal error ({type(exc).__name__})"))
        outcome = hop.finish(outcome)
        self.provenance.received(env, outcome)
        for observe in self._observers:
            try:
                observe(env, state, outcome)
            except Exception:
                self.log.exception("delivery.observer_failed", extra={"fields": {"envelope_id": env.id}})
        return outcome

    async def _deliver(self, env: Envelope, state: RoutingState, here: bool = False) -> Outcome:
        if self._closing:
            self.metrics.received.labels(env.source).inc()
            return self._answer(env, self._refuse(env, "shutdown", "gateway is shutting down"))
        if len(env.body) > PARSE_INLINE_BYTES and state.router.reads_data(env.source):
            # Routing reads ``data`` without awaiting: parse a large body first, JSON in steps that
            # let the loop run between them (its parser keeps the GIL), others (the e-mail parser
            # is pure Python) in a worker thread.
            if is_json_type(env.content_type):
                for _ in env.parse_steps():
                    await asyncio.sleep(0)
            elif "data" not in env.__dict__:
                await asyncio.to_thread(env.data_or_none)
        key = env.attributes.get("idempotency_key")
        if self.forward is not None and not here:
            owner = self._owner(env, state, key if isinstance(key, str) and key else None)
            if owner != self.worker:
                # Counted by the worker that decides it, so that the workers' metrics add up.
                try:
                    outcome = await self.forward(env, owner)
                    self.metrics.forwarded.labels(env.source).inc()
                    return outcome
                except Exception as exc:
                    self.metrics.received.labels(env.source).inc()
                    return self._answer(env, self._refuse(env, "worker", "cannot decide the message now",
                                                          error=f"worker {owner}: {exc}", retry_after=1))
        self.metrics.received.labels(env.source).inc()
        if isinstance(key, str) and key:
            return self._answer(env, await self._deliver_once(env, state, key))
        return self._answer(env, await self._route(env, state, None))

    def _owner(self, env: Envelope, state: RoutingState, key: str | None) -> int:
        """The worker whose state decides ``env``: worker 0 holds all storm state (dedupe, throttle,
        digest, alarm), so a message a storm-controlled route selects is its; a message with an
        ``Idempotency-Key`` belongs to the worker its (source, key) hashes to, whose spool has the
        key's record, so a retry on another connection is still recognised; any other message is
        routed where it arrived."""
        seen, any_storm = self._storm_routes
        if seen is not state:
            any_storm = any(r.storm is not None for r in state.router.routes)
            self._storm_routes = (state, any_storm)
        if any_storm and any(s.route.storm is not None for s in state.router.select(env)):
            return 0
        if key is not None:
            return zlib.crc32(f"{env.source}\0{key}".encode()) % self.workers
        return self.worker

    async def _deliver_once(self, env: Envelope, state: RoutingState, key: str) -> Outcome:
        ident = (env.source, key)
        # A concurrent message with the same key finishes first; then its record answers this one.
        while (running := self._claims.get(ident)) is not None:
            await asyncio.shield(running)
        claim: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._claims[ident] = claim  # no await since the loop above: the claim is ours alone
        try:
            try:
                record = await self.spool.recall(env.source, key, time.time() - self.options.idempotency_window)
            except SpoolError as exc:
                return self._refuse(env, "spool_error", "cannot check the idempotency key now", error=str(exc))
            if record is None:
                return await self._route(env, state, key)
            if record.status == IN_PROGRESS:
                # An attempt with this key was sent, or was being sent, when the gateway crashed or
                # answered retry: whether it arrived is unknown, so send again as the same envelope.
                event(self.log, "envelope.resent", envelope_id=record.envelope_id, connector=env.source,
                      duplicate_id=env.id, note="an earlier attempt with this Idempotency-Key has no outcome")
                return await self._route(replace(env, id=record.envelope_id), state, key)
            try:
                status = Status(record.status)
            except ValueError:
                status = Status.ACCEPTED
            self.extra.duplicates.labels(env.source).inc()
            event(self.log, "envelope.duplicate", envelope_id=record.envelope_id, connector=env.source,
                  duplicate_id=env.id)
            return Outcome(status, record.envelope_id, reason="duplicate: answered from the Idempotency-Key record")
        finally:
            del self._claims[ident]
            claim.set_result(None)

    async def _route(self, env: Envelope, state: RoutingState, key: str | None) -> Outcome:
        selected = state.router.select(env)
        if not selected:
            return await self._unmatched(env, state, key)
        direct: list[Planned] = []
        spooled: list[Planned] = []
        dead: list[_Dead] = []
        folds: list[tuple[CompiledRoute, str]] = []
        undos: list[Callable[[], None]] = []
        suppressed = ""
        wants_reply = False
        for sel in selected:
            route = sel.route
            if sel.error is not None:
                dead.append(_Dead(route, "", "parse", env, sel.error))
                continue
            self.metrics.routed.labels(route.name, "matched").inc()
            self.provenance.route(env.id, route.name, "matched")
            wants_reply = wants_reply or route.wants_reply
            renv = env
            if route.storm is not None and self.storm is not None:
                try:
                    decision = self.storm.admit(route.storm, env, dict(MessageScope(env)))
                except TemplateError as exc:
                    dead.append(_Dead(route, "", "template", env, f"route {route.name!r}: storm control key: {exc}"))
                    continue
                if decision.action == "suppress":
                    self.metrics.routed.labels(route.name, "suppressed").inc()
                    self.provenance.route(env.id, route.name, "suppressed", decision.reason)
                    suppressed = decision.reason
                    continue
                if decision.action == "digest":
                    folds.append((route, decision.key))
                    continue
                renv = decision.envelope or env
                if decision.undo is not None:
                    undos.append(decision.undo)
            for plan in self.tracing.routed(renv, route, state.router.reshape(renv, route)):
                if isinstance(plan, Planned):
                    (direct if route.mode == "direct" else spooled).append(plan)
                else:
                    target, reason = plan
                    dead.append(_Dead(route, target.connector, "template", env, reason))
        if self.log.isEnabledFor(logging.DEBUG):
            event(self.log, "envelope.routed", logging.DEBUG, envelope_id=env.id, source=env.source,
                  routes=",".join(s.route.name for s in selected), config=state.version)
        for d in dead:
            if d.route is not None and not d.route.dead_letter:
                self.metrics.routed.labels(d.route.name, "rejected").inc()
                self.provenance.route(env.id, d.route.name, "rejected", d.error)
                for undo in undos:
                    undo()
                return Outcome.rejected(env.id, d.error, code=422)
        outcome = await self._deliver_plans(env, key, direct, spooled, dead, wants_reply)
        storm = self.storm  # folds are only collected while it is set
        if outcome.acknowledge and folds and storm is not None:
            try:
                for route, fold_key in folds:
                    if route.storm is not None:
                        await storm.fold(route.storm, fold_key, env)
                    self.metrics.routed.labels(route.name, "digested").inc()
                    self.provenance.route(env.id, route.name, "digested")
            except Exception as exc:  # the digest store failed: the sender must retry
                outcome = self._refuse(env, "storm_state", "cannot store the message now", error=str(exc))
        if not outcome.acknowledge:
            for undo in undos:
                undo()
            return outcome
        if not direct and not spooled and not dead:
            if folds:
                return Outcome.accepted(env.id)
            return Outcome(Status.DROPPED, env.id, reason=suppressed or "suppressed")
        return outcome

    async def _deliver_plans(self, env: Envelope, key: str | None, direct: list[Planned], spooled: list[Planned],
                             dead: list[_Dead], wants_reply: bool) -> Outcome:

        if spooled or dead:
            targets = sorted({p.spec.connector for p in spooled})
            refused = self._check_room(env, targets) or await self._admit(env, targets)
            if refused is not None:
                return refused
        reply: Reply | None = None
        sent = 0
        if direct:
            if self._inflight_direct >= self.options.max_inflight:
                return self._refuse(env, "inflight", "too many messages in flight", retry_after=1)
            if key is not None and not wants_reply:
                # Durably before the send: a retry after a crash mid-send then reuses this envelope id.
                refused = await self._store(env, [], [], Remembered(env.source, key, env.id, IN_PROGRESS))
                if refused is not None:
                    return refused
            before = len(dead)
            outcome = await self._send_direct(env, direct, dead)
            if outcome.status is not Status.ACCEPTED:
                return outcome
            reply = outcome.reply
            sent = len(direct) - (len(dead) - before)
        remember = None
        status = Status.DEAD_LETTERED if dead and not sent and not spooled else Status.ACCEPTED
        if key is not None and not wants_reply:
            remember = Remembered(env.source, key, env.id, status.value)
        if spooled or dead or remember:
            refused = await self._store(env, spooled, dead, remember)
            if refused is not None:
                return refused
        if status is Status.DEAD_LETTERED:
            return Outcome(Status.DEAD_LETTERED, env.id, reason=dead[0].error)
        return Outcome.accepted(env.id, reply)

    def _check_room(self, env: Envelope, connectors: Iterable[str]) -> Outcome | None:
        for name in connectors:
            if self.dispatcher.pending.get(name, 0) >= self.options.max_pending:
                return self._refuse(env, "pending", f"too many messages waiting for {name!r}", retry_after=5)
        try:
            self.spool.check_space()
        except SpoolFull as exc:
            return self._refuse(env, "disk", "the spool is full", error=str(exc), retry_after=30)
        return None

    async def _admit(self, env: Envelope, connectors: list[str]) -> Outcome | None:
        """Wait for room while a target's backlog is at its admission bound (see
        :mod:`gateway.delivery.admission`); refuse with retry-later when none comes in time."""
        gate = self.dispatcher.admission
        for name in connectors:
            if gate.blocked(name) is None:
                continue  # the common case, without a coroutine
            why = await gate.admit(name)
            if why is not None:
                return self._refuse(env, why, f"delivery to {name!r} is behind; try again shortly", retry_after=1)
        return None

    async def _store(self, env: Envelope, spooled: list[Planned], dead: list[_Dead],
                     remember: Remembered | None) -> Outcome | None:
        """One durable write for the whole message; only then may it be acknowledged."""
        jobs = [_spooled_job(p) for p in spooled]
        dead_jobs = [(_job(d.envelope, d.route, d.connector, json.dumps(d.options),
                           d.route.timeout if d.route else 30.0), d.reason, d.error) for d in dead]
        try:
            await self.spool.put(jobs, dead=dead_jobs, remember=remember)
        except SpoolFull as exc:
            return self._refuse(env, "disk", "the spool is full", error=str(exc), retry_after=30)
        except SpoolError as exc:
            return self._refuse(env, "spool_error", "cannot store the message now", error=str(exc))
        self.dispatcher.added(job.connector for job in jobs)
        for d in dead:
            count_dead(self.metrics, self.log, d.envelope.id, d.route.name if d.route else "", d.connector,
                       d.reason, d.error)
            self.provenance.dead(d.envelope.id, d.route.name if d.route else "", d.connector, d.reason, d.error)
        return None

    def _refuse(self, env: Envelope, reason: str, text: str, *, error: str = "", retry_after: float = 5) -> Outcome:
        self.extra.refused.labels(env.source, reason).inc()
        if error:
            event(self.log, "spool.refused", logging.WARNING, envelope_id=env.id, connector=env.source,
                  reason=reason, error=error)
        return Outcome.retry(env.id, text, retry_after=retry_after)

    def _answer(self, env: Envelope, outcome: Outcome) -> Outcome:
        self.metrics.inbound_outcomes.labels(env.source, outcome.status.value).inc()
        if outcome.status in (Status.RETRY, Status.REJECTED):
            event(self.log, "envelope." + outcome.status.value, logging.INFO, envelope_id=env.id,
                  connector=env.source, reason=outcome.reason)
        return outcome

    async def _unmatched(self, env: Envelope, state: RoutingState, key: str | None) -> Outcome:
        self.metrics.routed.labels("", "unmatched").inc()
        self.provenance.route(env.id, "", "unmatched", f"unmatched: {state.unmatched}")
        event(self.log, "route.unmatched", envelope_id=env.id, connector=env.source, policy=state.unmatched)
        if state.unmatched == "drop":
            self.metrics.routed.labels("", "dropped").inc()
            return Outcome(Status.DROPPED, env.id, reason="no route matches; dropped by policy")
        if state.unmatched == "dead_letter":
            refused = self._check_room(env, ())
            if refused is None:
                remember = Remembered(env.source, key, env.id, Status.DEAD_LETTERED.value) if key else None
                refused = await self._store(env, [], [_Dead(None, "", "unmatched", env, "no route matches")],
                                            remember)
            return refused or Outcome(Status.DEAD_LETTERED, env.id, reason="no route matches")
        return Outcome.rejected(env.id, "no route matches this message", code=404)

    # --- direct ------------------------------------------------------------------------

    async def _send_direct(self, env: Envelope, plans: list[Planned], dead: list[_Dead]) -> Outcome:
        """Send now. Permanent failures of targets that are not the reply join ``dead``."""
        self._inflight_direct += 1
        tasks: list[asyncio.Future[Reply | None]] = []
        started = time.time()
        try:
            if len(plans) == 1:
                results: list[Reply | BaseException | None] = [await self._send_here(plans[0])]
            else:
                tasks = [asyncio.ensure_future(self._send_one(p)) for p in plans]
                self._direct_tasks.update(tasks)
                results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._inflight_direct -= 1
            self._direct_tasks.difference_update(tasks)
        self.provenance.direct(plans, results, started)
        reply: Reply | None = None
        for plan, result in zip(plans, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                return Outcome.retry(env.id, "gateway is shutting down", retry_after=5)
            if isinstance(result, TransientError):
                if plan.target.reply:
                    return Outcome(Status.RETRY, env.id, reason=str(result), detail=result.detail,
                                   code=result.code or 503, retry_after=1)
                return Outcome.retry(env.id, f"{plan.spec.connector}: {result}", retry_after=1)
            if isinstance(result, PermanentError):
                if plan.target.reply:
                    return Outcome.rejected(env.id, str(result), code=result.code or 502, detail=result.detail)
                if not plan.route.dead_letter:
                    self.metrics.routed.labels(plan.route.name, "rejected").inc()
                    return Outcome.rejected(env.id, f"{plan.spec.connector}: {result}", code=502)
                dead.append(_Dead(plan.route, plan.spec.connector, "permanent", plan.envelope, str(result),
                                  plan.spec.options.model_dump(mode="json")))
                continue
            if isinstance(result, BaseException):
                raise result
            if plan.target.reply:
                reply = result
        return Outcome.accepted(env.id, reply)

    async def _send_here(self, plan: Planned) -> Reply | BaseException | None:
        """One target sent in the caller's own task (a task per send costs two trips through the
        event loop), with ``gather(..., return_exceptions=True)``'s result. A drain cancels the
        caller while it is in here; that send then ends as CancelledError, answered RETRY."""
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._sending_here.add(task)
        try:
            return await self._send_one(plan)
        except asyncio.CancelledError as exc:
            if task in self._drained and task.uncancel() <= cancelling:
                return exc
            raise
        except Exception as exc:
            return exc
        finally:
            self._sending_here.discard(task)
            self._drained.discard(task)

    async def _send_one(self, plan: Planned) -> Reply | None:
        conn = self._connector(plan.spec.connector)
        if conn is None:
            raise TransientError(f"connector {plan.spec.connector!r} is not running")
        attempt = self.tracing.attempt(plan.envelope, plan.spec, conn)  # this attempt's own context
        try:
            reply = await self._send_attempt(conn, plan, attempt)
        except BaseException as exc:
            attempt.failed(exc)
            attempt.end()
            raise
        attempt.end(reply)
        return reply

    async def _send_attempt(self, conn: Connector, plan: Planned, attempt: Attempt) -> Reply | None:
        started = time.perf_counter()
        try:
            with self._deadlines.after(plan.spec.timeout):
                reply = await conn.send(attempt.envelope, plan.spec)
        except TimeoutError:
            count_failure(self.metrics, plan.spec, "transient", started, attempt.exemplar)
            raise TransientError(f"{plan.spec.connector}: no answer within {plan.spec.timeout:g}s", code=504) from None
        except PermanentError:
            count_failure(self.metrics, plan.spec, "permanent", started, attempt.exemplar)
            raise
        except TransientError:
            count_failure(self.metrics, plan.spec, "transient", started, attempt.exemplar)
            raise
        except Exception as exc:
            count_failure(self.metrics, plan.spec, "transient", started, attempt.exemplar)
            self.log.exception("connector.bug", extra={"fields": {"connector": plan.spec.connector,
                                                                   "envelope_id": plan.envelope.id}})
            raise TransientError(f"{plan.spec.connector}: unexpected {type(exc).__name__}") from exc
        self.metrics.duration.labels(plan.spec.connector).observe(time.perf_counter() - started, attempt.exemplar)
        self.metrics.delivered.labels(plan.spec.connector, plan.route.name).inc()
        return reply

    # --- workers (gateway.delivery.workers) ----------------------------------------------------

    async def start(self, connectors: list[str]) -> None:
        """Start workers for those of these connectors that routes send to, and for any that
        still has spooled jobs (more appear as jobs for them do: a replay, another replica)."""
        try:
            depth = await self.spool.depth()
        except SpoolError as exc:
            event(self.log, "spool.read_failed", logging.ERROR, error=str(exc))
            depth = {}
        for name, (count, _) in depth.items():
            self.dispatcher.pending[name] = count
        for name in {n for n in connectors if self.dispatcher.referenced(n)} | set(depth):
            self.dispatcher.worker(name).wake.set()

    def circuit(self, connector: str) -> str:
        return self.dispatcher.circuit(connector)

    @property
    def pressure(self) -> list[str]:
        """What is at its bound right now (connector names, or ``"inflight"``); empty when none."""
        full = self.dispatcher.full()
        if self._inflight_direct >= self.options.max_inflight:
            full.append("inflight")
        return full

    def pending(self, connector: str) -> int:
        return self.dispatcher.pending.get(connector, 0)

    def sending(self, connector: str) -> tuple[set[int], int]:
        """(ids of spooled jobs being sent on ``connector``, direct messages in flight on any)."""
        return self.dispatcher.sending(connector), self._inflight_direct

    async def dead_letter_inbound(self, env: Envelope, reason: str, error: str) -> Outcome:
        """Keep a message its inbound connector refused itself (``ConnectorContext.dead_letter``)."""
        env, hop = self.tracing.received(env)  # kept with its hop's context: a replay continues the trace
        self.metrics.received.labels(env.source).inc()
        refused = self._check_room(env, ())
        if refused is None:
            refused = await self._store(env, [], [_Dead(None, env.source, reason, env, error)], None)
        outcome = hop.finish(self._answer(env, refused or Outcome(Status.DEAD_LETTERED, env.id, reason=error)))
        self.provenance.received(env, outcome)
        return outcome

    # --- storm control ------------------------------------------------------------------

    async def emit_digest(self, route_name: str, env: Envelope) -> bool:
        """Send a finished digest to its route's targets (spooled, durably). False: try later."""
        state = self.state
        route = state.router.route_named(route_name)
        if route is None:
            event(self.log, "storm.digest_orphaned", logging.WARNING, envelope_id=env.id, route=route_name,
                  note="the route no longer exists; the digest is dead-lettered")
            outcome = await self._deliver_plans(env, None, [], [], [_Dead(None, "", "orphaned", env,
                                                f"route {route_name!r} was removed")], False)
            return outcome.acknowledge
        plans: list[Planned] = []
        dead: list[_Dead] = []
        for plan in state.router.reshape(env, route):
            if isinstance(plan, Planned):
                plans.append(plan)
            else:
                dead.append(_Dead(route, plan[0].connector, "template", env, plan[1]))
        direct = plans if route.mode == "direct" else []
        spooled = [] if route.mode == "direct" else plans
        outcome = await self._deliver_plans(env, None, direct, spooled, dead, False)
        if outcome.acknowledge:
            event(self.log, "storm.digest_sent", envelope_id=env.id, route=route_name)
        return outcome.acknowledge

    # --- dead letters --------------------------------------------------------------------

    async def replayed(self, connectors: list[str]) -> None:
        """Account for jobs a replay just put back (so bounds and workers see them)."""
        self.dispatcher.added(connectors)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight_direct + self.dispatcher.inflight

    async def drain(self, deadline: float) -> None:
        """Stop taking and picking up work; wait for in-flight sends until ``deadline``
        (monotonic). Sends still out then are cancelled: spooled jobs stay in the spool for the
        next start, direct messages are answered RETRY so their senders retry."""
        self._closing = True
        self.dispatcher.closing = True
        self.dispatcher.wake_all()
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        direct = list(self._direct_tasks)
        for t in direct:
            t.cancel()
        here = list(self._sending_here)
        for t in here:
            self._drained.add(t)
            t.cancel()
        attempts, loops = self.dispatcher.stop()
        if attempts or direct or here:
            event(self.log, "delivery.abandoned", logging.WARNING, count=len(attempts) + len(direct) + len(here),
                  note="spooled jobs stay for the next start; direct messages answered retry")
        await asyncio.gather(*direct, *attempts, *loops, return_exceptions=True)
        while self._sending_here and time.monotonic() < deadline + 5:  # they answer RETRY now
            await asyncio.sleep(0.01)

    async def refresh_gauges(self) -> None:
        now = time.time()
        self.dispatcher.refresh(await self.spool.depth(), now)
        if now - self._forgot_at > 60:
            self._forgot_at = now
            await self.spool.forget_before(now - self.options.idempotency_window)


def _job(env: Envelope, route: CompiledRoute | None, connector: str, options: str, timeout: float) -> Job:
    return Job(envelope_id=env.id, route=route.name if route else "", connector=connector, envelope=env.to_json(),
               options=options, policy=route.policy_json if route else "{}", timeout=timeout)


def _spooled_job(p: Planned) -> Job:
    options = p.spec.options
    # Untemplated options are the target's own object: serialize them once, not per message.
    text = json.dumps(options.model_dump(mode="json")) if p.target.templated else p.target.options_json
    job = _job(p.envelope, p.route, p.spec.connector, text, p.route.timeout)
    job.loaded = (p.envelope, options)  # a worker that gets this job from memory need not parse it
    return job
