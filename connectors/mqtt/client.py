"""paho-mqtt driven from the asyncio loop: no network thread, acknowledgements under our control.

paho's socket callbacks (``on_socket_open`` …) register the socket with the loop; reads,
writes and keepalive run on the loop thread, so callbacks (``on_connect``, ``on_publish``)
arrive there too. Only the blocking connect (TCP + TLS handshake) runs in a worker thread,
while no other call touches the client.

:class:`GatewayClient` changes how received PUBLISH packets are handled (``manual_ack`` only):

* They are decoded here and handed to :attr:`on_received` as a :class:`Received`: paho builds a
  ``Properties`` object, an ``MQTTMessage`` and a ``threading.Condition`` for each one, which
  measured ~70 µs per message — more than the rest of the gateway's MQTT side together.
* QoS 2: paho sends PUBREC on receipt and delivers only at PUBREL. Here the message is handed
  over at once and PUBREC waits for :meth:`ack` like QoS 1's PUBACK, so nothing is
  acknowledged before the gateway took responsibility; PUBCOMP answers PUBREL.
* PUBACK/PUBCOMP are decoded here too (mid and reason code; their optional reason string and
  user properties are not used), with one shared ReasonCode per value.
* :meth:`read_available` reads every packet the socket holds in one wake-up (``loop_read``
  reads one).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

_PUBACK = 0x40
_PUBREC = 0x50


class MalformedPublish(ValueError):
    pass


@dataclass
class Received:
    """One received PUBLISH, decoded."""

    mid: int
    qos: int
    retain: bool
    dup: bool
    topic_raw: bytes
    payload: bytes
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        """The topic (raises UnicodeDecodeError when a broker sent one that is not UTF-8)."""
        return self.topic_raw.decode("utf-8")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for _ in range(4):
        if pos >= len(buf):
            raise MalformedPublish("truncated variable byte integer")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise MalformedPublish("variable byte integer longer than 4 bytes")


def _binary(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 2 > len(buf):
        raise MalformedPublish("truncated length")
    (n,) = struct.unpack_from("!H", buf, pos)
    end = pos + 2 + n
    if end > len(buf):
        raise MalformedPublish("truncated string")
    return bytes(buf[pos + 2:end]), end


def _text(buf: bytes, pos: int) -> tuple[str, int]:
    raw, pos = _binary(buf, pos)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        raise MalformedPublish("a string property is not valid UTF-8") from None


def decode_properties(buf: bytes) -> dict[str, Any]:
    """The MQTT 5 properties a PUBLISH may carry (§3.3.2.3), by paho's names."""
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(buf):
        ident, pos = _varint(buf, pos)
        if ident == 0x01:
            if pos >= len(buf):
                raise MalformedPublish("truncated payload format indicator")
            out["PayloadFormatIndicator"] = buf[pos]
            pos += 1
        elif ident == 0x02:
            if pos + 4 > len(buf):
                raise MalformedPublish("truncated message expiry")
            (out["MessageExpiryInterval"],) = struct.unpack_from("!I", buf, pos)
            pos += 4
        elif ident == 0x03:
            out["ContentType"], pos = _text(buf, pos)
        elif ident == 0x08:
            out["ResponseTopic"], pos = _text(buf, pos)
        elif ident == 0x09:
            out["CorrelationData"], pos = _binary(buf, pos)
        elif ident == 0x0B:
            sub_id, pos = _varint(buf, pos)
            out.setdefault("SubscriptionIdentifier", []).append(sub_id)
        elif ident == 0x23:
            if pos + 2 > len(buf):
                raise MalformedPublish("truncated topic alias")
            (out["TopicAlias"],) = struct.unpack_from("!H", buf, pos)
            pos += 2
        elif ident == 0x26:
            key, pos = _text(buf, pos)
            value, pos = _text(buf, pos)
            out.setdefault("UserProperty", []).append((key, value))
        else:
            raise MalformedPublish(f"property 0x{ident:02x} is not allowed in PUBLISH")
    return out


def decode_publish(command: int, packet: bytes, v5: bool) -> Received:
    qos = (command & 0x06) >> 1
    if qos == 3:
        raise MalformedPublish("QoS 3")
    topic, pos = _binary(packet, 0)
    mid = 0
    if qos:
        if pos + 2 > len(packet):
            raise MalformedPublish("truncated packet identifier")
        (mid,) = struct.unpack_from("!H", packet, pos)
        pos += 2
    props: dict[str, Any] = {}
    if v5:
        length, pos = _varint(packet, pos)
        if pos + length > len(packet):
            raise MalformedPublish("truncated properties")
        props = decode_properties(packet[pos:pos + length])
        pos += length
    return Received(mid=mid, qos=qos, retain=bool(command & 0x01), dup=bool(command & 0x08), topic_raw=topic,
                    payload=bytes(packet[pos:]), properties=props)


class GatewayClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Called on the loop thread with every received PUBLISH (manual_ack clients).
        self.on_received: Callable[[Received], None] | None = None
        self._reasons: dict[tuple[int, int], ReasonCode] = {}
        self._no_properties: dict[int, Properties] = {}

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if len(packet) < 2:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        (mid,) = struct.unpack_from("!H", packet, 0)
        value = packet[2] if self._protocol == mqtt.MQTTv5 and len(packet) > 2 else 0
        ptype = PacketTypes.PUBACK if cmd == "PUBACK" else PacketTypes.PUBCOMP
        reason = self._reasons.get((ptype, value))
        if reason is None:
            try:
                reason = ReasonCode(ptype, identifier=value)
            except Exception:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            self._reasons[(ptype, value)] = reason
        props = self._no_properties.get(ptype)
        if props is None:
            props = self._no_properties[ptype] = Properties(ptype)  # type: ignore[no-untyped-call]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, props)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        if not self._manual_ack or self.on_received is None:
            return super()._handle_publish()
        try:
            received = decode_publish(self._in_packet["command"], bytes(self._in_packet["packet"]),
                                      self._protocol == mqtt.MQTTv5)
        except MalformedPublish as exc:
            self._easy_log(mqtt.MQTT_LOG_ERR, "malformed PUBLISH: %s", exc)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        if "TopicAlias" in received.properties:
            # we announce Topic Alias Maximum 0, so a broker must not use one
            self._easy_log(mqtt.MQTT_LOG_ERR, "PUBLISH with a topic alias we did not allow")
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        self.on_received(received)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubrel(self) -> MQTTErrorCode:
        rc = super()._handle_pubrel()
        if self._manual_ack and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            # We answered PUBREC only after taking responsibility; PUBREL just closes the flow.
            (mid,) = struct.unpack("!H", bytes(self._in_packet["packet"][:2]))
            return self._send_pubcomp(mid)
        return rc

    def ack(self, mid: int, qos: int) -> MQTTErrorCode:
        if qos == 2 and self._manual_ack:
            return self._send_pubrec(mid)
        return super().ack(mid, qos)

    def refuse(self, mid: int, qos: int, reason: int) -> MQTTErrorCode:
        """Acknowledge with an MQTT 5 failure reason code (the flow ends; no redelivery)."""
        if self._protocol != mqtt.MQTTv5 or qos == 0:
            return self.ack(mid, qos)
        command = _PUBACK if qos == 1 else _PUBREC
        return self._packet_queue(command, struct.pack("!BBHB", command, 3, mid, reason), mid, 1)

    # --- reading and limits ----------------------------------------------------------------

    def read_available(self, limit: int = 256) -> MQTTErrorCode:
        """Read up to ``limit`` packets that are already available; never blocks."""
        for _ in range(limit):
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc > 0:
                return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def limit_inflight(self, value: int) -> None:
        """Lower the outgoing in-flight window to the broker's Receive Maximum after CONNACK."""
        with self._out_message_mutex:
            self._max_inflight_messages = value
