"""Per-connector workers that deliver spooled jobs.

One worker per target connector claims due jobs from the spool and sends up to ``concurrency``
at once, each attempt bounded by the route's timeout. A connector that sends in batches (the
file sink: one append and one fsync) gets up to ``batch`` jobs per send: a backlog then costs
one trip through the event loop per batch, not per job, which is what lets delivery keep up
with intake on the loop they share (measured: batches of 16 deliver REST → file at about a
quarter of the intake rate, batches of 256 at the intake rate). A transient failure reschedules
the job with backoff and jitter (behind the others: a poison message never blocks the queue)
until the route's attempts or maximum age are used up; a permanent failure dead-letters it at
once. The
connector's circuit breaker stops the sending while the peer is dead and lets one probe through
now and then. Every job ends in exactly one spool write: done, rescheduled, dead-lettered, or
released untouched; each settled job lets one message waiting at the admission gate in
(:mod:`gateway.delivery.admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from gateway.config.models import RetryPolicy
from gateway.contract import Connector, PermanentError, Target, TargetOptions, TransientError
from gateway.deadlines import Deadlines
from gateway.delivery.admission import Admission
from gateway.delivery.options import DeliveryMetrics, DeliveryOptions, RoutingState
from gateway.delivery.provenance import Provenance
from gateway.delivery.retry import Admit, CircuitBreaker, CircuitState, backoff
from gateway.delivery.store import Job, SpoolBackend, SpoolError
from gateway.envelope import Envelope
from gateway.logs import event
from gateway.metrics import Gauge, Metrics
from gateway.tracing import Tracing, note

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

CIRCUIT_VALUE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


#: Parsed retry policies and target options kept at most (see Dispatcher._parsed).
_PARSED_MAX = 1024


def count_failure(metrics: Metrics, spec: Target, kind: str, started: float,
                  exemplar: dict[str, str] | None = None) -> None:
    metrics.duration.labels(spec.connector).observe(time.perf_counter() - started, exemplar)
    metrics.failures.labels(spec.connector, spec.route, kind).inc()


def count_dead(metrics: Metrics, log: logging.Logger, envelope_id: str, route: str, connector: str, reason: str,
               error: str) -> None:
    metrics.dead_lettered.labels(route, reason).inc()
    metrics.routed.labels(route, "dead_lettered").inc()
    note("gateway.dead_letter", reason=reason, error=error)
    event(log, "delivery.dead_lettered", logging.WARNING, envelope_id=envelope_id, route=route,
          connector=connector, reason=reason, error=error)


@dataclass
class Worker:
    connector: str
    breaker: CircuitBreaker
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Attempts holding a concurrency slot (sending), by job id.
    inflight: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    #: Attempts whose send is over, writing the result to the spool (slot already free).
    settling: set[asyncio.Task[None]] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class Dispatcher:
    """The workers of every target connector, and the count of jobs waiting for each."""

    def __init__(
        self,
        *,
        spool: Callable[[], SpoolBackend],
        connector: Callable[[str], Connector | None],
        state: Callable[[], RoutingState],
        options: Callable[[], DeliveryOptions],
        metrics: Metrics,
        log: logging.Logger,
    ):
        self._spool = spool
        self._connector = connector
        self._state = state
        self._options = options
        self.metrics = metrics
        self.extra = DeliveryMetrics.of(metrics)
        self.log = log
        self.workers: dict[str, Worker] = {}
        #: Jobs waiting per connector: counted on put and settle, resynced from the spool's depth.
        self.pending: dict[str, int] = {}
        #: New messages wait here for room while a connector's backlog is at its bound.
        self.admission = Admission(options, self.pending)
        self.closing = False
        self._rng = random.Random()
        self._deadlines = Deadlines()
        #: Retry policies and target options by their stored JSON: a route's jobs all carry the
        #: same text and the models are frozen, so one parsed object serves them all.
        self._parsed_cache: dict[tuple[type[Any], str], Any] = {}
        #: Each attempt's trace context (and span): set with the engine's.
        self.tracing = Tracing()
        #: Records each attempt and final failure (:mod:`gateway.delivery.provenance`).
        self.provenance = Provenance.off()

    @property
    def spool(self) -> SpoolBackend:
        return self._spool()

    @property
    def options(self) -> DeliveryOptions:
        return self._options()

    # --- bookkeeping the engine drives -------------------------------------------------------

    def worker(self, connector: str) -> Worker:
        w = self.workers.get(connector)
        if w is None:
            gauge = self.extra.circuit.labels(connector)
            gauge.set(0)
            opts = self.options
            breaker = CircuitBreaker(opts.breaker_threshold, opts.breaker_open, opts.breaker_max_open,
                                     on_change=lambda s: self._circuit_changed(connector, s, gauge))
            w = self.workers[connector] = Worker(connector, breaker)
            if not self.closing:
                w.task = asyncio.create_task(self._work(w), name=f"deliver-{connector}")
        return w

    def added(self, connectors: Iterable[str]) -> None:
        """Jobs for these connectors (one name per job) are in the spool now."""
        names = list(connectors)
        for name in names:
            self.pending[name] = self.pending.get(name, 0) + 1
        for name in set(names):
            self.worker(name).wake.set()

    def settled(self, connector: str, count: int = 1) -> None:
        """``count`` jobs of ``connector`` left the spool (delivered, dropped or dead-lettered)."""
        self.pending[connector] = max(0, self.pending.get(connector, 0) - count)
        self.admission.room(connector, count)

    def full(self) -> list[str]:
        return sorted(c for c, n in self.pending.items() if n >= self.options.max_pending)

    def circuit(self, connector: str) -> str:
        w = self.workers.get(connector)
        return w.breaker.state.value if w else CircuitState.CLOSED.value

    def sending(self, connector: str) -> set[int]:
        w = self.workers.get(connector)
        return set(w.inflight) if w else set()

    @property
    def inflight(self) -> int:
        return sum(len(w.inflight) + len(w.settling) for w in self.workers.values())

    def wake_all(self) -> None:
        for w in self.workers.values():
            w.wake.set()

    def stop(self) -> tuple[list[asyncio.Task[None]], list[asyncio.Task[None]]]:
        """Cancel everything: (attempts that were still out, worker loops)."""
        self.closing = True
        attempts = [t for w in self.workers.values() for t in (*w.inflight.values(), *w.settling)]
        loops = [w.task for w in self.workers.values() if w.task is not None]
        for t in [*attempts, *loops]:
            t.cancel()
        return attempts, loops

    def refresh(self, depth: dict[str, tuple[int, float]], now: float) -> None:
        for name in set(depth) - set(self.workers):
            self.worker(name).wake.set()  # jobs the CLI replayed for a connector no route uses
        for name in set(depth) | set(self.workers) | set(self.pending):
            count, oldest = depth.get(name, (0, now))
            self.metrics.spool_depth.labels(name).set(count)
            self.metrics.spool_oldest.labels(name).set(max(0.0, now - oldest) if count else 0.0)
            self.pending[name] = count  # resync: the CLI or other replicas may have changed it
            self.admission.measured(name, count, oldest if count and oldest > 0 else None)
        for name, w in self.workers.items():
            self.extra.circuit.labels(name).set(CIRCUIT_VALUE[w.breaker.state])

    def referenced(self, connector: str) -> bool:
        return any(t.connector == connector for r in self._state().router.routes for t in r.targets)

    def _circuit_changed(self, connector: str, state: CircuitState, gauge: Gauge) -> None:
        gauge.set(CIRCUIT_VALUE[state])
        level = logging.INFO if state is CircuitState.HALF_OPEN else logging.WARNING
        event(self.log, "circuit." + state.value, level, connector=connector)

    def _parsed(self, model: type[M], text: str, parse: Callable[[], M]) -> M:
        key = (model, text)
        found = self._parsed_cache.get(key)
        if found is None:
            found = parse()
            if len(self._parsed_cache) >= _PARSED_MAX:
                self._parsed_cache.clear()
            self._parsed_cache[key] = found
        return cast(M, found)

    def _policy(self, text: str) -> RetryPolicy:
        if text.strip() in ("", "{}"):
            return RetryPolicy()
        return self._parsed(RetryPolicy, text, lambda: RetryPolicy.model_validate_json(text))

    def _target_options(self, model: type[TargetOptions], text: str) -> TargetOptions:
        return self._parsed(model, text, lambda: model.model_validate(json.loads(text)))

    # --- the worker loop -----------------------------------------------------------------------

    async def _work(self, w: Worker) -> None:
        attached = False
        while not self.closing:
            try:
                if not attached:
                    await self.spool.attach(w.connector, w.wake.set, self.options.concurrency)
                    attached = True
                w.wake.clear()
                conn = self._connector(w.connector)
                batching = conn is not None and type(conn).batches
                limit = self._limit(batching)
                room = limit - len(w.inflight)
                jobs: list[Job] = []
                admit = Admit.WAIT
                if room > 0:
                    admit = w.breaker.admit()
                    if admit is Admit.SEND:
                        jobs = await self.spool.claim(w.connector, room)
                    elif admit is Admit.PROBE:
                        try:
                            jobs = await self.spool.claim(w.connector, 1)
                        finally:
                            if not jobs:
                                w.breaker.cancel_probe()
                if batching and admit is Admit.SEND and len(jobs) > 1:
                    size = self.options.batch
                    for start in range(0, len(jobs), size):
                        self._launch_batch(w, jobs[start:start + size])
                else:
                    for job in jobs:
                        self._launch(w, job, probe=admit is Admit.PROBE)
                if admit is Admit.SEND and jobs and len(jobs) == room:
                    continue  # there may be more due right now
                delay = await self._idle(w, limit)
                if delay > 0:
                    try:
                        if len(w.inflight) >= limit:
                            # Every slot is sending (each under its own deadline) and the first
                            # to finish wakes us: the timer is only a safety net, a loose one will do.
                            with self._deadlines.after(delay):
                                await w.wake.wait()
                        else:  # next_due_at says when a job is due: be on time
                            async with asyncio.timeout(delay):
                                await w.wake.wait()
                    except TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                event(self.log, "spool.read_failed", logging.ERROR, connector=w.connector, error=str(exc))
                await asyncio.sleep(1.0)

    def _limit(self, batching: bool) -> int:
        """Jobs a worker has out at once: ``concurrency`` sends, or for a connector that sends in
        batches, ``batch`` jobs if that is more (one batch being sent while the next gathers:
        the file sink then pays one fsync per ``batch`` jobs instead of per ``concurrency``)."""
        opts = self.options
        return max(opts.concurrency, opts.batch) if batching else opts.concurrency

    async def _idle(self, w: Worker, limit: int) -> float:
        """How long the worker may sleep unless woken (a new job, a finished send)."""
        state = w.breaker.state
        if state is CircuitState.OPEN:
            return max(0.01, w.breaker.wait_time())
        if len(w.inflight) >= limit or (state is CircuitState.HALF_OPEN and w.breaker.probing):
            return 1.0
        nxt = await self.spool.next_due_at(w.connector)
        # Poll at least once a second: the CLI may add jobs (replay) without waking us.
        return 1.0 if nxt is None else min(1.0, max(0.005, nxt - time.time()))

    def _launch(self, w: Worker, job: Job, *, probe: bool) -> None:
        assert job.id is not None
        w.inflight[job.id] = asyncio.create_task(self._attempt(w, job, probe), name=f"attempt-{job.envelope_id}")

    def _launch_batch(self, w: Worker, jobs: list[Job]) -> None:
        """One attempt for several jobs (a connector that sends in batches): each job holds its slot."""
        task = asyncio.create_task(self._attempt_batch(w, jobs), name=f"attempt-{len(jobs)}-{w.connector}")
        for job in jobs:
            assert job.id is not None
            w.inflight[job.id] = task

    async def _attempt_batch(self, w: Worker, jobs: list[Job]) -> None:
        task = asyncio.current_task()
        try:
            await self._try_batch(w, jobs)
        except asyncio.CancelledError:
            raise
        except SpoolError as exc:  # the jobs stay leased a while, then come back
            event(self.log, "spool.update_failed", logging.ERROR, connector=w.connector, jobs=len(jobs),
                  error=str(exc))
        except Exception:
            self.log.exception("delivery.bug", extra={"fields": {"connector": w.connector, "jobs": len(jobs)}})
            for job in jobs:
                with contextlib.suppress(Exception):
                    await self.spool.release(job, delay=5.0)  # not leased forever: tried again later
        finally:
            for job in jobs:
                w.inflight.pop(job.id or -1, None)
            if task is not None:
                w.settling.discard(task)
            w.wake.set()

    async def _attempt(self, w: Worker, job: Job, probe: bool) -> None:
        assert job.id is not None
        task = asyncio.current_task()
        try:
            await self._try(w, job, probe)
        except asyncio.CancelledError:
            if probe:
                w.breaker.cancel_probe()
            raise
        except SpoolError as exc:  # the job stays leased a while, then comes back
            event(self.log, "spool.update_failed", logging.ERROR, envelope_id=job.envelope_id,
                  connector=job.connector, error=str(exc))
        except Exception:
            self.log.exception("delivery.bug", extra={"fields": {"envelope_id": job.envelope_id,
                                                                  "connector": job.connector}})
            with contextlib.suppress(Exception):
                await self.spool.release(job, delay=5.0)  # not leased forever: tried again later
        finally:
            if probe and w.breaker.probing:
                w.breaker.cancel_probe()
            w.inflight.pop(job.id, None)
            if task is not None:
                w.settling.discard(task)
            w.wake.set()

    def _free_slot(self, w: Worker, job: Job) -> None:
        """The send is over: let the next job go while this one's result is written.

        Safe because the job stays leased in the spool until that write is done (a crash before
        it means one more delivery, never a lost one). Bounded: at most ``concurrency`` jobs
        settle at once, beyond that the slot is held as before.
        """
        if job.id in w.inflight and len(w.settling) < self.options.concurrency:
            w.settling.add(w.inflight.pop(job.id))
            w.wake.set()

    async def _prepare(self, job: Job, conn: Connector | None) -> tuple[Envelope, RetryPolicy, Target] | None:
        """What sending ``job`` needs; None when the job was settled here instead (unreadable,
        its connector gone or being replaced, options that no longer fit)."""
        loaded = job.loaded
        try:
            env = loaded[0] if loaded is not None else Envelope.from_json(job.envelope)
            policy = self._policy(job.policy)
        except (ValueError, KeyError, TypeError) as exc:
            await self._final(job, "corrupt", f"unreadable job: {type(exc).__name__}: {exc}")
            return None
        if conn is None:
            if self.referenced(job.connector):
                # Being replaced by a reload right now: try again in a moment, no attempt counted.
                await self.spool.release(job, delay=1.0)
            else:
                await self._final(job, "connector_missing", f"connector {job.connector!r} is not configured")
            return None
        options_type = type(conn).Options
        try:
            if loaded is not None and isinstance(loaded[1], options_type):
                options = loaded[1]
            else:  # from the spool, or the connector's kind changed since (a reload)
                options = self._target_options(options_type, job.options)
        except ValueError as exc:
            await self._final(job, "permanent", f"invalid options for {job.connector!r}: {exc}")
            return None
        return env, policy, Target(route=job.route, connector=job.connector, options=options, timeout=job.timeout)

    async def _try(self, w: Worker, job: Job, probe: bool) -> None:
        conn = self._connector(job.connector)
        prepared = await self._prepare(job, conn)
        if prepared is None:
            return
        assert conn is not None
        env, policy, spec = prepared
        attempt = self.tracing.attempt(env, spec, conn, job.attempts + 1)  # this attempt's own context
        started = time.perf_counter()
        try:
            try:
                with self._deadlines.after(job.timeout):
                    reply = await conn.send(attempt.envelope, spec)
            finally:
                self._free_slot(w, job)
        except Exception as exc:
            attempt.failed(exc)
            await self._failed(w, job, policy, spec, started, exc, probe, attempt.exemplar)
            attempt.end()
            return
        self._count_delivered(w, job, started, attempt.exemplar)
        attempt.end(reply)
        await self.spool.done(job)
        self._settled_done(job)

    async def _try_batch(self, w: Worker, jobs: list[Job]) -> None:
        """Several jobs through :meth:`Connector.send_batch`; each settles on its own answer. The
        batch is bounded by the shortest of their timeouts."""
        conn = self._connector(w.connector)
        ready: list[tuple[Job, Envelope, RetryPolicy, Target]] = []
        for job in jobs:
            prepared = self._quick(job, conn) or await self._each(job, self._prepare(job, conn))
            if prepared is None:
                self._free_slot(w, job)
            else:
                ready.append((job, *prepared))
        if not ready:
            return
        assert conn is not None
        attempts = [self.tracing.attempt(env, spec, conn, job.attempts + 1) for job, env, _, spec in ready]
        started = time.perf_counter()
        answers: Sequence[Any]
        try:
            try:
                with self._deadlines.after(min(job.timeout for job, *_ in ready)):
                    answers = await conn.send_batch([(a.envelope, spec) for a, (*_, spec) in zip(attempts, ready,
                                                                                                  strict=True)])
            finally:
                for job, *_ in ready:
                    self._free_slot(w, job)
            if len(answers) != len(ready):
                raise RuntimeError(f"send_batch gave {len(answers)} answers for {len(ready)} envelopes")
        except Exception as exc:
            answers = [exc] * len(ready)
        delivered: list[Job] = []
        exemplars: list[dict[str, str] | None] = []
        for (job, _, policy, spec), answer, attempt in zip(ready, answers, attempts, strict=True):
            if isinstance(answer, BaseException):
                attempt.failed(answer)
                await self._each(job, self._failed(w, job, policy, spec, started, answer, False, attempt.exemplar))
            else:
                delivered.append(job)
                exemplars.append(attempt.exemplar)
            attempt.end()
        if delivered:
            self._count_batch(w, delivered, started, exemplars)
            await self.spool.done_many(delivered)
            self.settled(w.connector, len(delivered))
            if self.log.isEnabledFor(logging.DEBUG):
                for job in delivered:
                    self._log_delivered(job)

    async def _each(self, job: Job, work: Awaitable[T]) -> T | None:
        """One job's part of a batch: a spool write that fails leaves that job leased a while
        (it comes back) and the others go on."""
        try:
            return await work
        except SpoolError as exc:
            event(self.log, "spool.update_failed", logging.ERROR, envelope_id=job.envelope_id,
                  connector=job.connector, error=str(exc))
            return None

    def _quick(self, job: Job, conn: Connector | None) -> tuple[Envelope, RetryPolicy, Target] | None:
        """What sending ``job`` needs, without an await, when nothing about it needs settling
        (the common case: a batch of hundreds then costs no coroutine per job). None: anything
        unusual — :meth:`_prepare` deals with it."""
        if conn is None:
            return None
        options_type = type(conn).Options
        loaded = job.loaded
        try:
            env = loaded[0] if loaded is not None else Envelope.from_json(job.envelope)
            if loaded is not None and isinstance(loaded[1], options_type):
                options = loaded[1]
            else:
                options = self._target_options(options_type, job.options)
            policy = self._policy(job.policy)
        except (ValueError, KeyError, TypeError):
            return None
        return env, policy, Target(route=job.route, connector=job.connector, options=options, timeout=job.timeout)

    def _count_batch(self, w: Worker, jobs: list[Job], started: float,
                     exemplars: list[dict[str, str] | None]) -> None:
        """:meth:`_count_delivered` for the jobs of one batch: each label set looked up once."""
        took = time.perf_counter() - started
        duration = self.metrics.duration.labels(w.connector)
        routes: dict[str, int] = {}
        for job, exemplar in zip(jobs, exemplars, strict=True):
            duration.observe(took, exemplar)
            routes[job.route] = routes.get(job.route, 0) + 1
        for route, count in routes.items():
            self.metrics.delivered.labels(w.connector, route).inc(count)
        w.breaker.success()

    def _count_delivered(self, w: Worker, job: Job, started: float, exemplar: dict[str, str] | None = None) -> None:
        self.metrics.duration.labels(job.connector).observe(time.perf_counter() - started, exemplar)
        self.metrics.delivered.labels(job.connector, job.route).inc()
        w.breaker.success()
        self.provenance.sent(job, None, started)

    def _settled_done(self, job: Job) -> None:
        self.settled(job.connector)
        if self.log.isEnabledFor(logging.DEBUG):
            self._log_delivered(job)

    def _log_delivered(self, job: Job) -> None:
        event(self.log, "delivery.delivered", logging.DEBUG, envelope_id=job.envelope_id,
              connector=job.connector, route=job.route, attempts=job.attempts + 1)

    async def _failed(self, w: Worker, job: Job, policy: RetryPolicy, spec: Target, started: float,
                      exc: BaseException, probe: bool, exemplar: dict[str, str] | None = None) -> None:
        """A send of ``job`` failed with ``exc``: dead letter (permanent) or retry later."""
        self.provenance.sent(job, exc, started)
        if isinstance(exc, PermanentError):
            count_failure(self.metrics, spec, "permanent", started, exemplar)
            w.breaker.success()  # the peer is up: it answered, with a no
            job.attempts += 1
            await self._final(job, "permanent", str(exc))
            return
        if isinstance(exc, TimeoutError):
            error = f"{job.connector}: no answer within {job.timeout:g}s"
        elif isinstance(exc, TransientError):
            error = str(exc)
        else:
            self.log.error("connector.bug", exc_info=exc, extra={"fields": {"connector": job.connector,
                                                                             "envelope_id": job.envelope_id}})
            error = f"{job.connector}: unexpected {type(exc).__name__}"
        count_failure(self.metrics, spec, "transient", started, exemplar)
        w.breaker.failure(probe=probe)
        await self._retry_later(job, policy, error)

    async def _retry_later(self, job: Job, policy: RetryPolicy, error: str) -> None:
        job.attempts += 1
        if job.attempts >= policy.attempts:
            await self._final(job, "attempts", error)
            return
        if time.time() - job.created_at >= policy.max_age:
            await self._final(job, "max_age", error)
            return
        delay = backoff(policy, job.attempts, self._rng)
        await self.spool.reschedule(job, time.time() + delay, error)
        self.extra.retries.labels(job.connector, job.route).inc()
        note("gateway.retry", attempt=job.attempts, next_in=round(delay, 3), error=error)
        event(self.log, "delivery.retry", logging.INFO, envelope_id=job.envelope_id, connector=job.connector,
              route=job.route, attempt=job.attempts, next_in=round(delay, 3), error=error)

    async def _final(self, job: Job, reason: str, error: str) -> None:
        """The job will not be attempted again: dead-letter it, or drop it when its route says so."""
        route = self._state().router.route_named(job.route) if job.route else None
        if route is not None and not route.dead_letter and reason != "corrupt":
            await self.spool.done(job)
            self.settled(job.connector)
            self.extra.dropped.labels(job.route, reason).inc()
            self.metrics.routed.labels(job.route, "dropped").inc()
            note("gateway.dropped", reason=reason, error=error)
            event(self.log, "delivery.dropped", logging.WARNING, envelope_id=job.envelope_id, route=job.route,
                  connector=job.connector, reason=reason, error=error)
            self.provenance.dead(job.envelope_id, job.route, job.connector, reason, error, kept=False)
            return
        await self.spool.dead_letter(job, reason, error)
        self.settled(job.connector)
        count_dead(self.metrics, self.log, job.envelope_id, job.route, job.connector, reason, error)
        self.provenance.dead(job.envelope_id, job.route, job.connector, reason, error)
