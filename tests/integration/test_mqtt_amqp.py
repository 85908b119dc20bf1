"""MQTT ⇄ AMQP through a real in-process gateway, against the machine's Mosquitto and RabbitMQ.

Also home of the small helpers the other MQTT/AMQP test modules import (probes, a REST peer).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration

MQTT_PORT = 1883
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
INSTALL = "run `make peers` (scripts/peers.sh: apt-get install -y rabbitmq-server mosquitto mosquitto-clients)"


def require_port(port: int, what: str) -> None:
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", port)) != 0:
            pytest.fail(f"{what} is not listening on 127.0.0.1:{port}: {INSTALL}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- MQTT probe ------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: dict[str, Any] = field(default_factory=dict)


class MqttProbe:
    """A plain paho client (its own network thread) that records what it receives."""

    def __init__(self, port: int = MQTT_PORT, *, v5: bool = True, client_id: str = "", clean: bool = True,
                 username: str | None = None, password: str | None = None):
        require_port(port, "Mosquitto")
        self.v5 = v5
        kwargs: dict[str, Any] = {"client_id": client_id or unique("probe"),
                                  "protocol": mqtt.MQTTv5 if v5 else mqtt.MQTTv311}
        if not v5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages = 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        props: dict[str, Any] = {}
        p = getattr(msg, "properties", None)
        if p is not None:
            for name in ("ContentType", "UserProperty", "CorrelationData", "ResponseTopic", "MessageExpiryInterval"):
                if hasattr(p, name):
                    props[name] = getattr(p, name)
        with self._lock:
            self.received.append(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), props))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        assert self._subscribed.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, *, user: list[tuple[str, str]] | None = None,
                content_type: str | None = None, correlation: bytes | None = None,
                response_topic: str | None = None, retain: bool = False) -> None:
        props = None
        if self.v5 and (user or content_type or correlation or response_topic):
            props = Properties(PacketTypes.PUBLISH)
            if user:
                props.UserProperty = user
            if content_type:
                props.ContentType = content_type
            if correlation:
                props.CorrelationData = correlation
            if response_topic:
                props.ResponseTopic = response_topic
        info = self.client.publish(topic, payload, qos, retain=retain, properties=props)
        if qos:
            info.wait_for_publish(5)
            assert info.is_published(), f"no PUBACK for {topic}"

    def messages(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@asynccontextmanager
async def mqtt_probe(**kwargs: Any) -> AsyncIterator[MqttProbe]:
    probe = await asyncio.to_thread(MqttProbe, **kwargs)
    try:
        yield probe
    finally:
        await asyncio.to_thread(probe.close)


# --- AMQP ------------------------------------------------------------------------------------


@asynccontextmanager
async def amqp_channel() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    require_port(5672, "RabbitMQ")
    conn = await aio_pika.connect(AMQP_URL)
    try:
        yield await conn.channel()
    finally:
        await conn.close()


async def drain_queue(channel: aio_pika.abc.AbstractChannel, name: str, count: int,
                      timeout: float = 10.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Get ``count`` messages from a queue (acking them), failing after ``timeout``."""
    queue = await channel.get_queue(name)
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while len(got) < count:
        msg = await queue.get(fail=False)
        if msg is None:
            if loop.time() > end:
                raise AssertionError(f"queue {name}: {len(got)} of {count} messages after {timeout}s")
            await asyncio.sleep(0.05)
            continue
        await msg.ack()
        got.append(msg)
    return got


# --- REST peer -------------------------------------------------------------------------------


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


class RestPeer:
    """A small aiohttp server that records requests and answers as ``respond`` says."""

    def __init__(self, respond: Callable[[Seen, int], tuple[int, bytes]] | None = None):
        self.port = free_port()
        self.seen: list[Seen] = []
        self.respond = respond or (lambda seen, n: (200, b'{"ok":true}'))
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        seen = Seen(request.path, {k.lower(): v for k, v in request.headers.items()}, await request.read())
        self.seen.append(seen)
        status, body = self.respond(seen, len(self.seen))
        return web.Response(status=status, body=body, content_type="application/json")

    async def __aenter__(self) -> RestPeer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def gateway_yaml(connectors: str, routes: str) -> str:
    return f"connectors:\n{connectors}\nroutes:\n{routes}\n"


# --- the tests -------------------------------------------------------------------------------


async def test_mqtt_to_amqp_carries_properties_and_cloudevents(tmp_path: Any) -> None:
    require_port(5672, "RabbitMQ")
    topic_root = unique("plant")
    exchange, queue_name = unique("gw.ex"), unique("gw.q")
    async with amqp_channel() as ch:
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        q = await ch.declare_queue(queue_name, auto_delete=True)
        await q.bind(ex, routing_key=f"{topic_root}.#")
        yaml = gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60, subscribe: ["{topic_root}/+/alert"]}}
  bus: {{type: amqp, url: "amqp://127.0.0.1:5672/", username: guest, password: "${{AMQP_PW}}"}}
""", f"""
  - name: plant-to-bus
    from: plant
    to:
      - connector: bus
        exchange: {exchange}
        cloudevents: true
""")
        import os

        os.environ["AMQP_PW"] = "guest"
        async with running_gateway(tmp_path, yaml), mqtt_probe() as probe:
            probe.publish(f"{topic_root}/7/alert", json.dumps({"t": 95}), qos=1,
                          user=[("site", "seven"), ("x-trace", "abc")], content_type="application/json",
                          correlation=b"corr-1", response_topic=f"{topic_root}/replies")
            [msg] = await drain_queue(ch, queue_name, 1)
    assert msg.routing_key == f"{topic_root}.7.alert"
    assert json.loads(msg.body) == {"t": 95}
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.correlation_id == "corr-1"
    assert msg.reply_to == f"{topic_root}/replies"
    headers = msg.headers
    assert headers["site"] == "seven" and headers["x-trace"] == "abc"
    assert headers["cloudEvents:specversion"] == "1.0"
    assert headers["cloudEvents:id"] == msg.message_id
    assert headers["cloudEvents:subject"] == f"{topic_root}/7/alert"
    assert headers["cloudEvents:type"] == "gateway.mqtt.message"


async def test_amqp_to_mqtt_carries_headers_as_user_properties(tmp_path: Any) -> None:
    topic_root = unique("out")
    queue_name = unique("gw.in")
    yaml = gateway_yaml(f"""
  bus: {{type: amqp, queue: {{name: {queue_name}, queue_type: classic, durable: false}}}}
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60}}
""", f"""
  - name: bus-to-plant
    from: bus
    match: {{subject: "gw.*"}}
    to:
      - connector: plant
        topic: "{topic_root}/{{{{ data.site }}}}/orders"
        qos: 1
""")
    async with mqtt_probe() as probe:
        probe.subscribe(f"{topic_root}/#")
        async with running_gateway(tmp_path, yaml), amqp_channel() as ch:
            await ch.default_exchange.publish(
                aio_pika.Message(b'{"site": "s1", "n": 1}', content_type="application/json",
                                 headers={"x-order": "42", "priority-class": 3}, correlation_id="c-9",
                                 message_id="m-123"),
                routing_key=queue_name)
            # a value that would add a topic level is refused, not published elsewhere
            await ch.default_exchange.publish(
                aio_pika.Message(b'{"site": "s1/evil", "n": 2}', content_type="application/json"),
                routing_key=queue_name)
            await wait_for(lambda: len(probe.messages()) >= 1, 10, what="MQTT message")
            await asyncio.sleep(0.5)
    msgs = probe.messages()
    assert [m.topic for m in msgs] == [f"{topic_root}/s1/orders"]
    m = msgs[0]
    assert json.loads(m.payload) == {"site": "s1", "n": 1}
    assert m.qos == 1
    user = dict(m.props["UserProperty"])
    assert user["x-order"] == "42" and user["priority-class"] == "3"
    assert m.props["ContentType"] == "application/json"
    assert m.props["CorrelationData"] == b"c-9"
