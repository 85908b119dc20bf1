"""amqp — AMQP 0-9-1 in and out (aio-pika / aiormq, RabbitMQ).

Features
  Inbound: consume one queue, declared with its arguments (durable, quorum or classic, DLX,
  any x-argument) or used as it exists (``declare: false``), optional exchange bindings with
  routing keys; ``prefetch`` is the back-pressure bound; messages go to the router concurrently.
  Outbound: templated exchange and routing key, persistent delivery, publisher confirms,
  ``mandatory`` with returned messages treated as failures, properties from the envelope
  (content type, message id = envelope id, correlation id, reply-to, expiration, timestamp,
  headers), CloudEvents binary mode (``cloudEvents:*``), and RPC: a target with ``reply: true``
  publishes with ``reply_to`` (a private exclusive queue) and a fresh ``correlation_id`` and
  waits for the answer until the route's timeout.
  TLS (``amqps://``, CA, client certificate, server name), credentials from secrets; one
  connection per connector, reconnected with backoff and jitter, re-declaring what it declared
  (exchanges, queue, bindings) and resuming consumption.

Delivery guarantee (at least once)
  Inbound acknowledgement follows the outcome: accepted / dead-lettered / dropped → ``ack``
  (consecutive ones in one ``multiple`` ack); retry → ``nack(requeue=True)`` after the
  outcome's ``retry_after`` (capped by ``max_retry_delay``), until the message was delivered
  ``delivery_limit`` times (``x-delivery-count`` of quorum queues, else counted here), then
  ``reject(requeue=False)``; rejected or a body over ``max_body`` → ``reject(requeue=False)``,
  which the queue's dead-letter exchange receives (``x-death`` names the reason) — configure
  one, or RabbitMQ discards such messages. A channel that closes with messages in flight
  leaves them to the broker, which redelivers them (duplicates only in that window).
  Outbound: delivered means the broker's publisher confirm (``basic.ack``: on disk for
  persistent messages to durable queues). ``basic.nack``, a returned (unroutable) message, an
  exchange that does not exist, lost connection or no confirm in time → transient (retried,
  then dead-lettered by the route's policy); an invalid exchange name, routing key or a body
  over ``max_body`` → permanent. RPC: no reply in time → transient with code 504; a reply
  with header ``x-http-status`` ≥ 400 → permanent with that code.

Address form
  ``url: amqp://host:5672/vhost``; subject = routing key; routes match with AMQP patterns
  (``orders.*.created``, ``plant.#``).

Envelope
  Attributes ``amqp.exchange``, ``amqp.routing_key``, ``amqp.redelivered``, ``amqp.message_id``,
  ``amqp.type``, ``amqp.app_id``, ``amqp.priority``, ``amqp.delivery_mode``, ``amqp.expiration``,
  ``amqp.timestamp``, ``amqp.user_id``, ``amqp.delivery_count``; headers = application headers
  as text; envelope id = message id (or the CloudEvents id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from connectors.amqp.mapping import AmqpConfig, AmqpTarget, Delivery, Publish, to_envelope, to_publish
from connectors.broker_common.connection import BrokerConnector, describe, tls_context
from gateway.contract import (
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Health,
    PermanentError,
    Reply,
    Status,
    Target,
    TransientError,
)
from gateway.envelope import Envelope
from gateway.logs import event

__all__ = ["AmqpConfig", "AmqpConnector", "AmqpTarget"]

_EXCHANGE_CHECK_TTL = 30.0
_ATTEMPTS_REMEMBERED = 10_000


@dataclass
class _InFlight:
    tag: int
    generation: int
    ready: bool = False  # decided: acknowledge


class AmqpConnector(BrokerConnector):
    kind = "amqp"
    Config = AmqpConfig
    Options = AmqpTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "dotted"
    cfg: AmqpConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, AmqpConfig)
        self.cfg = config
        self._conn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None
        self._pub_raw: aiormq.abc.AbstractChannel | None = None
        self._pub_lock = asyncio.Lock()
        self._consume_raw: aiormq.abc.AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._generation = 0
        # inbound
        self._deliver: Deliver | None = None
        self._listening = False
        self._unsettled: dict[int, _InFlight] = {}
        self._ack_lock = asyncio.Lock()
        self._consume_lock = asyncio.Lock()
        self._flush_scheduled = False
        self._inflight_in = 0
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        # outbound
        self._known_exchanges: dict[str, float] = {}
        self._publishing_ids: dict[str, asyncio.Future[None]] = {}
        self._reply_queue: str | None = None
        self._replies: dict[str, asyncio.Future[DeliveredMessage]] = {}

    # --- lifecycle -----------------------------------------------------------------------

    async def listen(self, deliver: Deliver) -> None:
        if self.cfg.queue is None:
            raise PermanentError(f"connector {self.name!r} is used as a source but has no 'queue'")
        self._deliver = deliver
        self._listening = True
        if self._connected and self._consumer_tag is None:
            try:
                await self._consume()
            except Exception as exc:
                await self._drop_connection(f"consume failed: {exc}")
                raise TransientError(f"cannot consume {self.cfg.queue.name!r}: {exc}") from exc

    async def stop_listening(self, drain: float) -> None:
        """Cancel the consumer, wait for in-flight messages' outcomes, send their acks."""
        self._listening = False
        raw, tag = self._consume_raw, self._consumer_tag
        self._consumer_tag = None
        if raw is not None and tag is not None and not raw.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(raw.basic_cancel(tag), timeout=max(0.1, min(drain, 5)))
        deadline = time.monotonic() + drain
        while self._inflight_in and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self._flush_acks()

    async def close(self) -> None:
        self._closing = True
        self._listening = False
        await self._stop_runner()
        for task in list(self._tasks):
            task.cancel()
        await self._close_connection()
        self._connected = False
        self._up.clear()

    def health(self) -> Health:
        return Health(True) if self._connected else Health(False, self._error)

    def _where(self) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(self.cfg.url)
        return f"{parts.hostname}:{parts.port or (5671 if self.cfg.use_tls else 5672)}"

    # --- the connection ------------------------------------------------------------------

    async def _connect_once(self) -> None:
        cfg = self.cfg
        self._lost.clear()
        kwargs: dict[str, Any] = {"timeout": cfg.connect_timeout,
                                  "client_properties": {"connection_name": f"gateway-{self.name}"}}
        if cfg.username:
            kwargs["login"] = cfg.username
        if cfg.password is not None:
            kwargs["password"] = cfg.password.get_secret_value()
        if cfg.use_tls:
            kwargs["ssl"] = True
            kwargs["ssl_context"] = tls_context(cfg.tls)
        url = cfg.url.replace("amqp://", "amqps://", 1) if cfg.use_tls else cfg.url
        sep = "&" if "?" in url else "?"
        conn = await aio_pika.connect(f"{url}{sep}heartbeat={cfg.heartbeat}", **kwargs)
        self._conn = conn
        conn.close_callbacks.add(self._on_connection_closed)
        self._generation += 1
        self._unsettled.clear()
        self._consumer_tag = None
        self._reply_queue = None
        self._known_exchanges.clear()
        await self._open_publisher()
        assert self._pub is not None
        for ex in cfg.exchanges:
            await self._pub.declare_exchange(ex.name, ex.type, durable=ex.durable)
        if self._listening:
            await self._consume()
        self._connected = True
        self._error = ""
        self._up.set()
        event(self.log, "amqp.connected", connector=self.name, broker=self._where())

    def _on_connection_closed(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._closing and exc is not None:
            self._error = f"connection closed: {describe(exc)}"
        self._connected = False
        self._up.clear()
        self._lost.set()

    async def _drop_connection(self, why: str) -> None:
        self._error = why
        self._lost.set()

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._pub = self._pub_raw = self._consume_raw = None
        self._consume_channel = None
        self._consumer_tag = None
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(TransientError("AMQP connection lost before the reply"))
        self._replies.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=5)

    async def _open_publisher(self) -> None:
        assert self._conn is not None
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._pub_raw = await self._pub.get_underlay_channel()
        self._reply_queue = None

    async def _publisher(self) -> aiormq.abc.AbstractChannel:
        """The confirm-mode channel, reopened if the broker closed it (e.g. after a 404)."""
        raw = self._pub_raw
        if raw is not None and not raw.is_closed:
            return raw
        async with self._pub_lock:
            if self._pub_raw is not None and not self._pub_raw.is_closed:
                return self._pub_raw
            if self._conn is None or not self._connected:
                raise TransientError(f"AMQP broker {self._where()} not connected: {self._error}")
            await self._open_publisher()
            assert self._pub_raw is not None
            return self._pub_raw

    # --- inbound -------------------------------------------------------------------------

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
        self._inflight_in += 1
        try:
            await self._handle(message, entry)
        except Exception:
            self.log.exception("amqp.handle_failed", extra={"fields": {"connector": self.name}})
            await self._settle(entry, nack=True)
        finally:
            self._inflight_in -= 1

    async def _handle(self, message: DeliveredMessage, entry: _InFlight) -> None:
        delivery = _delivery(message)
        env = to_envelope(self.name, delivery, self.cfg.content_type)
        if len(delivery.body) > self.cfg.max_body:
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

    # --- outbound ------------------------------------------------------------------------

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        opts = target.options
        assert isinstance(opts, AmqpTarget)
        pub = to_publish(env, opts, persistent=self.cfg.persistent, mandatory=self.cfg.mandatory,
                         max_body=self.cfg.max_body)
        if not self._connected:
            raise TransientError(f"AMQP broker {self._where()} not connected: {self._error}")
        timeout = max(0.1, target.timeout - 0.05)
        if target.want_reply:
            return await self._call(pub, timeout)
        await self._publish(pub, timeout)
        return None

    async def _publish(self, pub: Publish, timeout: float) -> None:  # noqa: ASYNC109 - the confirm deadline
        raw = await self._publisher()
        await self._check_exchange(pub.exchange)
        message_id = str(pub.properties.get("message_id", ""))
        # aiormq matches a returned message to its publish by message id: never have two
        # publishes with one id in flight on the channel.
        while message_id in self._publishing_ids:
            await asyncio.shield(self._publishing_ids[message_id])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._publishing_ids[message_id] = done
        where = f"exchange {pub.exchange or '(default)'!r} routing key {pub.routing_key!r}"
        try:
            result = await raw.basic_publish(pub.body, exchange=pub.exchange, routing_key=pub.routing_key,
                                             properties=_properties(pub.properties), mandatory=pub.mandatory,
                                             timeout=timeout)
        except aiormq.exceptions.PublishError as exc:
            raise TransientError(f"unroutable: the broker returned the message ({where}, "
                                 f"{getattr(exc.frame, 'reply_text', 'NO_ROUTE')})", code=503) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise TransientError(f"the broker refused the message (basic.nack) for {where}") from exc
        except TimeoutError as exc:
            raise TransientError(f"no publisher confirm within {timeout:g}s for {where}", code=504) from exc
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            raise TransientError(f"publish to {where} failed: {describe(exc)}") from exc
        finally:
            self._publishing_ids.pop(message_id, None)
            done.set_result(None)
        if not isinstance(result, Basic.Ack):
            raise TransientError(f"unexpected publisher confirm {type(result).__name__} for {where}")

    async def _check_exchange(self, name: str) -> None:
        """Publishing to a missing exchange closes the channel (failing every publish in flight),
        so a name not seen lately is checked passively on a throwaway channel first."""
        if not name or name.startswith("amq."):
            return
        now = time.monotonic()
        if self._known_exchanges.get(name, 0.0) > now:
            return
        conn = self._conn
        if conn is None:
            raise TransientError(f"AMQP broker {self._where()} not connected: {self._error}")
        try:
            channel = await conn.channel(publisher_confirms=False)
        except Exception as exc:
            raise TransientError(f"cannot open a channel: {describe(exc)}") from exc
        try:
            await channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise TransientError(f"exchange {name!r} does not exist", code=503) from exc
        except Exception as exc:
            raise TransientError(f"cannot check exchange {name!r}: {describe(exc)}") from exc
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._known_exchanges[name] = now + _EXCHANGE_CHECK_TTL

    async def _call(self, pub: Publish, timeout: float) -> Reply:  # noqa: ASYNC109 - the reply deadline
        """RPC: publish with reply_to + a fresh correlation id, wait for the answer."""
        reply_queue = await self._ensure_reply_queue()
        correlation = uuid.uuid4().hex
        props = {**pub.properties, "reply_to": reply_queue, "correlation_id": correlation}
        fut: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()
        self._replies[correlation] = fut
        started = time.monotonic()
        try:
            await self._publish(Publish(pub.exchange, pub.routing_key, pub.body, pub.mandatory, props), timeout)
            remaining = max(0.05, timeout - (time.monotonic() - started))
            try:
                answer = await asyncio.wait_for(fut, timeout=remaining)
            except TimeoutError:
                raise TransientError(f"no RPC reply within {timeout:g}s", code=504) from None
        finally:
            self._replies.pop(correlation, None)
        props_in = answer.header.properties
        headers = {str(k): _text(v) for k, v in (props_in.headers or {}).items()}
        status = _status(headers.get("x-http-status"))
        body = answer.body or b""
        ctype = props_in.content_type or "application/octet-stream"
        if status >= 400:
            detail = {"status": status, "body": body[:300].decode("utf-8", errors="replace")}
            raise PermanentError(f"RPC reply with status {status}", code=status, detail=detail)
        return Reply(body=body, content_type=ctype, headers=headers, status=status)

    async def _ensure_reply_queue(self) -> str:
        if self._reply_queue is not None and self._pub is not None and not self._pub.is_closed:
            return self._reply_queue
        async with self._pub_lock:
            if self._reply_queue is not None:
                return self._reply_queue
            if self._pub is None or self._pub.is_closed:
                raise TransientError(f"AMQP broker {self._where()} not connected: {self._error}")
            name = f"gateway.rpc.{self.name}.{uuid.uuid4().hex[:12]}"
            queue = await self._pub.declare_queue(name, exclusive=True, auto_delete=True, durable=False)
            raw = await self._pub.get_underlay_channel()
            await raw.basic_consume(queue.name, self._on_reply, no_ack=True)
            self._reply_queue = name
            return name

    async def _on_reply(self, message: DeliveredMessage) -> None:
        correlation = message.header.properties.correlation_id
        fut = self._replies.get(correlation or "")
        if fut is None:
            event(self.log, "amqp.reply_unmatched", logging.INFO, connector=self.name)
            return
        if not fut.done():
            fut.set_result(message)


def _attempt_key(delivery: Delivery) -> str:
    if delivery.message_id:
        return f"id:{delivery.message_id}"
    digest = hashlib.sha256(delivery.body)
    digest.update(f"\0{delivery.exchange}\0{delivery.routing_key}".encode())
    return f"sha:{digest.hexdigest()}"


def _properties(props: dict[str, Any]) -> aiormq.spec.Basic.Properties:
    p = dict(props)
    if "type" in p:
        p["message_type"] = p.pop("type")
    return aiormq.spec.Basic.Properties(**p)


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


def _text(value: Any) -> str:
    from connectors.amqp.mapping import header_text

    return header_text(value)


def _status(raw: str | None) -> int:
    if raw is None:
        return 200
    try:
        value = int(raw)
    except ValueError:
        return 200
    return value if 200 <= value <= 599 else 200

