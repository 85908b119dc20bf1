"""Three replicas sharing one RabbitMQ spool, one of them ``kill -9``-ed every few seconds.

Three real ``gateway run`` processes read one ``routes.yaml`` (``gateway.spool.type: rabbitmq``,
what differs per pod comes from its environment, as in :mod:`tests.integration.test_replicas`).
Two streams come in: REST (each client posts to a replica, and to the next one when that one
does not answer, as behind a load balancer) and MQTT (a shared subscription ``$share/<group>/…``
on a private Mosquitto, so each message goes to one replica). Every route sends to AMQP: a
quorum queue this test consumes. Ten times a random replica is killed with SIGKILL and started
again with the same identity (a StatefulSet pod) a moment later.

Classified as in Jepsen's RabbitMQ checks: **lost** (acknowledged, HTTP 202 or PUBACK, and never
in the output queue) must be 0; **duplicated** is counted and printed; **unexpected** must be 0.
Duplicates come from the killed replica's in-flight window: jobs sent and not yet acknowledged
to the spool's queue are handed to another replica, and MQTT messages it had not acknowledged
are redelivered to its session.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.gwtest import free_port
from tests.integration.test_durability_rabbit import URL, delete_topology, prefix  # noqa: F401 - fixture
from tests.integration.test_mqtt import Mosquitto
from tests.integration.test_mqtt_amqp import unique
from tests.integration.test_replicas import REPO, require_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(180)]

REPLICAS = 3
KILLS = 10
#: Messages per second offered by each stream: enough that every kill lands in traffic.
RATE = 60


def config(broker_port: int, topic: str, group: str, spool_prefix: str, out_queue: str) -> str:
    retry = "on_failure: {retry: {attempts: 1000, initial: 0.05, max: 0.5}}"
    return textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:${{GW_ADMIN_PORT}}"}}
          spool: {{type: rabbitmq, url: "${{SPOOL_AMQP_URL}}", queue_prefix: {spool_prefix},
                  path: "${{GW_REPLICA_DIR}}/local.db", min_free_bytes: 0}}
          state_dir: "${{GW_REPLICA_DIR}}/state"
          drain: 2s
          log: {{level: info, format: json}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:${{GW_REST_PORT}}", auth: {{type: none}},
                endpoints: [{{path: "/in/**", methods: [POST]}}]}}
          plant:
            type: mqtt
            url: "mqtt://127.0.0.1:{broker_port}"
            client_id: "gateway-${{POD_NAME}}"
            share: {group}
            subscribe: ["{topic}"]
            qos: 1
            reconnect_min: 0.2
            reconnect_max: 1
          bus: {{type: amqp, url: "amqp://127.0.0.1:5672/", username: guest, password: "${{AMQP_PW}}"}}
        routes:
          - name: rest-to-bus
            from: api
            to: [{{connector: bus, exchange: "", routing_key: {out_queue}}}]
            {retry}
          - name: mqtt-to-bus
            from: plant
            to: [{{connector: bus, exchange: "", routing_key: {out_queue}}}]
            {retry}
        """)


class Replica:
    """``gateway run`` with one pod's environment; restarted with the same one after a kill."""

    def __init__(self, name: str, config_path: Path, root: Path):
        self.name = name
        home = root / name
        home.mkdir(parents=True)
        self.admin_port, self.rest_port = free_port(), free_port()
        self.log = home / "gateway.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "POD_NAME": name, "GW_REPLICA_DIR": str(home),
                    "GW_ADMIN_PORT": str(self.admin_port), "GW_REST_PORT": str(self.rest_port),
                    "SPOOL_AMQP_URL": URL, "AMQP_PW": "guest"}
        self.command = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config_path)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(*self.command, cwd=REPO, env=self.env, stdout=out,
                                                             stderr=asyncio.subprocess.STDOUT)
        end = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    async with s.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass
                if time.monotonic() > end:
                    raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit within {timeout}s:\n{self.tail()}") from None

    async def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class OutputQueue:
    """Consumes the output quorum queue: every message's ``id`` and envelope id (message_id)."""

    def __init__(self, name: str):
        self.name = name
        self.seen: Counter[str] = Counter()
        self.envelope_ids: Counter[str] = Counter()
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._conn = await aio_pika.connect_robust(URL)
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=256)
        queue = await channel.declare_queue(self.name, durable=True, arguments={"x-queue-type": "quorum"})

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.seen[str(json.loads(message.body)["id"])] += 1
            self.envelope_ids[message.message_id or ""] += 1
            await message.ack()

        await queue.consume(on_message)

    async def stop(self) -> None:
        if self._conn is not None:
            channel = await self._conn.channel()
            await channel.queue_delete(self.name)
            await self._conn.close()


class MqttStream:
    """Publishes ``{"id": "mqtt:<n>"}`` at QoS 1 at ``rate`` per second; remembers the PUBACKed ones."""

    def __init__(self, port: int, topic: str, rate: int):
        self.topic, self.rate = topic, rate
        self.infos: list[tuple[str, mqtt.MQTTMessageInfo]] = []
        self.stop = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"), protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages = 100
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def run(self) -> None:
        start = time.monotonic()
        for n in range(1_000_000):
            if self.stop.is_set():
                return
            ahead = start + n / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            ident = f"mqtt:{n}"
            self.infos.append((ident, self.client.publish(self.topic, json.dumps({"id": ident}), qos=1)))

    def acked(self) -> set[str]:
        return {ident for ident, info in self.infos if info.is_published()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def rest_client(replicas: list[Replica], index: int, clients: int, acked: set[str], attempted: set[str],
                      stop: asyncio.Event) -> None:
    """Posts the next id to a replica, and on to the next replica until one acknowledges it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for n in range(1_000_000):
            ident = f"rest:{n * clients + index}"
            for attempt in range(10_000):
                if stop.is_set():
                    return
                attempted.add(ident)
                replica = replicas[(index + n + attempt) % len(replicas)]
                try:
                    async with session.post(f"http://127.0.0.1:{replica.rest_port}/in/x", json={"id": ident}) as r:
                        await r.read()
                        if r.status == 202:
                            acked.add(ident)
                            break
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass  # that replica is down or died mid-request
                await asyncio.sleep(0.02)
            await asyncio.sleep(len(replicas) / RATE)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "mosquitto")
    b.start()
    try:
        yield b
    finally:
        await asyncio.to_thread(b.stop)


async def test_three_replicas_on_the_shared_spool_lose_nothing_through_ten_kills(
        tmp_path: Path, prefix: str, broker: Mosquitto) -> None:  # noqa: F811
    rng = random.Random()
    topic, group = unique("replicas") + "/in", unique("gw")
    output = OutputQueue(unique("gw.out"))
    await output.start()
    path = tmp_path / "routes.yaml"
    path.write_text(config(broker.port, topic, group, prefix, output.name))
    replicas = [Replica(unique(f"gw-{i}"), path, tmp_path) for i in range(REPLICAS)]
    rest_acked: set[str] = set()
    attempted: set[str] = set()
    stop = asyncio.Event()
    t0 = time.monotonic()
    stream: MqttStream | None = None
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        await asyncio.sleep(1.0)  # every replica's shared subscription is in place
        stream = await asyncio.to_thread(MqttStream, broker.port, topic, RATE)
        publishing = asyncio.get_running_loop().run_in_executor(None, stream.run)
        clients = [asyncio.ensure_future(rest_client(replicas, i, 3, rest_acked, attempted, stop)) for i in range(3)]
        killed: list[str] = []
        for _ in range(KILLS):
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            victim = rng.choice(replicas)
            await victim.kill9()
            killed.append(victim.name[-4:])
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            await victim.start()
        await asyncio.sleep(1.0)
        stop.set()
        stream.stop.set()
        await publishing
        await asyncio.gather(*clients)
        await asyncio.sleep(1.0)  # the last PUBACKs
        acked = rest_acked | stream.acked()
        end = time.monotonic() + 45
        while acked - set(output.seen) and time.monotonic() < end:
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # late duplicates would show up here
        for r in replicas:
            assert await r.terminate() == 0, r.tail()
    finally:
        stop.set()
        if stream is not None:
            stream.stop.set()
            await asyncio.to_thread(stream.close)
        for r in replicas:
            await r.ensure_stopped()
        await output.stop()
        await delete_topology(prefix, ["bus"])
    attempted |= {ident for ident, _ in stream.infos}
    lost = sorted(acked - set(output.seen))
    duplicated = sum(n - 1 for n in output.seen.values() if n > 1)
    same_envelope = sum(n - 1 for n in output.envelope_ids.values() if n > 1)
    unexpected = sorted(set(output.seen) - attempted)
    print(f"\n{REPLICAS} replicas on the RabbitMQ spool, kill -9 x{KILLS} ({', '.join(killed)}): "
          f"acknowledged {len(acked)} (REST {len(rest_acked)}, MQTT {len(acked) - len(rest_acked)}), "
          f"delivered {len(output.seen)}, lost {len(lost)}, duplicated {duplicated} "
          f"({same_envelope} of them under the same envelope id), unexpected {len(unexpected)}; "
          f"{time.monotonic() - t0:.0f} s")
    assert len(acked) > 500, "too little traffic for the test to mean anything"
    assert lost == [], f"LOST acknowledged messages: {lost[:20]}"
    assert unexpected == [], f"unexpected messages: {unexpected[:20]}"
