"""The MQTT connector's outbound side: PUBLISH, then wait for the broker's PUBACK or PUBCOMP.

:class:`MqttOutbound` keeps at most ``max_inflight`` publishes unacknowledged (fewer when the
broker's Receive Maximum is lower), waits for the broker's answer (one timer sweeps the overdue
ones), packs MQTT 5 properties once per distinct set, and fails the publishes still waiting
when the connector closes. The guarantees are described in :mod:`connectors.mqtt`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from connectors.mqtt.config import MqttTarget
from connectors.mqtt.connection import MqttConnection
from connectors.mqtt.mapping import Outgoing, to_publish
from gateway.sdk import ConnectorConfig, ConnectorContext, Envelope, PermanentError, Reply, Target, TransientError

_PERMANENT_REASONS = {0x87, 0x90, 0x99}  # not authorized, topic name invalid, payload format invalid
#: How often overdue publishes are looked for (seconds): a send waits at most this much longer
#: than its timeout for the broker's answer.
_EXPIRY_SWEEP = 0.1


class MqttOutbound(MqttConnection):
    """Publishes, the window they share and the waits for the broker's answers."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self._waiters: dict[int, asyncio.Future[ReasonCode]] = {}
        #: Per waiting publish: (loop time it is overdue, topic, qos, timeout), swept by one timer.
        self._deadlines: dict[int, tuple[float, str, int, float]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._window = _Window(self.cfg.max_inflight)
        self._props_cache: dict[tuple[Any, ...], _PackedProperties] = {}

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

    async def send_batch(self, items: Sequence[tuple[Envelope, Target]]) -> Sequence[Reply | BaseException | None]:
        """Every publish of the batch in flight at once (within the window), each answered by its
        own PUBACK/PUBCOMP: one refused publish fails only its envelope."""
        return await asyncio.gather(*(self.send(env, target) for env, target in items), return_exceptions=True)

    def _properties(self, out: Outgoing) -> Properties | None:
        """MQTT 5 PUBLISH properties, built and packed once per distinct set (paho's Properties
        are slow to build and to pack, and most messages of a route share theirs); the trace
        context, which differs for every message, is appended to the shared packed bytes.

        MQTT 3.1.1 has no properties: the trace context does not cross a 3.1.1 hop."""
        if self.cfg.protocol != "5":
            return None
        shared = self._shared_properties(out)
        return _TracedProperties.of(shared, out.trace) if out.trace else shared

    def _shared_properties(self, out: Outgoing) -> _PackedProperties:
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
        packed: bytes = super().pack()  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_packed", packed)
        # The properties without their length prefix, for _TracedProperties to extend.
        length, used = VariableByteIntegers.decode(packed)  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_body", packed[used:used + length])

    def pack(self) -> bytes:
        packed = self.__dict__.get("_packed")
        if packed is None:
            return super().pack()  # type: ignore[no-any-return,no-untyped-call]
        return packed  # type: ignore[no-any-return]


class _TracedProperties(Properties):
    """Shared packed properties plus the ``traceparent``/``tracestate`` user properties of one
    message, packed by hand (a user property is 0x26 and two length-prefixed UTF-8 strings,
    MQTT 5 §3.3.2.3.7): a few µs, where building paho's Properties for each message costs ~70 µs.
    Only ``pack`` is used by paho for a PUBLISH."""

    packed: bytes

    @classmethod
    def of(cls, shared: _PackedProperties, trace: Sequence[tuple[str, str]]) -> _TracedProperties:
        body = shared.__dict__["_body"] + b"".join(
            b"\x26" + _utf8(name) + _utf8(value) for name, value in trace)
        props = cls.__new__(cls)  # not __init__: nothing but pack() is needed
        props.__dict__["packetType"] = PacketTypes.PUBLISH
        props.__dict__["packed"] = VariableByteIntegers.encode(len(body)) + body  # type: ignore[no-untyped-call]
        return props

    def pack(self) -> bytes:
        return self.packed


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data
