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
* Queued packets go out together, in one ``send`` for as many as are waiting, and what the
  socket holds is read at once (paho makes a system call per packet written and about three per
  packet read; on loopback each costs microseconds).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

_PUBACK = 0x40
_PUBREC = 0x50
_PUBLISH = 0x30
_DISCONNECT = 0xE0
#: Packets joined into one send at most.
_JOIN = 256
#: Bytes asked of the socket at once.
_READ_AHEAD = 65536


def _completes_on_write(packet: Any) -> bool:
    command: int = packet["command"] & 0xF0
    return command == _DISCONNECT or (command == _PUBLISH and packet["qos"] == 0)


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
        #: Bytes read from ``_buffer_sock`` and not yet handed to paho's parser, from ``_buffer_pos``.
        self._buffer = b""
        self._buffer_pos = 0
        self._buffer_sock: Any = None
        #: Set while the owner takes no more messages: :meth:`read_available` parses nothing.
        self.hold = False

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

    # --- writing ---------------------------------------------------------------------------

    def _packet_write(self) -> MQTTErrorCode:
        """Send what is queued, many packets per system call.

        Only packets that need nothing once written (QoS 1/2 PUBLISH, acknowledgements,
        SUBSCRIBE…) are joined; a QoS 0 PUBLISH (completed on write) or a DISCONNECT in the queue
        leaves it all to paho's own one-by-one write.
        """
        out = self._out_packet
        if len(out) < 2 or any(_completes_on_write(p) for p in out):
            return super()._packet_write()
        while out:
            chunk = b"".join(p["packet"][p["pos"]:] for p in itertools.islice(out, _JOIN))
            try:
                sent = self._sock_send(chunk)
            except (AttributeError, ValueError):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(mqtt.MQTT_LOG_ERR, "failed to send on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if sent <= 0:
                break
            while sent > 0:
                packet = out[0]
                step = min(sent, packet["to_process"])
                packet["to_process"] -= step
                packet["pos"] += step
                sent -= step
                if packet["to_process"] == 0:
                    out.popleft()
        with self._msgtime_mutex:
            self._last_msg_out = mqtt.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # --- reading and limits ----------------------------------------------------------------

    def read_available(self, limit: int = 256) -> MQTTErrorCode:
        """Read up to ``limit`` packets that are already available; never blocks. Stops early
        when :attr:`hold` is set. Bytes already read may remain (:meth:`buffered`): the socket
        will not wake anyone for those, so the caller reads again while there are some."""
        for _ in range(limit):
            if self.hold:
                break
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                if self.buffered():
                    continue  # paho's own path stopped short (a packet read in more than 100 pieces)
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            if rc > 0:
                return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _packet_read(self) -> MQTTErrorCode:
        """A packet that is whole in the buffer is parsed from it in one step; anything else
        (a packet that is still arriving, a malformed length) takes paho's path."""
        if self._in_packet["command"] != 0 or not self.buffered():
            return super()._packet_read()
        buf, start = self._buffer, self._buffer_pos
        pos, length, mult = start + 1, 0, 1
        for pos in range(start + 1, min(start + 5, len(buf))):
            byte = buf[pos]
            length += (byte & 127) * mult
            mult *= 128
            if not byte & 128:
                break
        else:
            return super()._packet_read()
        end = pos + 1 + length
        if end > len(buf):
            return super()._packet_read()
        self._buffer_pos = end
        self._in_packet = {"command": buf[start], "have_remaining": 1, "remaining_count": [],
                           "remaining_mult": mult, "remaining_length": length, "packet": bytearray(buf[pos + 1:end]),
                           "to_process": 0, "pos": 0}
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(mqtt.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                           "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()
        return rc

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho reads each packet in pieces (its first byte, its length byte by byte, the rest),
        one system call each: read what the socket holds at once and hand it out from here."""
        if self.buffered():
            start = self._buffer_pos
            data = self._buffer[start:start + bufsize]
            self._buffer_pos = start + len(data)
            return data
        data = super()._sock_recv(_READ_AHEAD)
        if len(data) > bufsize:
            self._buffer, self._buffer_pos, self._buffer_sock = data, bufsize, self._sock
            return data[:bufsize]
        return data

    def buffered(self) -> bool:
        """Whether bytes of the current connection were read and not parsed yet."""
        return self._buffer_pos < len(self._buffer) and self._buffer_sock is self._sock

    def limit_inflight(self, value: int) -> None:
        """Lower the outgoing in-flight window to the broker's Receive Maximum after CONNACK."""
        with self._out_message_mutex:
            self._max_inflight_messages = value
