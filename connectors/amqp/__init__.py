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
  as text; envelope id = message id (or the CloudEvents id). The W3C trace context travels as
  the headers ``traceparent``/``tracestate`` both ways (in CloudEvents mode also
  ``cloudEvents:traceparent``), as envelope attributes of the same names inside.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aio_pika
from yarl import URL

from connectors.amqp.config import AmqpConfig, AmqpTarget
from connectors.amqp.inbound import AmqpInbound
from connectors.amqp.outbound import AmqpOutbound
from connectors.broker_common.connection import tls_context
from gateway.sdk import Deliver, Health, PermanentError, TransientError, current_secret, event

__all__ = ["AmqpConfig", "AmqpConnector", "AmqpTarget"]


# The inbound side (inbound.py) and the outbound side (outbound.py) both build on the connection
# (connection.py). This class adds the lifecycle, and the connect and close that re-declare,
# resume and reset all three.
class AmqpConnector(AmqpInbound, AmqpOutbound):
    kind = "amqp"
    shares_inbound = True
    Config = AmqpConfig
    Options = AmqpTarget
    supports_inbound = True
    supports_outbound = True
    batches = True
    subject_syntax = "dotted"

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
        await self._inflight_in.drained(drain)
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

    # --- the connection ------------------------------------------------------------------

    async def _connect_once(self) -> None:
        cfg = self.cfg
        self._lost.clear()
        kwargs: dict[str, Any] = {"timeout": cfg.connect_timeout,
                                  "client_properties": {"connection_name": f"gateway-{self.name}"}}
        if cfg.use_tls:
            kwargs["ssl"] = True
            kwargs["ssl_context"] = tls_context(cfg.tls)
        url = cfg.url.replace("amqp://", "amqps://", 1) if cfg.use_tls else cfg.url
        target = URL(url).update_query(heartbeat=cfg.heartbeat)
        if cfg.username:
            # In the URL: aio-pika ignores login= and password= when it is given a URL (the broker
            # then saw guest/guest). The password file is read again for every connection.
            target = target.with_user(cfg.username).with_password(current_secret(cfg.password))
        conn = await aio_pika.connect(target, **kwargs)
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
