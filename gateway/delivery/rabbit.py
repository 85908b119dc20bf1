"""The shared spool on RabbitMQ: several gateway replicas share pending work through quorum queues.

Chosen with ``gateway.spool: {type: rabbitmq, url: "${SPOOL_AMQP_URL}"}``; SQLite stays the
default. Topology, declared on first use (names under ``queue_prefix``, default ``gateway``):

``{p}.jobs`` (direct exchange) → ``{p}.jobs.<connector>``
    one durable quorum queue per target connector, routing key = connector. ``x-delivery-limit``
    guards against a message that keeps coming back without an outcome (say, it crashes every
    replica that takes it): past the limit the broker dead-letters it, at-least-once, to
``{p}.dead`` (fanout exchange → quorum queue)
    which every replica drains into its own dead letters (reason ``delivery_limit``).
``{p}.retry.<connector>.<tier>``
    quorum queues with a message TTL (0.2 s … 1 h) that dead-letter back into ``{p}.jobs`` under
    the connector's key: the retry backoff, rounded down to the nearest tier.

Every publish is mandatory and confirmed by the broker (a confirm means "on a quorum of disks"),
so the inbound side acknowledges only what the broker holds. A job is acknowledged to the
broker only after its outcome is recorded: delivered → ack; retry → republished to a tier,
confirmed, then ack; dead letter → written, then ack. A replica that dies leaves its
unacknowledged jobs to the broker, which hands them to the others.

What stays with each replica, in a SQLite file at ``path``: the dead letters it wrote or took
from ``{p}.dead`` (list/show/replay/purge them on that replica; a replay goes back to the shared
queues), and its idempotency records (an ``Idempotency-Key`` is deduplicated per replica).
Spool depth is the broker's count of ready jobs (the oldest job's age is not known: 0).
When the broker blocks publishers (memory or disk alarm), :meth:`check_space` refuses new
messages, so inbound connectors answer "retry later" and readiness goes false.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from gateway.delivery.spool import Spool
from gateway.delivery.store import (
    DeadLetter,
    DeadLetterFilter,
    Job,
    Remembered,
    SpoolBackend,
    SpoolError,
    SpoolFull,
)

#: Retry delays the broker can hold a job for (seconds); a backoff is rounded down to one.
TIERS = (0.2, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0)
_JOB_FIELDS = ("envelope_id", "route", "connector", "envelope", "options", "policy", "attempts", "created_at",
               "last_error", "timeout")


def tier_for(delay: float) -> float:
    """The longest tier not longer than ``delay`` (the shortest tier for anything below it)."""
    fitting = [t for t in TIERS if t <= delay]
    return fitting[-1] if fitting else TIERS[0]


def _tier_name(tier: float) -> str:
    return f"{int(tier * 1000)}ms"


class RabbitSpool(SpoolBackend):
    """:class:`~gateway.delivery.store.SpoolBackend` on RabbitMQ quorum queues (shared by replicas)."""

    shared = True

    def __init__(self, url: str, *, path: str, prefix: str = "gateway", min_free_bytes: int = 64 * 1024 * 1024,
                 delivery_limit: int = 50, prefetch: int = 32, confirm_timeout: float = 10.0):
        self.url = url
        self.prefix = prefix
        self.delivery_limit = delivery_limit
        self.prefetch = prefetch
        self.confirm_timeout = confirm_timeout
        self.local = Spool(path, min_free_bytes=min_free_bytes)
        self._conn: AbstractRobustConnection | None = None
        self._pub: AbstractChannel | None = None
        self._admin: AbstractChannel | None = None
        self._jobs_x: AbstractExchange | None = None
        self._declared: dict[str, AbstractQueue] = {}  # job queues by connector
        self._tiers: dict[str, tuple[str, float]] = {}  # retry queues: name -> (connector, tier)
        self._declare_lock = asyncio.Lock()
        self._consumers: dict[str, tuple[AbstractChannel, Callable[[], None]]] = {}
        self._ready: dict[str, deque[Job]] = {}
        self._held: dict[int, AbstractIncomingMessage] = {}
        self._ids = itertools.count(1)

    @classmethod
    def from_settings(cls, settings: Any) -> RabbitSpool:
        url = getattr(settings, "url", None)
        if url is not None and hasattr(url, "get_secret_value"):
            url = url.get_secret_value()
        if not url:
            raise SpoolError("gateway.spool.type rabbitmq needs a url (amqp://… by reference: \"${SPOOL_AMQP_URL}\")")
        return cls(str(url), path=settings.path, prefix=getattr(settings, "queue_prefix", "gateway"),
                   min_free_bytes=settings.min_free_bytes)

    # --- names and arguments ---------------------------------------------------------------

    def job_queue(self, connector: str) -> str:
        return f"{self.prefix}.jobs.{connector}"

    def tier_queue(self, connector: str, tier: float) -> str:
        return f"{self.prefix}.retry.{connector}.{_tier_name(tier)}"

    def _job_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum", "x-delivery-limit": self.delivery_limit,
                "x-dead-letter-exchange": f"{self.prefix}.dead", "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish"}

    def _tier_args(self, connector: str, tier: float) -> dict[str, Any]:
        return {"x-queue-type": "quorum", "x-message-ttl": int(tier * 1000),
                "x-dead-letter-exchange": f"{self.prefix}.jobs", "x-dead-letter-routing-key": connector,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self.local.open()
        try:
            self._conn = await aio_pika.connect_robust(self.url, timeout=10,
                                                       client_properties={"connection_name": "gateway-spool"})
            self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._admin = await self._conn.channel()
            self._jobs_x = await self._pub.declare_exchange(f"{self.prefix}.jobs", aio_pika.ExchangeType.DIRECT,
                                                            durable=True)
            dead_x = await self._pub.declare_exchange(f"{self.prefix}.dead", aio_pika.ExchangeType.FANOUT,
                                                      durable=True)
            dead_ch = await self._conn.channel()
            await dead_ch.set_qos(prefetch_count=16)
            dead_q = await dead_ch.declare_queue(f"{self.prefix}.dead", durable=True,
                                                 arguments={"x-queue-type": "quorum"})
            await dead_q.bind(dead_x)
            await dead_q.consume(self._on_dead)
        except Exception as exc:
            await self.close()
            raise SpoolError(f"cannot open the RabbitMQ spool: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=10)
        self._consumers.clear()
        self._held.clear()
        with contextlib.suppress(SpoolError):
            await self.local.close()

    # --- health ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        connected = getattr(self._conn, "connected", None)
        up = isinstance(connected, asyncio.Event) and connected.is_set()
        return up and self.local.healthy

    def _blocked(self) -> bool:
        # aiormq holds publishes while the broker says connection.blocked; it keeps that state
        # in a private event, which is the only place it is visible.
        raw = getattr(getattr(self._conn, "transport", None), "connection", None)
        unblocked = getattr(raw, "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

    def check_space(self) -> None:
        if self._blocked():
            raise SpoolFull("RabbitMQ blocks publishing (a memory or disk alarm)")
        self.local.check_space()

    # --- publishing ----------------------------------------------------------------------------

    async def _ensure(self, connector: str) -> AbstractQueue:
        queue = self._declared.get(connector)
        if queue is not None:
            return queue
        async with self._declare_lock:
            if connector not in self._declared:
                assert self._pub is not None and self._jobs_x is not None
                queue = await self._pub.declare_queue(self.job_queue(connector), durable=True,
                                                      arguments=self._job_args())
                await queue.bind(self._jobs_x, routing_key=connector)
                self._declared[connector] = queue
        return self._declared[connector]

    async def _ensure_tier(self, connector: str, tier: float) -> str:
        name = self.tier_queue(connector, tier)
        if name not in self._tiers:
            async with self._declare_lock:
                if name not in self._tiers:
                    assert self._pub is not None
                    await self._pub.declare_queue(name, durable=True, arguments=self._tier_args(connector, tier))
                    self._tiers[name] = (connector, tier)
        return name

    async def _publish(self, job: Job, queue: str | None = None) -> None:
        """Publish and wait for the broker's confirm: to the connector's queue, or to ``queue``."""
        if self._pub is None or self._jobs_x is None:
            raise SpoolError("the RabbitMQ spool is not open")
        body = json.dumps({k: getattr(job, k) for k in _JOB_FIELDS}).encode("utf-8")
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=job.envelope_id,
                                   content_type="application/json",
                                   headers={"connector": job.connector, "attempts": job.attempts})
        try:
            if queue is None:
                await self._ensure(job.connector)
                await asyncio.wait_for(self._jobs_x.publish(message, routing_key=job.connector, mandatory=True),
                                       timeout=self.confirm_timeout)
            else:
                await asyncio.wait_for(self._pub.default_exchange.publish(message, routing_key=queue, mandatory=True),
                                       timeout=self.confirm_timeout)
        except TimeoutError as exc:
            raise SpoolError(f"RabbitMQ did not confirm within {self.confirm_timeout:g}s") from exc
        except SpoolError:
            raise
        except Exception as exc:
            raise SpoolError(f"RabbitMQ refused the job: {type(exc).__name__}: {exc}") from exc

    # --- jobs ----------------------------------------------------------------------------------

    async def put(
        self, jobs: Sequence[Job], *, dead: Sequence[tuple[Job, str, str]] = (), remember: Remembered | None = None,
    ) -> None:
        self.check_space()
        now = time.time()
        stamped = [replace(j, created_at=j.created_at or now) for j in jobs]
        # Jobs first: if the local write below fails the sender retries and a job is doubled,
        # never the other way round (a remembered key without its jobs would lose the message).
        await asyncio.gather(*(self._publish(j) for j in stamped))
        if dead or remember is not None:
            await self.local.put([], dead=dead, remember=remember)

    async def attach(self, connector: str, wake: Callable[[], None], prefetch: int) -> None:
        if connector in self._consumers:
            return
        if self._conn is None:
            raise SpoolError("the RabbitMQ spool is not open")
        await self._ensure(connector)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=max(prefetch, 1))
        queue = await channel.declare_queue(self.job_queue(connector), durable=True, arguments=self._job_args())
        self._ready.setdefault(connector, deque())
        self._consumers[connector] = (channel, wake)

        async def on_message(message: AbstractIncomingMessage) -> None:
            job = self._job_from(message, connector)
            self._ready[connector].append(job)
            wake()

        await queue.consume(on_message)

    def _job_from(self, message: AbstractIncomingMessage, connector: str) -> Job:
        job_id = next(self._ids)
        self._held[job_id] = message
        try:
            raw = json.loads(message.body)
            return Job(id=job_id, **{k: raw[k] for k in _JOB_FIELDS if k in raw})
        except (ValueError, TypeError):
            # Not one of ours: the engine dead-letters it as "corrupt", keeping the bytes.
            return Job(id=job_id, envelope_id=message.message_id or "", route="", connector=connector,
                       envelope=message.body.decode("utf-8", "replace"), options="{}", policy="{}")

    async def claim(self, connector: str, limit: int) -> list[Job]:
        ready = self._ready.get(connector)
        out: list[Job] = []
        while ready and len(out) < limit:
            out.append(ready.popleft())
        return out

    async def next_due_at(self, connector: str) -> float | None:
        return time.time() if self._ready.get(connector) else None

    def _message(self, job: Job) -> AbstractIncomingMessage:
        message = self._held.pop(job.id, None) if job.id is not None else None
        if message is None:
            raise SpoolError(f"job {job.envelope_id} is not held by this replica (the broker took it back)")
        return message

    async def _settle(self, message: AbstractIncomingMessage, *, requeue: bool | None = None) -> None:
        try:
            if requeue is None:
                await message.ack()
            else:
                await message.nack(requeue=requeue)
        except Exception as exc:  # the channel is gone: the broker redelivers it (a duplicate, not a loss)
            raise SpoolError(f"cannot settle the job with RabbitMQ: {type(exc).__name__}: {exc}") from exc

    async def _move(self, job: Job, delay: float) -> None:
        """Republish ``job`` to the retry tier for ``delay``, then settle the original."""
        message = self._message(job)
        try:
            tier = tier_for(delay)
            await self._publish(replace(job, id=None), await self._ensure_tier(job.connector, tier))
        except Exception:
            await self._settle(message, requeue=True)
            raise
        await self._settle(message)

    async def done(self, job: Job) -> None:
        await self._settle(self._message(job))

    async def done_many(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            await self.done(job)

    async def reschedule(self, job: Job, next_at: float, error: str) -> None:
        await self._move(replace(job, last_error=error), max(0.0, next_at - time.time()))

    async def release(self, job: Job, delay: float = 0.0) -> None:
        if delay > 0:
            await self._move(job, delay)
        else:
            await self._settle(self._message(job), requeue=True)

    async def dead_letter(self, job: Job, reason: str, error: str) -> int:
        message = self._message(job) if job.id is not None else None
        try:
            dl_id = await self.local.dead_letter(replace(job, id=None), reason, error)
        except SpoolError:
            if message is not None:
                await self._settle(message, requeue=True)
            raise
        if message is not None:
            await self._settle(message)
        return dl_id

    async def _on_dead(self, message: AbstractIncomingMessage) -> None:
        """A job over the delivery limit: keep it as this replica's dead letter."""
        deaths = message.headers.get("x-death") or []
        queue = str(deaths[0].get("queue", "")) if isinstance(deaths, list) and deaths and \
            isinstance(deaths[0], dict) else ""
        connector = queue.removeprefix(f"{self.prefix}.jobs.") if queue.startswith(f"{self.prefix}.jobs.") else ""
        job = self._job_from(message, connector)
        self._held.pop(job.id or 0, None)
        error = f"handed out {self.delivery_limit}+ times without an outcome (x-delivery-limit), from {queue}"
        try:
            await self.local.put([], dead=[(replace(job, id=None), "delivery_limit", error)])
        except SpoolError:
            await message.nack(requeue=True)
            return
        await message.ack()

    async def connectors_with_jobs(self) -> list[str]:
        return []  # the engine starts a worker for every outbound connector anyway

    async def depth(self) -> dict[str, tuple[int, float]]:
        if self._admin is None:
            raise SpoolError("the RabbitMQ spool is not open")
        now = time.time()
        queues = [(c, self.job_queue(c), self._job_args()) for c in list(self._declared)]
        queues += [(c, name, self._tier_args(c, tier)) for name, (c, tier) in list(self._tiers.items())]
        out: dict[str, tuple[int, float]] = {}
        try:
            for connector, queue, args in queues:
                declared = await self._admin.declare_queue(queue, durable=True, arguments=args)
                count = declared.declaration_result.message_count or 0
                out[connector] = (out.get(connector, (0, now))[0] + count, now)
        except Exception as exc:
            raise SpoolError(f"cannot read queue depths: {type(exc).__name__}: {exc}") from exc
        return {c: v for c, v in out.items() if v[0]}

    # --- idempotency and dead letters: this replica's own -----------------------------------------

    async def recall(self, source: str, key: str, since: float) -> Remembered | None:
        return await self.local.recall(source, key, since)

    async def forget_before(self, before: float) -> int:
        return await self.local.forget_before(before)

    async def dead_letters(self, flt: DeadLetterFilter | None = None, limit: int = 100) -> list[DeadLetter]:
        return await self.local.dead_letters(flt, limit)

    async def dead_letter_by_id(self, dl_id: int) -> DeadLetter | None:
        return await self.local.dead_letter_by_id(dl_id)

    async def count_dead_letters(self, flt: DeadLetterFilter | None = None) -> int:
        return await self.local.count_dead_letters(flt)

    async def purge(self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None) -> int:
        return await self.local.purge(ids, flt)

    async def replay(
        self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None, *, connector: str | None = None,
    ) -> list[str]:
        if ids is not None:
            found = [await self.local.dead_letter_by_id(i) for i in ids]
            items = [d for d in found if d is not None]
        elif flt is not None:
            items = await self.local.dead_letters(flt, limit=1_000_000)
        else:
            items = []
        items = [d for d in items if connector or d.connector]
        jobs = [Job(envelope_id=d.envelope_id, route=d.route, connector=connector or d.connector, envelope=d.envelope,
                    options=d.options if connector is None else "{}", policy=d.policy, timeout=d.timeout)
                for d in items]
        await self.put(jobs)  # confirmed by the broker before the dead letters go
        await self.local.purge([d.id for d in items])
        return [j.connector for j in jobs]
