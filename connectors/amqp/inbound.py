"""The AMQP connector's inbound side: consume the queue, settle each message by its outcome.

:class:`AmqpInbound` declares (or only checks) the queue and its bindings, consumes it on its
own channel with ``prefetch`` as the bound, hands each delivery to the router and settles it by
the outcome: consecutive accepted ones in one ``multiple`` ack, a retry as
``nack(requeue=True)`` after its delay until ``delivery_limit``, a rejection as
``reject(requeue=False)`` for the queue's dead-letter exchange. The guarantees are described in
:mod:`connectors.amqp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from connectors.amqp.connection import AmqpConnection
from connectors.amqp.mapping import Delivery, to_envelope
from connectors.broker_common.connection import describe
from gateway.sdk import ConnectorConfig, ConnectorContext, Deliver, InFlight, Status, event, structured_event

_ATTEMPTS_REMEMBERED = 10_000


@dataclass
class _InFlight:
    tag: int
    generation: int
    ready: bool = False  # decided: acknowledge


class AmqpInbound(AmqpConnection):
    """The consumer: its channel, the messages in flight and their acknowledgements."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self._consume_raw: aiormq.abc.AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._deliver: Deliver | None = None
        self._listening = False
        self._unsettled: dict[int, _InFlight] = {}
        self._ack_lock = asyncio.Lock()
        self._consume_lock = asyncio.Lock()
        self._flush_scheduled = False
        self._inflight_in = InFlight()
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _consume(self) -> None:
        async with self._consume_lock:
            if self._consumer_tag is None:
                await self._consume_locked()

    async def _consume_locked(self) -> None:
        q = self.cfg.queue
        assert q is not None and self._conn is not None
        old = self._consume_channel
        if old is not None and not old.is_closed:
            # listening again after stop_listening: retire the old channel (the broker requeues
            # what it still holds) so no acknowledgement ever goes to the wrong channel
            old.close_callbacks.discard(self._on_consume_channel_closed)
            self._generation += 1
            self._unsettled.clear()
            with contextlib.suppress(Exception):
                await old.close()
        channel = await self._conn.channel(publisher_confirms=False)
        self._consume_channel = channel
        await channel.set_qos(prefetch_count=self.cfg.prefetch)
        queue = await channel.declare_queue(q.name, durable=q.durable, passive=not q.declare,
                                            arguments=dict(q.declare_arguments(self.cfg.delivery_limit))
                                            if q.declare else None)
        for b in q.bindings:
            for key in b.keys():
                await queue.bind(b.exchange, routing_key=key)
        raw = await channel.get_underlay_channel()
        channel.close_callbacks.add(self._on_consume_channel_closed)
        self._consume_raw = raw
        generation = self._generation
        ok = await raw.basic_consume(q.name, lambda m: self._on_delivery(m, generation), no_ack=False)
        self._consumer_tag = ok.consumer_tag

    def _on_consume_channel_closed(self, _sender: Any, exc: BaseException | None = None) -> None:
        if self._closing or not self._listening:
            return
        self._error = f"consumer channel closed: {describe(exc) if exc else 'closed'}"
        self._lost.set()  # reconnect everything: re-declare, re-consume

    async def _on_delivery(self, message: DeliveredMessage, generation: int) -> None:
        tag = message.delivery_tag
        if tag is None:
            return
        entry = _InFlight(tag, generation)
        self._unsettled[tag] = entry
        with self._inflight_in:
            try:
                await self._handle(message, entry)
            except Exception:
                self.log.exception("amqp.handle_failed", extra={"fields": {"connector": self.name}})
                await self._settle(entry, nack=True)

    async def _handle(self, message: DeliveredMessage, entry: _InFlight) -> None:
        delivery = _delivery(message)
        too_large = len(delivery.body) > self.cfg.max_body
        document = None if too_large else await structured_event(delivery.body,
                                                                  delivery.content_type or self.cfg.content_type)
        env = to_envelope(self.name, delivery, self.cfg.content_type, event=document)
        if too_large:
            await self._reject(entry, env.id, "too_large",
                               f"body of {len(delivery.body)} bytes is over max_body {self.cfg.max_body}")
            return
        if not self._listening or self._deliver is None:
            await self._settle(entry, nack=True)
            return
        outcome = await self._deliver(env)
        if outcome.acknowledge:
            self._forget_attempts(delivery)
            entry.ready = True
            self._schedule_flush()
            return
        if outcome.status is Status.REJECTED:
            await self._reject(entry, env.id, "rejected", outcome.reason)
            return
        deliveries = self._count_attempt(delivery)
        if deliveries >= self.cfg.delivery_limit:
            await self._reject(entry, env.id, "delivery_limit",
                               f"still failing after {deliveries} deliveries: {outcome.reason}")
            return
        delay = min(self.cfg.max_retry_delay, max(0.05, outcome.retry_after or 1.0))
        await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))
        await self._settle(entry, nack=True)
        self._schedule_flush()

    async def _reject(self, entry: _InFlight, envelope_id: str, reason: str, error: str) -> None:
        event(self.log, "amqp.rejected", logging.WARNING, connector=self.name, envelope_id=envelope_id,
              reason=reason, error=error)
        await self._settle(entry, nack=False)
        self._schedule_flush()

    async def _settle(self, entry: _InFlight, *, nack: bool) -> None:
        """nack(requeue) or reject one message. Under the ack lock, and the entry leaves
        ``_unsettled`` only once its frame is written, so a ``multiple`` ack can never cover it."""
        async with self._ack_lock:
            try:
                raw = self._consume_raw
                if raw is None or raw.is_closed or entry.generation != self._generation:
                    return  # that channel is gone: the broker requeued the message
                if nack:
                    await raw.basic_nack(entry.tag, multiple=False, requeue=True)
                else:
                    await raw.basic_reject(entry.tag, requeue=False)
            except Exception as exc:
                event(self.log, "amqp.settle_failed", logging.WARNING, connector=self.name, error=describe(exc))
            finally:
                if self._unsettled.get(entry.tag) is entry:
                    del self._unsettled[entry.tag]

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            task = asyncio.get_running_loop().create_task(self._flush_acks())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush_acks(self) -> None:
        """One ``multiple`` ack for the decided prefix, single acks for decided ones behind an
        undecided message (so one slow message never holds the prefetch window)."""
        async with self._ack_lock:
            self._flush_scheduled = False
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        raw = self._consume_raw
        if raw is None or raw.is_closed:
            return
        generation = self._generation
        prefix_max: int | None = None
        singles: list[int] = []
        in_prefix = True
        for tag in sorted(self._unsettled):
            entry = self._unsettled[tag]
            if entry.generation != generation:
                del self._unsettled[tag]
                continue
            if not entry.ready:
                in_prefix = False
                continue
            if in_prefix:
                prefix_max = tag
            else:
                singles.append(tag)
        try:
            if prefix_max is not None:
                for tag in [t for t in self._unsettled if t <= prefix_max]:
                    del self._unsettled[tag]
                await raw.basic_ack(prefix_max, multiple=True)
            for tag in singles:
                self._unsettled.pop(tag, None)
                await raw.basic_ack(tag, multiple=False)
        except Exception as exc:
            event(self.log, "amqp.ack_failed", logging.WARNING, connector=self.name, error=describe(exc))

    def _count_attempt(self, delivery: Delivery) -> int:
        """How many times this message has been delivered: the broker's ``x-delivery-count``
        (quorum queues) or our own count, keyed by message id (or content when it has none)."""
        key = _attempt_key(delivery)
        local = self._attempts.get(key, 0) + 1
        self._attempts[key] = local
        self._attempts.move_to_end(key)
        while len(self._attempts) > _ATTEMPTS_REMEMBERED:
            self._attempts.popitem(last=False)
        broker = delivery.headers.get("x-delivery-count")
        if isinstance(broker, int):
            return max(local, broker + 1)
        return local

    def _forget_attempts(self, delivery: Delivery) -> None:
        if self._attempts:
            self._attempts.pop(_attempt_key(delivery), None)


def _attempt_key(delivery: Delivery) -> str:
    if delivery.message_id:
        return f"id:{delivery.message_id}"
    digest = hashlib.sha256(delivery.body)
    digest.update(f"\0{delivery.exchange}\0{delivery.routing_key}".encode())
    return f"sha:{digest.hexdigest()}"


def _delivery(message: DeliveredMessage) -> Delivery:
    d = message.delivery
    p = message.header.properties
    ts = p.timestamp if isinstance(p.timestamp, datetime) else None
    return Delivery(
        body=bytes(message.body or b""), exchange=getattr(d, "exchange", "") or "",
        routing_key=getattr(d, "routing_key", "") or "", redelivered=bool(getattr(d, "redelivered", False)),
        content_type=p.content_type, headers=dict(p.headers or {}), delivery_mode=p.delivery_mode,
        priority=p.priority, correlation_id=p.correlation_id, reply_to=p.reply_to, expiration=p.expiration,
        message_id=p.message_id, timestamp=ts, type=p.message_type, user_id=p.user_id, app_id=p.app_id,
    )
