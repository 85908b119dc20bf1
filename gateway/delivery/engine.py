"""From a routed message to an outcome: direct sends, the spool, retries and dead letters.

:meth:`Delivery.deliver` is the ``Deliver`` callable every inbound connector receives. It never
raises: whatever happens becomes an :class:`~gateway.contract.Outcome`.

* ``direct`` routes send to their targets now and answer when every target answered (a
  request/reply route returns the reply target's answer). A transient failure answers RETRY
  so the sender retries; a permanent one dead-letters the target (or, for request/reply,
  returns the failure to the caller).
* ``spooled`` routes render each target, write one job per target to the spool in one durable
  transaction, and answer ACCEPTED. Per-connector workers then deliver with exponential
  backoff and jitter, a circuit breaker per connector, and dead-letter after the route's
  attempts or maximum age.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config.models import RetryPolicy
from gateway.contract import Connector, Outcome, PermanentError, Reply, Status, Target, TransientError
from gateway.delivery.spool import Job, Spool, SpoolError
from gateway.envelope import Envelope
from gateway.logs import event
from gateway.metrics import Metrics
from gateway.routing.router import CompiledRoute, Planned, Router


@dataclass
class RoutingState:
    """What one message is routed under; swapped atomically on reload."""

    router: Router
    unmatched: str
    version: str


@dataclass
class _Breaker:
    """Per-connector circuit breaker: after ``threshold`` consecutive transient failures stop
    sending for a cool-down that doubles up to ``max_open``; then let one probe through."""

    threshold: int = 5
    base_open: float = 1.0
    max_open: float = 60.0
    failures: int = 0
    open_until: float = 0.0
    opened: int = 0

    def allow(self, now: float) -> bool:
        return now >= self.open_until

    def success(self) -> None:
        self.failures = 0
        self.opened = 0
        self.open_until = 0.0

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = now + min(self.max_open, self.base_open * (2 ** self.opened))
            self.opened += 1

    @property
    def state(self) -> str:
        return "open" if time.time() < self.open_until else ("half-open" if self.opened else "closed")


def backoff(policy: RetryPolicy, attempts: int, rng: random.Random) -> float:
    """Delay before attempt ``attempts + 1``: exponential (or fixed) with 50–100 % jitter."""
    if policy.backoff == "fixed":
        base = policy.initial
    else:
        base = min(policy.max, policy.initial * (2 ** max(0, attempts - 1)))
    return float(base * (0.5 + rng.random() * 0.5))


@dataclass
class _Worker:
    connector: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[int] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    breaker: _Breaker = field(default_factory=_Breaker)


class Delivery:
    def __init__(
        self,
        *,
        state: RoutingState,
        connector: Callable[[str], Connector | None],
        spool: Spool,
        metrics: Metrics,
        log: logging.Logger,
        concurrency: int = 16,
    ):
        self.state = state
        self._connector = connector
        self.spool = spool
        self.metrics = metrics
        self.log = log
        self.concurrency = concurrency
        self._workers: dict[str, _Worker] = {}
        self._inflight_direct = 0
        self._rng = random.Random()
        self._closing = False

    # --- the Deliver callable ----------------------------------------------------------

    async def deliver(self, env: Envelope) -> Outcome:
        try:
            return await self._deliver(env)
        except Exception as exc:  # never let a bug become a protocol-level 500 with internals
            self.log.exception("delivery.bug", extra={"fields": {"envelope_id": env.id}})
            return Outcome.retry(env.id, f"internal error ({type(exc).__name__})")

    async def _deliver(self, env: Envelope) -> Outcome:
        state = self.state  # one snapshot: this message finishes on the routes it started with
        self.metrics.received.labels(env.source).inc()
        if self._closing:
            return self._answer(env, Outcome.retry(env.id, "gateway is shutting down", retry_after=5))
        selected = state.router.select(env)
        if not selected:
            return self._answer(env, await self._unmatched(env, state))
        direct: list[Planned] = []
        spooled: list[Planned] = []
        dead: list[tuple[CompiledRoute, str, str, Envelope, str]] = []  # route, connector, reason, env, text
        reply_route: CompiledRoute | None = None
        for sel in selected:
            route = sel.route
            if sel.error is not None:
                dead.append((route, "", "parse", env, sel.error))
                continue
            self.metrics.routed.labels(route.name, "matched").inc()
            if route.wants_reply:
                reply_route = route
            for plan in state.router.reshape(env, route):
                if isinstance(plan, Planned):
                    (direct if route.mode == "direct" else spooled).append(plan)
                else:
                    target, reason = plan
                    dead.append((route, target.connector, "template", env, reason))
        event(self.log, "envelope.routed", logging.DEBUG, envelope_id=env.id, source=env.source,
              routes=",".join(s.route.name for s in selected), config=state.version)

        reply: Reply | None = None
        if direct:
            outcome = await self._send_direct(env, direct)
            if outcome.status is not Status.ACCEPTED:
                if reply_route is not None or outcome.status is Status.RETRY:
                    return self._answer(env, outcome)
            reply = outcome.reply
        # Dead letters and spool jobs are one durable write each; only then do we acknowledge.
        try:
            if dead:
                for route, connector, reason, denv, text in dead:
                    if not route.dead_letter:
                        return self._answer(env, Outcome.rejected(env.id, text, code=422))
                    await self._dead_letter(denv, route.name, connector, reason, text, {})
            if spooled:
                await self._spool(spooled)
        except SpoolError as exc:
            event(self.log, "spool.refused", logging.WARNING, envelope_id=env.id, error=str(exc))
            return self._answer(env, Outcome.retry(env.id, "cannot store the message now", retry_after=5))
        if dead and not direct and not spooled:
            return self._answer(env, Outcome(Status.DEAD_LETTERED, env.id, reason=dead[0][4]))
        return self._answer(env, Outcome.accepted(env.id, reply))

    def _answer(self, env: Envelope, outcome: Outcome) -> Outcome:
        self.metrics.inbound_outcomes.labels(env.source, outcome.status.value).inc()
        if outcome.status in (Status.RETRY, Status.REJECTED):
            event(self.log, "envelope." + outcome.status.value, logging.INFO, envelope_id=env.id,
                  connector=env.source, reason=outcome.reason)
        return outcome

    async def _unmatched(self, env: Envelope, state: RoutingState) -> Outcome:
        self.metrics.routed.labels("", "unmatched").inc()
        event(self.log, "route.unmatched", envelope_id=env.id, connector=env.source, policy=state.unmatched)
        if state.unmatched == "drop":
            self.metrics.routed.labels("", "dropped").inc()
            return Outcome(Status.DROPPED, env.id, reason="no route matches; dropped by policy")
        if state.unmatched == "dead_letter":
            try:
                await self._dead_letter(env, "", "", "unmatched", "no route matches", {})
            except SpoolError:
                return Outcome.retry(env.id, "cannot store the message now", retry_after=5)
            return Outcome(Status.DEAD_LETTERED, env.id, reason="no route matches")
        return Outcome.rejected(env.id, "no route matches this message", code=404)

    # --- direct ------------------------------------------------------------------------

    async def _send_direct(self, env: Envelope, plans: list[Planned]) -> Outcome:
        self._inflight_direct += 1
        try:
            results = await asyncio.gather(*(self._send_one(p) for p in plans), return_exceptions=True)
        finally:
            self._inflight_direct -= 1
        reply: Reply | None = None
        for plan, result in zip(plans, results, strict=True):
            if isinstance(result, TransientError):
                if plan.target.reply:
                    return Outcome(Status.RETRY, env.id, reason=str(result), detail=result.detail,
                                   code=result.code or 503, retry_after=1)
                return Outcome.retry(env.id, f"{plan.spec.connector}: {result}", retry_after=1)
            if isinstance(result, PermanentError):
                if plan.target.reply:
                    return Outcome.rejected(env.id, str(result), code=result.code or 502, detail=result.detail)
                try:
                    await self._dead_letter(plan.envelope, plan.route.name, plan.spec.connector, "permanent",
                                            str(result), plan.spec.options.model_dump(mode="json"))
                except SpoolError:
                    return Outcome.retry(env.id, "cannot store the dead letter now", retry_after=5)
                continue
            if isinstance(result, BaseException):
                raise result
            if plan.target.reply:
                reply = result
        return Outcome.accepted(env.id, reply)

    async def _send_one(self, plan: Planned) -> Reply | None:
        conn = self._connector(plan.spec.connector)
        if conn is None:
            raise TransientError(f"connector {plan.spec.connector!r} is not running")
        started = time.perf_counter()
        try:
            reply = await asyncio.wait_for(conn.send(plan.envelope, plan.spec), timeout=plan.spec.timeout)
        except TimeoutError:
            self._count_failure(plan.spec, "transient", started)
            raise TransientError(f"{plan.spec.connector}: no answer within {plan.spec.timeout:g}s", code=504) from None
        except PermanentError:
            self._count_failure(plan.spec, "permanent", started)
            raise
        except TransientError:
            self._count_failure(plan.spec, "transient", started)
            raise
        except Exception as exc:
            self._count_failure(plan.spec, "transient", started)
            self.log.exception("connector.bug", extra={"fields": {"connector": plan.spec.connector,
                                                                   "envelope_id": plan.envelope.id}})
            raise TransientError(f"{plan.spec.connector}: unexpected {type(exc).__name__}") from exc
        self.metrics.duration.labels(plan.spec.connector).observe(time.perf_counter() - started)
        self.metrics.delivered.labels(plan.spec.connector, plan.route.name).inc()
        return reply

    def _count_failure(self, spec: Target, kind: str, started: float) -> None:
        self.metrics.duration.labels(spec.connector).observe(time.perf_counter() - started)
        self.metrics.failures.labels(spec.connector, spec.route, kind).inc()

    # --- spool and dead letters ----------------------------------------------------------

    async def _spool(self, plans: list[Planned]) -> None:
        jobs = [
            Job(envelope_id=p.envelope.id, route=p.route.name, connector=p.spec.connector,
                envelope=p.envelope.to_json(), options=json.dumps(p.spec.options.model_dump(mode="json")),
                policy=p.route.retry.model_dump_json())
            for p in plans
        ]
        await self.spool.put(jobs)
        for p in plans:
            self._worker(p.spec.connector).wake.set()

    async def _dead_letter(
        self, env: Envelope, route: str, connector: str, reason: str, error: str, options: dict[str, Any],
        job: Job | None = None,
    ) -> None:
        if job is None:
            job = Job(envelope_id=env.id, route=route, connector=connector, envelope=env.to_json(),
                      options=json.dumps(options), policy="{}")
        await self.spool.dead_letter(job, reason, error)
        self.metrics.dead_lettered.labels(route, reason).inc()
        self.metrics.routed.labels(route, "dead_lettered").inc()
        event(self.log, "delivery.dead_lettered", logging.WARNING, envelope_id=env.id, route=route,
              connector=connector, reason=reason, error=error)

    # --- workers -------------------------------------------------------------------------

    def _worker(self, connector: str) -> _Worker:
        w = self._workers.get(connector)
        if w is None:
            w = self._workers[connector] = _Worker(connector)
            w.task = asyncio.create_task(self._work(w), name=f"deliver-{connector}")
        return w

    async def start(self, connectors: list[str]) -> None:
        """Start workers for these connectors and for any that still has spooled jobs."""
        for name in set(connectors) | set(await self.spool.connectors_with_jobs()):
            self._worker(name).wake.set()

    def circuit(self, connector: str) -> str:
        w = self._workers.get(connector)
        return w.breaker.state if w else "closed"

    async def _work(self, w: _Worker) -> None:
        sending: set[asyncio.Task[None]] = set()
        while not self._closing:
            try:
                room = self.concurrency - len(w.inflight)
                now = time.time()
                jobs = await self.spool.due(w.connector, room, w.inflight) if room > 0 and w.breaker.allow(now) \
                    else []
                if w.breaker.opened and jobs:
                    jobs = jobs[:1]  # half-open: one probe
                for job in jobs:
                    assert job.id is not None
                    w.inflight.add(job.id)
                    t = asyncio.create_task(self._attempt(w, job))
                    sending.add(t)
                    t.add_done_callback(sending.discard)
                if jobs and len(w.inflight) < self.concurrency:
                    continue
                w.wake.clear()
                delay = 1.0
                nxt = await self.spool.next_due_at(w.connector, w.inflight)
                if nxt is not None:
                    delay = max(0.0, min(delay, nxt - time.time()))
                if not w.breaker.allow(time.time()):
                    delay = max(delay, w.breaker.open_until - time.time())
                try:
                    await asyncio.wait_for(w.wake.wait(), timeout=max(0.01, delay))
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                event(self.log, "spool.read_failed", logging.ERROR, connector=w.connector, error=str(exc))
                await asyncio.sleep(1.0)

    async def _attempt(self, w: _Worker, job: Job) -> None:
        assert job.id is not None
        try:
            env = Envelope.from_json(job.envelope)
            policy = RetryPolicy.model_validate_json(job.policy) if job.policy not in ("", "{}") \
                else RetryPolicy()
            conn = self._connector(job.connector)
            if conn is None:
                await self._dead_letter(env, job.route, job.connector, "connector_missing",
                                        f"connector {job.connector!r} is not configured", {}, job)
                return
            try:
                options = type(conn).Options.model_validate(json.loads(job.options))
            except ValueError as exc:
                await self._dead_letter(env, job.route, job.connector, "permanent", f"invalid options: {exc}",
                                        {}, job)
                return
            spec = Target(route=job.route, connector=job.connector, options=options)
            started = time.perf_counter()
            try:
                await conn.send(env, spec)
            except PermanentError as exc:
                self._count_failure(spec, "permanent", started)
                await self._dead_letter(env, job.route, job.connector, "permanent", str(exc), {}, job)
                return
            except Exception as exc:
                transient = exc if isinstance(exc, TransientError) else TransientError(
                    f"unexpected {type(exc).__name__}")
                if not isinstance(exc, TransientError):
                    self.log.exception("connector.bug", extra={"fields": {"connector": job.connector}})
                self._count_failure(spec, "transient", started)
                w.breaker.failure(time.time())
                await self._retry_later(env, job, policy, str(transient))
                return
            self.metrics.duration.labels(job.connector).observe(time.perf_counter() - started)
            self.metrics.delivered.labels(job.connector, job.route).inc()
            w.breaker.success()
            await self.spool.done(job.id)
            event(self.log, "delivery.delivered", logging.DEBUG, envelope_id=env.id, connector=job.connector,
                  route=job.route, attempts=job.attempts + 1)
        except SpoolError as exc:
            event(self.log, "spool.update_failed", logging.ERROR, connector=job.connector, error=str(exc))
        finally:
            w.inflight.discard(job.id)
            w.wake.set()

    async def _retry_later(self, env: Envelope, job: Job, policy: RetryPolicy, error: str) -> None:
        assert job.id is not None
        attempts = job.attempts + 1
        age = time.time() - job.created_at
        if attempts >= policy.attempts or age >= policy.max_age:
            job.attempts = attempts
            reason = "attempts" if attempts >= policy.attempts else "max_age"
            await self._dead_letter(env, job.route, job.connector, reason, error, {}, job)
            return
        delay = backoff(policy, attempts, self._rng)
        await self.spool.reschedule(job.id, attempts, time.time() + delay, error)
        event(self.log, "delivery.retry", logging.INFO, envelope_id=env.id, connector=job.connector,
              route=job.route, attempt=attempts, next_in=round(delay, 3), error=error)

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight_direct + sum(len(w.inflight) for w in self._workers.values())

    async def drain(self, deadline: float) -> None:
        """Stop picking up spooled jobs; wait for in-flight sends until ``deadline`` (monotonic)."""
        self._closing = True
        for w in self._workers.values():
            w.wake.set()
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self._workers.values():
            if w.task is not None:
                w.task.cancel()
        await asyncio.gather(*(w.task for w in self._workers.values() if w.task), return_exceptions=True)

    async def refresh_gauges(self) -> None:
        depth = await self.spool.depth()
        now = time.time()
        for name in set(depth) | set(self._workers):
            count, oldest = depth.get(name, (0, now))
            self.metrics.spool_depth.labels(name).set(count)
            self.metrics.spool_oldest.labels(name).set(max(0.0, now - oldest) if count else 0.0)
