"""The MQTT connector's inbound side: subscriptions, received messages and their acknowledgements.

:class:`MqttInbound` subscribes (one SUBSCRIBE for every filter; readiness waits for its
SUBACK), hands each received PUBLISH to the router (up to ``max_inflight`` at once, reading
pauses beyond), keeps a message whose outcome is RETRY unacknowledged and hands it over again
with backoff, writes dead letters, and acknowledges in arrival order (PUBACK or PUBREC, or an
MQTT 5 reason code for a rejection). The guarantees are described in :mod:`connectors.mqtt`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from connectors.mqtt.client import Received
from connectors.mqtt.connection import MqttConnection
from connectors.mqtt.mapping import Incoming, to_envelope
from gateway.sdk import (
    Backoff,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Envelope,
    InFlight,
    Outcome,
    Status,
    event,
    structured_event,
)

_REFUSE_GENERIC = 0x83  # implementation specific error: valid, but the receiver will not take it
_REFUSE_QUOTA = 0x97


@dataclass
class _Pending:
    """One received QoS 1/2 message waiting for its outcome, in arrival order."""

    generation: int
    mid: int
    qos: int
    envelope_id: str = ""
    outcome: Outcome | None = None


class MqttInbound(MqttConnection):
    """Subscriptions, received messages, dead letters and acknowledgements."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        # subscriptions of the current connection: SUBSCRIBE packet id → its (filter, qos) pairs
        # until the SUBACK arrives; inbound readiness needs every filter granted
        self._sub_pending: dict[int, list[tuple[str, int]]] = {}
        self._sub_confirmed = False
        self._sub_error = ""
        #: After a refused SUBSCRIBE: the wait before asking again (backoff from reconnect_min to
        #: reconnect_max), so an access rule fixed on the broker takes effect without a restart.
        self._resubscribes = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max, rng=self._rng)
        self._deliver: Deliver | None = None
        self._listening = False
        self._ackq: deque[_Pending] = deque()
        self._early: list[tuple[int, Received]] = []
        self._inflight_in = InFlight()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _subscribe(self) -> None:
        """Send one SUBSCRIBE for every filter; :meth:`health` stays down until its SUBACK."""
        client = self._client_or_fail()
        # Several worker processes split the messages of one shared subscription between them.
        subs = self.cfg.subscriptions(f"gateway-{self.name}" if self.ctx.workers > 1 else None)
        self._sub_pending.clear()
        self._sub_confirmed = False
        self._sub_error = ""
        try:
            if self.cfg.protocol == "5":
                # retain handling 1: retained messages only for a new subscription, not on every reconnect
                rc, mid = client.subscribe([(f, SubscribeOptions(qos=q, retainHandling=1)) for f, q in subs])
            else:
                rc, mid = client.subscribe(subs)
        except ValueError as exc:  # paho's own checks; raised in on_connect it would be swallowed
            rc, mid, why = MQTTErrorCode.MQTT_ERR_INVAL, None, str(exc)
        else:
            why = mqtt.error_string(rc)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            # not connected any more (the next connect subscribes again) or a filter paho refuses
            self._sub_error = f"cannot subscribe: {why}"
            event(self.log, "mqtt.subscribe_failed", logging.WARNING, connector=self.name, error=self._sub_error)
            return
        self._sub_pending[mid] = subs

    def _subscribe_again(self, generation: int) -> None:
        """Ask again for what the broker refused, if still on the connection that was refused."""
        if generation == self._generation and self._connected and self._listening and not self._closing:
            self._subscribe()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        subs = self._sub_pending.pop(mid, None)
        if subs is None:
            return  # the answer to a SUBSCRIBE that a later one replaced
        refused = [f"{f!r} ({r})" for (f, _), r in zip(subs, reasons, strict=False) if r.is_failure]
        refused += [f"{f!r} (no reason code in the SUBACK)" for f, _ in subs[len(reasons):]]
        if refused:
            self._sub_error = ("the broker refused the subscription to " + ", ".join(refused)
                               + ": no message on it would reach the gateway")
            delay = self._resubscribes.next()
            event(self.log, "mqtt.subscribe_refused", logging.ERROR, connector=self.name, error=self._sub_error,
                  retry_in=round(delay, 2))
            asyncio.get_running_loop().call_later(delay, self._subscribe_again, self._generation)
            return
        downgraded = [f"{f!r} (QoS {r.value} instead of {q})" for (f, q), r in zip(subs, reasons, strict=False)
                      if r.value < q]
        if downgraded:
            # still a subscription, but with weaker guarantees than configured (QoS 0: at most once)
            event(self.log, "mqtt.subscribe_downgraded", logging.WARNING, connector=self.name,
                  filters=", ".join(downgraded))
        if not self._sub_pending and not self._sub_error:
            self._sub_confirmed = True
            self._resubscribes.reset()
            event(self.log, "mqtt.subscribed", connector=self.name, filters=", ".join(f for f, _ in subs))

    def _on_received(self, msg: Received) -> None:
        if self._deliver is None and not self._closing:
            # A persistent session delivers what waited for us right after CONNACK, before the
            # supervisor calls listen(): keep it (the broker's Receive Maximum bounds QoS 1/2).
            if msg.qos > 0 or len(self._early) < self.cfg.max_inflight:
                self._early.append((self._generation, msg))
            return
        if not self._listening:
            return  # stopping: not acknowledged, the broker redelivers it after the next connect
        pending = _Pending(self._generation, msg.mid, msg.qos)
        if msg.qos > 0:
            self._ackq.append(pending)
        self._inflight_in.add()
        if self._inflight_in.count >= self.cfg.max_inflight:
            self._pause_reading()
        task = asyncio.get_running_loop().create_task(self._handle(msg, pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Received, pending: _Pending) -> None:
        deliver = self._deliver
        try:
            try:
                incoming = _incoming(msg)
            except UnicodeDecodeError:
                env = Envelope(source=self.name, protocol="mqtt", subject="", body=msg.payload,
                               attributes={"mqtt.topic_hex": msg.topic_raw.hex(), "mqtt.qos": msg.qos})
                pending.envelope_id = env.id
                pending.outcome = await self._dead_letter(env, "invalid_topic", "the topic is not valid UTF-8")
                return
            if len(incoming.payload) > self.cfg.max_payload:
                env = to_envelope(self.name, incoming, self.cfg.content_type, event=None)
                pending.envelope_id = env.id
                pending.outcome = await self._dead_letter(
                    env, "too_large", f"payload of {len(incoming.payload)} bytes is over max_payload "
                    f"{self.cfg.max_payload}")
                return
            document = await structured_event(incoming.payload, incoming.content_type or self.cfg.content_type)
            env = to_envelope(self.name, incoming, self.cfg.content_type, event=document)
            pending.envelope_id = env.id
            assert deliver is not None
            pending.outcome = await self._deliver_until_decided(deliver, env, pending)
        except Exception as exc:  # a bug must not acknowledge anything
            self.log.exception("mqtt.handle_failed", extra={"fields": {"connector": self.name}})
            pending.outcome = Outcome.retry(pending.envelope_id, f"internal error ({type(exc).__name__})")
        finally:
            self._inflight_in.done()
            if self._reading_paused and self._inflight_in.count < self.cfg.max_inflight:
                self._resume_reading()
            if msg.qos > 0:
                self._flush_acks()

    def _flush_acks(self) -> None:
        """Acknowledge decided messages in arrival order, stopping at the first undecided one."""
        client = self._client
        while self._ackq:
            p = self._ackq[0]
            if p.generation != self._generation or not self._connected or client is None:
                if p.generation == self._generation and p.outcome is None:
                    break  # still deciding on the current connection
                self._ackq.popleft()  # from an earlier connection: the broker redelivers it
                continue
            outcome = p.outcome
            if outcome is None:
                break
            if outcome.acknowledge:
                client.ack(p.mid, p.qos)
            elif outcome.status is Status.REJECTED:
                reason = _REFUSE_QUOTA if outcome.code == 413 else _REFUSE_GENERIC
                client.refuse(p.mid, p.qos, reason)
                event(self.log, "mqtt.rejected", logging.WARNING, connector=self.name, envelope_id=p.envelope_id,
                      reason=outcome.reason, code=outcome.code)
            else:
                break  # RETRY while stopping: stays unacknowledged, the broker redelivers it
            self._ackq.popleft()

    async def _deliver_until_decided(self, deliver: Deliver, env: Envelope, pending: _Pending) -> Outcome:
        """Hand the envelope over; on RETRY keep it unacknowledged and try again with backoff.

        While it waits it holds its place in the in-flight window, so the broker (Receive
        Maximum) slows down instead of the gateway buffering more. If the connection drops or
        the connector stops meanwhile, we give up: the broker redelivers it after the reconnect.
        """
        outcome = await deliver(env)
        backoff = Backoff(0.25, 30.0, rng=self._rng)
        while (outcome.status is Status.RETRY and self._listening and not self._closing
               and pending.generation == self._generation):
            await asyncio.sleep(backoff.next(at_least=outcome.retry_after or 0.0))
            if not self._listening or pending.generation != self._generation:
                break
            outcome = await deliver(env)
        return outcome

    async def _dead_letter(self, env: Envelope, reason: str, error: str) -> Outcome:
        """Keep a message the gateway will not route; only then may it be acknowledged.

        Uses the core's dead letters when the runtime offers ``ctx.dead_letter``; until then a
        fsync'd JSON line in ``<state_dir>/dead-letters.jsonl``.
        """
        event(self.log, "mqtt.dead_letter", logging.WARNING, connector=self.name, envelope_id=env.id,
              reason=reason, error=error)
        core = getattr(self.ctx, "dead_letter", None)
        if core is not None:
            result: Outcome = await core(env, reason, error)
            return result
        line = json.dumps({"connector": self.name, "reason": reason, "error": error,
                           "at": datetime.now(UTC).isoformat(), "envelope": env.as_dict()},
                          ensure_ascii=False).encode() + b"\n"
        try:
            await asyncio.to_thread(_append_fsync, os.path.join(self.ctx.state_dir, "dead-letters.jsonl"), line)
        except OSError as exc:
            return Outcome.retry(env.id, f"cannot store the dead letter: {exc.strerror}", retry_after=5)
        return Outcome(Status.DEAD_LETTERED, env.id, reason=error)


def _incoming(msg: Received) -> Incoming:
    """A decoded PUBLISH as mapping input (raises UnicodeDecodeError for a topic that is not UTF-8)."""
    p = msg.properties
    return Incoming(topic=msg.topic, payload=msg.payload, qos=msg.qos, retain=msg.retain, dup=msg.dup,
                    content_type=p.get("ContentType"), user_properties=p.get("UserProperty", ()),
                    correlation_data=p.get("CorrelationData"), response_topic=p.get("ResponseTopic"),
                    message_expiry=p.get("MessageExpiryInterval"), payload_format=p.get("PayloadFormatIndicator"))


def _append_fsync(path: str, line: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
