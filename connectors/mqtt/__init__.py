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
  reason and an ``mqtt.subscribe_refused`` error in the log, and is asked for again with backoff
  (``reconnect_min`` doubling to ``reconnect_max``) until the broker grants it.

Address form
  ``url: mqtt://host:1883`` or ``mqtts://host:8883``; subject = topic; routes match with
  MQTT filters (``plant/+/boiler/#``).

Envelope
  Attributes ``mqtt.topic``, ``mqtt.qos``, ``mqtt.retain``, ``mqtt.dup``, ``mqtt.message_expiry``,
  ``mqtt.payload_format``; headers = MQTT 5 user properties; content type from MQTT 5 (else
  ``content_type`` of the connector); correlation_id / reply_to = correlation data / response
  topic. CloudEvents binary mode (user properties ``specversion``, ``id``, ``source``, ``type``…)
  both ways (``cloudevents: true`` on a target), structured mode inbound. The W3C trace context
  travels as the user properties ``traceparent``/``tracestate`` both ways (envelope attributes
  of the same names inside); MQTT 3.1.1 has no properties, so it does not cross a 3.1.1 hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.broker_common.connection import tls_context
from connectors.mqtt.client import GatewayClient
from connectors.mqtt.config import MqttConfig, MqttTarget
from connectors.mqtt.connection import _ConnectFailed
from connectors.mqtt.inbound import MqttInbound
from connectors.mqtt.outbound import MqttOutbound
from gateway.sdk import Deliver, Health, PermanentError, event

__all__ = ["MqttConfig", "MqttConnector", "MqttTarget"]


# The inbound side (inbound.py) and the outbound side (outbound.py) both build on the connection
# (connection.py). This class adds the lifecycle and the paho client, whose CONNACK and DISCONNECT
# callbacks touch all three.
class MqttConnector(MqttInbound, MqttOutbound):
    kind = "mqtt"
    shares_inbound = True
    Config = MqttConfig
    Options = MqttTarget
    supports_inbound = True
    supports_outbound = True
    batches = True
    subject_syntax = "topic"

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
        await self._inflight_in.drained(drain)
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

    # --- the client: CONNECT, CONNACK, DISCONNECT ----------------------------------------

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
        # username and password: set before every connection (MqttConnection._connect_once)
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
