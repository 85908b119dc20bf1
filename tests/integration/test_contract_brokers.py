"""The shared connector contract for the broker kinds, against the machine's Mosquitto (mqtt
out) and RabbitMQ (amqp out and in)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from gateway.contract import Connector
from gateway.http import HttpHub
from tests.contract import InboundContract, OutboundContract
from tests.gwtest import free_port
from tests.integration.test_mqtt_amqp import MQTT_PORT, MqttProbe, amqp_channel, mqtt_probe, unique

pytestmark = pytest.mark.integration

#: The machine's RabbitMQ; the connector's default credentials (guest) are its.
AMQP_URL = "amqp://127.0.0.1:5672/"


def _down_broker(scheme: str) -> dict[str, Any]:
    return {"url": f"{scheme}://127.0.0.1:{free_port()}/", "connect_timeout": 1, "reconnect_min": 0.1,
            "reconnect_max": 0.5}


class TestMqttOutboundContract(OutboundContract):
    kind = "mqtt"
    probe: MqttProbe

    @pytest.fixture(autouse=True)
    async def subscriber(self) -> AsyncIterator[None]:
        self.topic = unique("contract/mqtt")
        async with mqtt_probe() as probe:
            await asyncio.to_thread(probe.subscribe, self.topic, 1)
            self.probe = probe
            yield

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": f"mqtt://127.0.0.1:{MQTT_PORT}", "client_id": unique("gw-contract")}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {**_down_broker("mqtt"), "client_id": unique("gw-contract")}

    def options(self) -> dict[str, Any]:
        return {"topic": self.topic, "qos": 1}

    async def received(self, tmp_path: Path) -> list[bytes]:
        return [m.payload for m in self.probe.messages()]


class TestAmqpOutboundContract(OutboundContract):
    kind = "amqp"

    @pytest.fixture(autouse=True)
    async def queue(self) -> AsyncIterator[None]:
        self.queue_name = unique("gw.contract")
        async with amqp_channel() as ch:
            self.channel = ch
            await ch.declare_queue(self.queue_name, auto_delete=True)
            yield

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": AMQP_URL}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return _down_broker("amqp")

    def options(self) -> dict[str, Any]:
        return {"exchange": "", "routing_key": self.queue_name}

    async def received(self, tmp_path: Path) -> list[bytes]:
        queue = await self.channel.get_queue(self.queue_name)
        got = []
        while (msg := await queue.get(fail=False)) is not None:
            await msg.ack()
            got.append(msg.body)
        self._kept = [*getattr(self, "_kept", []), *got]
        return self._kept


class TestAmqpInboundContract(InboundContract):
    """The sender's answer is what RabbitMQ does with the message: gone for good (ack), offered
    again (nack with requeue) or routed to the queue's dead-letter exchange (reject)."""

    kind = "amqp"

    @pytest.fixture(autouse=True)
    async def queues(self) -> AsyncIterator[None]:
        self.queue_name, self.dlx, self.dlq = unique("gw.contract.in"), unique("gw.contract.dlx"), unique("gw.dlq")
        async with amqp_channel() as ch:
            self.channel = ch
            exchange = await ch.declare_exchange(self.dlx, aio_pika.ExchangeType.FANOUT, auto_delete=True)
            dead = await ch.declare_queue(self.dlq, auto_delete=True)
            await dead.bind(exchange)
            yield
            await ch.queue_delete(self.queue_name)

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": AMQP_URL, "prefetch": 10, "delivery_limit": 5, "max_retry_delay": 0.1,
                "queue": {"name": self.queue_name, "queue_type": "classic", "durable": False,
                          "dead_letter_exchange": self.dlx}}

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        await self.channel.default_exchange.publish(
            aio_pika.Message(body, content_type="application/json"), routing_key=self.queue_name)
        dead = await self.channel.get_queue(self.dlq)
        loop = asyncio.get_running_loop()
        end = loop.time() + 15
        quiet_since: float | None = None
        while loop.time() < end:
            if (msg := await dead.get(fail=False)) is not None:
                await msg.ack()
                return "permanent"
            if len(self.delivered) >= 2:
                return "temporary"  # nacked with requeue: RabbitMQ offered it again
            if self.delivered:
                quiet_since = quiet_since or loop.time()
                if loop.time() - quiet_since > 1.5:  # neither offered again nor dead-lettered
                    queue = await self.channel.declare_queue(self.queue_name, passive=True)
                    ready = queue.declaration_result.message_count
                    return "ack" if ready == 0 else f"still {ready} ready"
            await asyncio.sleep(0.05)
        return f"undecided after {len(self.delivered)} deliveries"
