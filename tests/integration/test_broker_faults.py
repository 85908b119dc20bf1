"""Broker restarts in the middle of a 5,000-message sequence-numbered stream: lost must be 0.

Classified as Jepsen does: *lost* (sent and acknowledged to the publisher, never arrived at the
end of the pipeline), *duplicated* (arrived more than once: counted and printed, allowed in the
in-flight window), *unexpected* (arrived but never sent). Both brokers are private to the test
(our own Mosquitto with persistence and no queue limit; an isolated RabbitMQ node), so the
system brokers other tests use are never restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.gwtest import free_port, jsonl, running_gateway, wait_for
from tests.integration.test_mqtt import Mosquitto
from tests.integration.test_mqtt_amqp import gateway_yaml, unique

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

N = 5000
RESTART_AT = 2000


class StreamPublisher:
    """Publishes ``N`` sequence-numbered QoS 1 messages with a bounded window; survives a broker
    restart (paho keeps unacknowledged messages and resends them after reconnecting)."""

    def __init__(self, port: int, topic: str, n: int = N, window: int = 200):
        self.topic, self.n = topic, n
        self.sent = 0
        self.acked = 0
        self._slots = threading.Semaphore(window)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"), protocol=mqtt.MQTTv311,
                                  clean_session=False)
        self.client.max_inflight_messages = window
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, *args: Any) -> None:
        self.acked += 1
        self._slots.release()

    def run(self, deadline: float) -> None:
        for i in range(self.n):
            while not self._slots.acquire(timeout=0.5):
                if time.monotonic() > deadline:
                    raise AssertionError(f"publisher stalled at {i}")
            self.client.publish(self.topic, json.dumps({"seq": i}), qos=1)
            self.sent += 1
        while self.acked < self.n and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def classify(path: Path, n: int = N) -> tuple[set[int], Counter[int], set[int]]:
    seen: Counter[int] = Counter()
    for rec in jsonl(path):
        seen[json.loads(rec["body"])["seq"]] += 1
    expected = set(range(n))
    lost = expected - set(seen)
    unexpected = set(seen) - expected
    return lost, seen, unexpected


def report(name: str, path: Path, acked: int) -> tuple[int, int]:
    lost, seen, unexpected = classify(path)
    dups = sum(c - 1 for c in seen.values() if c > 1)
    print(f"\n[{name}] sent={N} broker-acked={acked} arrived={len(seen)} lost={len(lost)} "
          f"duplicates={dups} unexpected={len(unexpected)}")
    assert not unexpected
    return len(lost), dups


async def test_mosquitto_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    out = tmp_path / "out.jsonl"
    topic = unique("stream")
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{broker.port}", client_id: {unique("gw")}, subscribe: ["{topic}"],
           reconnect_min: 0.2, reconnect_max: 1, max_inflight: 256}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: stream
    from: plant
    to: [{connector: out}]
""")
    try:
        async with running_gateway(tmp_path, yaml) as rt:
            pub = await asyncio.to_thread(StreamPublisher, broker.port, topic)
            loop = asyncio.get_running_loop()
            deadline = time.monotonic() + 150
            publishing = loop.run_in_executor(None, pub.run, deadline)
            await wait_for(lambda: pub.acked >= RESTART_AT, 60, what=f"{RESTART_AT} acknowledged")
            await asyncio.to_thread(broker.stop)
            await asyncio.sleep(0.5)
            assert not rt.slots["plant"].connector.health().up
            await asyncio.to_thread(broker.start)
            await publishing
            await wait_for(lambda: not classify(out)[0], 90, interval=0.5, what="every sequence number")
            await asyncio.sleep(1.0)  # let late duplicates land so they are counted
            await asyncio.to_thread(pub.close)
        lost, dups = report("mosquitto restart", out, pub.acked)
    finally:
        broker.stop()
    assert lost == 0
    # Redelivered after the restart: what the broker had not seen acknowledged (the in-flight
    # windows, and acknowledgements still unread in its socket when it stopped). If the gateway
    # did not acknowledge at all, every one of the ≥ 2,000 messages before the restart would be here.
    assert dups < 1000


# --- an isolated RabbitMQ node -------------------------------------------------------------


class RabbitNode:
    """A private RabbitMQ node (own node name, ports and data) as PEERS.md §2.1 describes."""

    def __init__(self, tmp: Path, extra_conf: str = ""):
        if not os.path.exists("/usr/lib/rabbitmq/bin/rabbitmq-server"):
            pytest.fail("RabbitMQ is not installed: apt-get install -y rabbitmq-server")
        self.tmp = tmp
        self.port, dist = free_port(), free_port()
        (tmp / "home").mkdir(parents=True, exist_ok=True)
        (tmp / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.port}\nlog.console = false\n"
                                           "loopback_users = none\n" + extra_conf)
        (tmp / "enabled_plugins").write_text("[].\n")
        self.node = f"gw{uuid_hex()}@localhost"
        self.env = {**os.environ, "HOME": str(tmp / "home"), "RABBITMQ_NODENAME": self.node,
                    "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_CONFIG_FILE": str(tmp / "rabbitmq.conf"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
                    "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"), "RABBITMQ_LOG_BASE": str(tmp / "log"),
                    "RABBITMQ_PID_FILE": str(tmp / "rabbit.pid")}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=self.env, cwd=self.tmp / "home",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                self.proc = None
                pytest.fail("the private RabbitMQ node exited at start: apt-get install -y rabbitmq-server, "
                            f"and see {self.tmp / 'log'}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the private RabbitMQ node did not listen within {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, "shutdown"], env=self.env,
                       cwd=self.tmp / "home", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                       check=False)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


def uuid_hex() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


async def test_rabbitmq_restart_mid_stream_loses_nothing(tmp_path: Path) -> None:
    """MQTT → gateway (spooled) → AMQP quorum queue → gateway (AMQP in) → file, with the RabbitMQ
    node shut down and started again in the middle: the outbound side must republish what was
    not confirmed, the inbound side must not lose what was delivered but not yet acknowledged."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto")
    broker = Mosquitto(tmp_path / "mosquitto")
    rabbit = RabbitNode(tmp_path / "rabbit")
    broker.start()
    try:
        await asyncio.to_thread(rabbit.start)
    except BaseException:
        broker.stop()
        raise
    out = tmp_path / "out.jsonl"
    topic, queue = unique("stream"), unique("gw.stream")
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{broker.port}", client_id: {unique("gw")}, subscribe: ["{topic}"]}}
  bus: {{type: amqp, url: "amqp://127.0.0.1:{rabbit.port}/", username: guest, password: "${{GW_FAULT_PW}}",
        queue: {{name: {queue}, queue_type: quorum}}, prefetch: 256, reconnect_min: 0.2, reconnect_max: 1}}
  out: {{type: file, path: "{out}"}}
""", f"""
  - name: plant-to-bus
    from: plant
    to: [{{connector: bus, routing_key: {queue}}}]
    on_failure: {{retry: {{attempts: 1000, initial: 0.2s, max: 1s}}}}
  - name: bus-to-file
    from: bus
    to: [{{connector: out}}]
""")
    os.environ["GW_FAULT_PW"] = "guest"
    try:
        async with running_gateway(tmp_path, yaml, ready_timeout=30) as rt:
            pub = await asyncio.to_thread(StreamPublisher, broker.port, topic)
            loop = asyncio.get_running_loop()
            publishing = loop.run_in_executor(None, pub.run, time.monotonic() + 150)
            await wait_for(lambda: pub.acked >= RESTART_AT, 60, what=f"{RESTART_AT} acknowledged")
            await asyncio.to_thread(rabbit.stop)
            await wait_for(lambda: not rt.slots["bus"].connector.health().up, 10, what="bus down")
            await asyncio.to_thread(rabbit.start)
            await publishing
            await wait_for(lambda: not classify(out)[0], 120, interval=0.5, what="every sequence number")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(pub.close)
        lost, _dups = report("rabbitmq restart", out, pub.acked)
    finally:
        await asyncio.to_thread(rabbit.stop)
        broker.stop()
    assert lost == 0
