"""mqtt — MQTT 3.1.1 and 5 in and out (paho-mqtt ≥ 2, driven from the asyncio loop).

Features
  Inbound: several subscriptions with ``+``/``#`` wildcards, QoS 0/1/2, persistent sessions
  (``clean_start: false`` and a fixed ``client_id``: messages queued while the gateway is away
  arrive when it is back), shared subscriptions (``share: <group>`` → ``$share/<group>/<filter>``).
  Messages go to the router concurrently, up to ``max_inflight`` at once (also announced as the
  MQTT 5 Receive Maximum); when that many are in flight the socket is not read (back-pressure).
  Outbound: templated topic (values are checked: no ``+``, ``#``, NUL, control characters,
  invalid UTF-8, no extra levels unless ``topic_levels: any``), QoS, retain, MQTT 5 content
  type, user properties (the envelope headers), correlation data, response topic, message expiry.
  TLS (CA, client certificate and key, server name), username/password from secrets, reconnect
  with exponential backoff and jitter, optional retained status topic with a last will.

Delivery guarantee (at least once)
  Inbound acknowledgement follows the outcome, in the order the messages arrived (MQTT §4.6):
  accepted / dead-lettered / dropped → PUBACK (QoS 1) or PUBREC (QoS 2: PUBREC is held until
  the outcome, unlike paho's default); retry → no acknowledgement: the message keeps its place
  in the in-flight window (so the broker slows down) and is handed over again with backoff
  (same envelope id); if the connection drops or the gateway stops meanwhile, the persistent
  session makes the broker redeliver it (and whatever was behind it in the window, so those
  may arrive twice); rejected → acknowledged with an MQTT 5 reason code (0x83, or 0x97 for a
  size problem) and logged, since a broker would otherwise redeliver it forever. A payload
  over ``max_payload`` is written to the dead letters with its reason before it is
  acknowledged. QoS 0 is at most once by definition.
  Outbound: delivered means PUBACK (QoS 1) or PUBCOMP (QoS 2) with a success reason code;
  QoS 0 means handed to the socket (at most once). Not connected or no answer in time → transient; a
  topic or payload that cannot be published, or MQTT 5 reason 0x87/0x90/0x99 → permanent.

Readiness
  ``health()`` is down while disconnected and, once routes read from the connector, until the
  broker's SUBACK granted every filter on the current connection (again after each reconnect):
  before that, a message published to a filter may pass the gateway by. A filter the broker
  refuses (reason code ≥ 0x80, e.g. denied by an ACL) keeps it down with the filter in the
  reason and an ``mqtt.subscribe_refused`` error in the log.

Address form
  ``url: mqtt://host:1883`` or ``mqtts://host:8883``; subject = topic; routes match with
  MQTT filters (``plant/+/boiler/#``).

Envelope
  Attributes ``mqtt.topic``, ``mqtt.qos``, ``mqtt.retain``, ``mqtt.dup``, ``mqtt.message_expiry``,
  ``mqtt.payload_format``; headers = MQTT 5 user properties; content type from MQTT 5 (else
  ``content_type`` of the connector); correlation_id / reply_to = correlation data / response
  topic. CloudEvents binary mode (user properties ``specversion``, ``id``, ``source``, ``type``…)
  both ways (``cloudevents: true`` on a target), structured mode inbound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from connectors.broker_common.connection import BrokerConnector, tls_context
from connectors.mqtt.client import GatewayClient, Received
from connectors.mqtt.mapping import (
    Incoming,
    MqttConfig,
    MqttTarget,
    Outgoing,
    to_envelope,
    to_publish,
)
from gateway.contract import (
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Health,
    Outcome,
    PermanentError,
    Reply,
    Status,
    Target,
    TransientError,
)
from gateway.envelope import Envelope
from gateway.logs import event

__all__ = ["MqttConfig", "MqttConnector", "MqttTarget"]

_PERMANENT_REASONS = {0x87, 0x90, 0x99}  # not authorized, topic name invalid, payload format invalid
_REFUSE_GENERIC = 0x83  # implementation specific error: valid, but the receiver will not take it
_REFUSE_QUOTA = 0x97
#: How often overdue publishes are looked for (seconds): a send waits at most this much longer
#: than its timeout for the broker's answer.
_EXPIRY_SWEEP = 0.1


class _ConnectFailed(Exception):
    pass


@dataclass
class _Pending:
    """One received QoS 1/2 message waiting for its outcome, in arrival order."""

    generation: int
    mid: int
    qos: int
    envelope_id: str = ""
    outcome: Outcome | None = None


class MqttConnector(BrokerConnector):
    kind = "mqtt"
    Config = MqttConfig
    Options = MqttTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "topic"
    cfg: MqttConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, MqttConfig)
        self.cfg = config
        self.client_id = config.client_id or f"gateway-{ctx.name}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: GatewayClient | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._writing = False
        self._in_connect = False
        self._connack: asyncio.Future[None] | None = None
        self._connect_job: asyncio.Future[MQTTErrorCode] | None = None
        self._generation = 0
        # subscriptions of the current connection: SUBSCRIBE packet id → its (filter, qos) pairs
        # until the SUBACK arrives; inbound readiness needs every filter granted
        self._sub_pending: dict[int, list[tuple[str, int]]] = {}
        self._sub_confirmed = False
        self._sub_error = ""
        # inbound
        self._deliver: Deliver | None = None
        self._listening = False
        self._ackq: deque[_Pending] = deque()
        self._early: list[tuple[int, Received]] = []
        self._inflight_in = 0
        self._reading_paused = False
        self._read_soon: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # outbound
        self._waiters: dict[int, asyncio.Future[ReasonCode]] = {}
        #: Per waiting publish: (loop time it is overdue, topic, qos, timeout), swept by one timer.
        self._deadlines: dict[int, tuple[float, str, int, float]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._window = _Window(config.max_inflight)
        self._props_cache: dict[tuple[Any, ...], _PackedProperties] = {}

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Make the paho client on the first call; then :meth:`BrokerConnector.open` (the first
        connection is up once the CONNACK arrived)."""
        if self._runner is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._client = self._make_client()
        await super().open()

    async def listen(self, deliver: Deliver) -> None:
        if not self.cfg.subscribe:
            raise PermanentError(f"connector {self.name!r} is used as a source but has no 'subscribe' filters")
        self._deliver = deliver
        self._listening = True
        early, self._early = self._early, []
        for generation, msg in early:
            if generation == self._generation:
                self._on_received(msg)
        if self._connected:
            self._subscribe()

    async def stop_listening(self, drain: float) -> None:
        """Stop handing messages over; wait for those in flight and send their acknowledgements.

        The connection stays up (outbound may still need it); anything unacknowledged is
        redelivered by the broker after the next connect.
        """
        self._listening = False
        deadline = time.monotonic() + drain
        while self._inflight_in and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._flush_acks()
        if self._client is not None and self._fd is not None:
            # let the last acknowledgements reach the socket
            for _ in range(50):
                if not self._client.want_write():
                    break
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._closing = True
        self._listening = False
        client = self._client
        if client is not None and self._connected:
            with contextlib.suppress(Exception):
                client.disconnect()  # a clean DISCONNECT: no last will
                for _ in range(50):
                    if self._fd is None:
                        break
                    await asyncio.sleep(0.01)
        await self._stop_runner()
        for task in list(self._tasks):
            task.cancel()
        job = self._connect_job
        if job is not None and not job.done():
            # a connect still running in its thread would leave a connection behind us
            await asyncio.wait([job], timeout=self.cfg.connect_timeout + 1)
        self._teardown_socket()
        if client is not None:
            with contextlib.suppress(Exception):
                client._sock_close()
        self._fail_waiters("connector closed")
        self._connected = False
        self._up.clear()

    def health(self) -> Health:
        """Up when connected and, while listening, once the broker granted every subscription of
        the current connection (SUBACK). Until then a message published to the filters may not
        reach us, so the connector is not ready for inbound use; a refused filter keeps it down."""
        if not self._connected:
            return Health(False, self._error)
        if self._listening:
            if self._sub_error:
                return Health(False, self._sub_error)
            if not self._sub_confirmed:
                waiting = [f for subs in self._sub_pending.values() for f, _ in subs]
                if not waiting:
                    return Health(False, "not subscribed yet")
                return Health(False, "waiting for the broker to confirm the subscription (SUBACK) to "
                              + ", ".join(repr(f) for f in waiting))
        return Health(True)

    # --- the connection ------------------------------------------------------------------

    def _make_client(self) -> GatewayClient:
        cfg = self.cfg
        v5 = cfg.protocol == "5"
        kwargs: dict[str, Any] = {"client_id": self.client_id, "manual_ack": True,
                                  "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                  "reconnect_on_failure": False}
        if not v5:
            kwargs["clean_session"] = cfg.clean_start
        client = GatewayClient(CallbackAPIVersion.VERSION2, **kwargs)
        client.max_inflight_messages = cfg.max_inflight
        client.connect_timeout = cfg.connect_timeout
        client.suppress_exceptions = True
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password.get_secret_value() if cfg.password else None)
        if cfg.use_tls:
            client.tls_set_context(tls_context(cfg.tls))
        if cfg.status is not None:
            client.will_set(cfg.status.topic, cfg.status.offline, cfg.status.qos, cfg.status.retain)
        props: Properties | None = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0 if cfg.clean_start else min(int(cfg.session_expiry), 0xFFFFFFFF)
            props.ReceiveMaximum = cfg.max_inflight
            props.MaximumPacketSize = cfg.max_packet
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive,
                             clean_start=cfg.clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                             properties=props)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_received = self._on_received
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    async def _connect_once(self) -> None:
        client = self._client
        assert client is not None and self._loop is not None
        self._teardown_socket()
        self._lost.clear()
        self._connack = self._loop.create_future()
        self._in_connect = True
        self._connect_job = asyncio.ensure_future(asyncio.to_thread(client.reconnect))
        self._connect_job.add_done_callback(_retrieve)
        try:
            rc = await asyncio.shield(self._connect_job)
        finally:
            self._in_connect = False
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise _ConnectFailed(mqtt.error_string(rc))
        sock = client.socket()
        if sock is None:
            raise _ConnectFailed("no socket after connect")
        with contextlib.suppress(OSError, AttributeError):
            # paho leaves Nagle on: small PUBACKs would wait for the peer's delayed ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading_paused = False
        client.hold = False
        if client.want_write():
            self._on_register_write(client, None, sock)
        try:
            await asyncio.wait_for(asyncio.shield(self._connack), timeout=self.cfg.connect_timeout)
        except TimeoutError:
            raise _ConnectFailed("no CONNACK in time") from None
        self._schedule_misc()

    async def _close_connection(self) -> None:
        """Stop watching the lost connection's socket (paho closes the socket itself)."""
        self._teardown_socket()

    def _where(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    def _teardown_socket(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        if self._read_soon is not None:
            self._read_soon.cancel()
            self._read_soon = None
        self._fd = None
        self._writing = False

    def _schedule_misc(self) -> None:
        assert self._loop is not None
        self._misc = self._loop.call_later(1.0, self._on_misc)

    def _on_misc(self) -> None:
        client = self._client
        if client is None or self._fd is None:
            return
        client.loop_misc()
        if self._fd is not None:
            self._schedule_misc()

    # paho socket callbacks: ignored while the connect runs in its worker thread (we register
    # the socket ourselves once it returns); otherwise they run on the loop thread.

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        return None

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        self._teardown_socket()
        if self._connected:  # closed without a DISCONNECT callback: still a lost connection
            self._error = self._error or "connection closed"
            self._connected = False
            self._up.clear()
            self._lost.set()

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        if self._fd is not None and not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._in_connect or threading.get_ident() != self._loop_thread:
            return
        if self._fd is not None and self._writing and self._loop is not None:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        self._read_soon = None
        client = self._client
        if client is not None:
            client.read_available()
            if client.buffered() and not self._reading_paused:
                self._read_buffered()  # read already; the socket will not tell us again

    def _read_buffered(self) -> None:
        if self._read_soon is None and self._loop is not None:
            self._read_soon = self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        fut = self._connack
        if reason.is_failure:
            self._error = f"broker refused the connection: {reason}"
            if fut is not None and not fut.done():
                fut.set_exception(_ConnectFailed(self._error))
            return
        self._generation += 1
        self._connected = True
        self._error = ""
        # a new connection: readiness waits for its own SUBACKs (we subscribe again even when the
        # broker kept the session; that is harmless and does not depend on what it kept)
        self._sub_pending.clear()
        self._sub_confirmed = False
        self._sub_error = ""
        server_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if not isinstance(server_max, int) or server_max <= 0:
            server_max = 65535
        # Our own window is the broker's Receive Maximum (Mosquitto announces 20 by default), so
        # paho never queues: its queue is rescanned on every PUBACK.
        self._window.resize(min(self.cfg.max_inflight, server_max))
        self._client_or_fail().limit_inflight(0)
        if self._listening:
            self._subscribe()
        event(self.log, "mqtt.connected", connector=self.name, broker=f"{self.cfg.host}:{self.cfg.port}",
              client_id=self.client_id, session_present=bool(getattr(flags, "session_present", False)))
        status = self.cfg.status
        if status is not None:
            client.publish(status.topic, status.online, status.qos, status.retain)
        if fut is not None and not fut.done():
            fut.set_result(None)
        self._up.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if not self._closing:
            self._error = f"connection lost: {reason}"
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(_ConnectFailed(self._error))
        self._connected = False
        self._up.clear()
        self._lost.set()

    def _subscribe(self) -> None:
        """Send one SUBSCRIBE for every filter; :meth:`health` stays down until its SUBACK."""
        client = self._client_or_fail()
        subs = self.cfg.subscriptions()
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
            event(self.log, "mqtt.subscribe_refused", logging.ERROR, connector=self.name, error=self._sub_error)
            return
        downgraded = [f"{f!r} (QoS {r.value} instead of {q})" for (f, q), r in zip(subs, reasons, strict=False)
                      if r.value < q]
        if downgraded:
            # still a subscription, but with weaker guarantees than configured (QoS 0: at most once)
            event(self.log, "mqtt.subscribe_downgraded", logging.WARNING, connector=self.name,
                  filters=", ".join(downgraded))
        if not self._sub_pending and not self._sub_error:
            self._sub_confirmed = True
            event(self.log, "mqtt.subscribed", connector=self.name, filters=", ".join(f for f, _ in subs))

    def _client_or_fail(self) -> GatewayClient:
        if self._client is None:
            raise TransientError(f"connector {self.name!r} is not open")
        return self._client

    # --- inbound -------------------------------------------------------------------------

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
        self._inflight_in += 1
        if self._inflight_in >= self.cfg.max_inflight:
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
                env = to_envelope(self.name, incoming, self.cfg.content_type)
                pending.envelope_id = env.id
                pending.outcome = await self._dead_letter(
                    env, "too_large", f"payload of {len(incoming.payload)} bytes is over max_payload "
                    f"{self.cfg.max_payload}")
                return
            env = to_envelope(self.name, incoming, self.cfg.content_type)
            pending.envelope_id = env.id
            assert deliver is not None
            pending.outcome = await self._deliver_until_decided(deliver, env, pending)
        except Exception as exc:  # a bug must not acknowledge anything
            self.log.exception("mqtt.handle_failed", extra={"fields": {"connector": self.name}})
            pending.outcome = Outcome.retry(pending.envelope_id, f"internal error ({type(exc).__name__})")
        finally:
            self._inflight_in -= 1
            if self._reading_paused and self._inflight_in < self.cfg.max_inflight:
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
        delay = 0.25
        while (outcome.status is Status.RETRY and self._listening and not self._closing
               and pending.generation == self._generation):
            wait = min(30.0, max(delay, outcome.retry_after or 0.0))
            await asyncio.sleep(wait * (0.5 + self._rng.random() / 2))
            delay = min(30.0, delay * 2)
            if not self._listening or pending.generation != self._generation:
                break
            outcome = await deliver(env)
        return outcome

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading_paused = True
            if self._client is not None:
                self._client.hold = True

    def _resume_reading(self) -> None:
        if self._reading_paused and self._fd is not None and self._loop is not None:
            self._loop.add_reader(self._fd, self._on_readable)
            if self._client is not None and self._client.buffered():
                self._read_buffered()
        self._reading_paused = False
        if self._client is not None:
            self._client.hold = False

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

    # --- outbound ------------------------------------------------------------------------

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        opts = target.options
        assert isinstance(opts, MqttTarget)
        out = to_publish(env, opts, self.cfg.qos, self.cfg.max_payload)
        if not self._connected:
            raise TransientError(f"MQTT broker {self.cfg.host}:{self.cfg.port} not connected: {self._error}")
        async with self._window:
            client = self._client
            if client is None or not self._connected:
                raise TransientError(f"MQTT broker {self.cfg.host}:{self.cfg.port} not connected: {self._error}")
            try:
                info = client.publish(out.topic, out.payload, out.qos, out.retain, properties=self._properties(out))
            except ValueError as exc:  # paho's own topic/payload checks
                raise PermanentError(f"cannot publish to {out.topic!r}: {exc}") from exc
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TransientError(f"publish to {out.topic!r} failed: {mqtt.error_string(info.rc)}")
            if out.qos == 0:
                return None
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[ReasonCode] = loop.create_future()
            self._waiters[info.mid] = fut
            self._deadlines[info.mid] = (loop.time() + max(0.1, target.timeout - 0.05), out.topic, out.qos,
                                         target.timeout)
            if self._expiry is None:
                self._expiry = loop.call_later(_EXPIRY_SWEEP, self._expire_waiters)
            try:
                reason = await fut
            finally:
                self._waiters.pop(info.mid, None)
                self._deadlines.pop(info.mid, None)
        if reason.is_failure:
            err = f"broker refused the publish to {out.topic!r}: {reason}"
            if reason.value in _PERMANENT_REASONS:
                raise PermanentError(err, code=422)
            raise TransientError(err)
        return None

    def _properties(self, out: Outgoing) -> Properties | None:
        """MQTT 5 PUBLISH properties, built and packed once per distinct set (paho's Properties
        are slow to build and to pack, and most messages of a route share theirs)."""
        if self.cfg.protocol != "5":
            return None
        key = (out.content_type, tuple(out.user_properties), out.correlation_data, out.response_topic,
               out.message_expiry)
        cached = self._props_cache.get(key)
        if cached is not None:
            return cached
        props = _PackedProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if out.content_type:
            props.ContentType = out.content_type
        if out.user_properties:
            props.UserProperty = out.user_properties
        if out.correlation_data:
            props.CorrelationData = out.correlation_data
        if out.response_topic:
            props.ResponseTopic = out.response_topic
        if out.message_expiry:
            props.MessageExpiryInterval = out.message_expiry
        props.freeze()
        if len(self._props_cache) >= 1024:
            self._props_cache.clear()
        self._props_cache[key] = props
        return props

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        fut = self._waiters.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _expire_waiters(self) -> None:
        """Fail the publishes whose PUBACK/PUBCOMP is overdue. One timer sweeps them all: a timer
        per publish cost more than the rest of the send."""
        self._expiry = None
        assert self._loop is not None
        now = self._loop.time()
        for mid, (deadline, topic, qos, timeout) in list(self._deadlines.items()):
            fut = self._waiters.get(mid)
            if deadline <= now and fut is not None and not fut.done():
                fut.set_exception(TransientError(f"no {'PUBACK' if qos == 1 else 'PUBCOMP'} for {topic!r} within "
                                                 f"{timeout:g}s", code=504))
        if self._deadlines:
            self._expiry = self._loop.call_later(_EXPIRY_SWEEP, self._expire_waiters)

    def _fail_waiters(self, why: str) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(TransientError(why))
        self._waiters.clear()
        self._deadlines.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None


class _Window:
    """An async bound on unacknowledged publishes that can shrink or grow after CONNACK."""

    def __init__(self, size: int):
        self.size = size
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # granted just as we were cancelled: pass it on
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, size: int) -> None:
        self.size = size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.size:
            fut = self._waiters.popleft()
            if not fut.done():
                self.used += 1
                fut.set_result(None)


class _PackedProperties(Properties):
    """Properties that are packed once, then shared by every publish that carries them (paho
    packs again for each send and resend; they never change after :meth:`freeze`)."""

    def freeze(self) -> None:
        object.__setattr__(self, "_packed", super().pack())  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        packed = self.__dict__.get("_packed")
        if packed is None:
            return super().pack()  # type: ignore[no-any-return,no-untyped-call]
        return packed  # type: ignore[no-any-return]


def _incoming(msg: Received) -> Incoming:
    """A decoded PUBLISH as mapping input (raises UnicodeDecodeError for a topic that is not UTF-8)."""
    p = msg.properties
    return Incoming(topic=msg.topic, payload=msg.payload, qos=msg.qos, retain=msg.retain, dup=msg.dup,
                    content_type=p.get("ContentType"), user_properties=p.get("UserProperty", ()),
                    correlation_data=p.get("CorrelationData"), response_topic=p.get("ResponseTopic"),
                    message_expiry=p.get("MessageExpiryInterval"), payload_format=p.get("PayloadFormatIndicator"))


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen (it is reported where it matters)."""
    if not fut.cancelled():
        fut.exception()


def _append_fsync(path: str, line: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
