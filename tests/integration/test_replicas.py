"""Two gateway replicas behind one MQTT shared subscription (RELIABILITY.md rows 16, 17 and 32).

Two real ``gateway run`` processes read the same config, as two pods of the chart would: the
same ``routes.yaml``, with ``POD_NAME`` giving each its own ``client_id`` (``gateway-${POD_NAME}``)
and ``GW_REPLICA_DIR`` its own spool and state directory. Both read one topic through a shared
subscription (``share: <group>``) of a private Mosquitto (persistence on, no queue or in-flight
limit, so the broker never drops what it acknowledged) and deliver, through the durable spool,
to one HTTP sink in this test. The sink records every sequence number and the replica that
delivered it (``X-Replica: ${POD_NAME}`` on the target), so the reconciliation is exact:

* **lost**: acknowledged to the publisher (PUBACK) and never at the sink; must be 0;
* **duplicated**: at the sink more than once; 0 without faults, and with a SIGKILL at most the
  killed replica's in-flight window (MQTT ``max_inflight`` + twice the spool's delivery
  concurrency: jobs being sent and jobs settling);
* **unexpected**: at the sink but never published; must be 0.

Mosquitto 2.0.11 keeps giving a persistent session its round-robin share of a shared
subscription while the client is away (and drops that backlog when the session expires): the
surviving replica keeps its own share, and the killed replica's share waits in the broker for
it. So the fault test restarts the killed replica with the same identity (a StatefulSet pod)
and that replica drains its session and its spool.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from tests.gwtest import free_port
from tests.integration.test_mqtt import Mosquitto
from tests.integration.test_mqtt_amqp import unique

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
N = 10_000
#: Messages per second the publisher offers: a little more than two replicas deliver on a 2-core
#: machine (~1,800/s), so the replicas' in-flight windows are full and the kill (at 40 % delivered)
#: lands in the middle of both the publishing and the delivering.
RATE = 2000
MAX_INFLIGHT = 256
SPOOL_CONCURRENCY = 16
WARM = -1  # sequence number of warm-up messages (not part of the reconciliation)


def require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run scripts/peers.sh (it installs mosquitto and mosquitto-clients)")


# --- the sink ------------------------------------------------------------------------------


@dataclass
class SeqSink:
    """HTTP sink on 127.0.0.1 recording ``{"seq": n}`` bodies and the ``X-Replica`` that sent them."""

    seen: Counter[int] = field(default_factory=Counter)
    by_replica: dict[str, Counter[int]] = field(default_factory=dict)
    warm: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/in", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def count(self, replica: str) -> int:
        return sum(self.by_replica.get(replica, Counter()).values())

    async def _handle(self, request: web.Request) -> web.Response:
        seq = int(json.loads(await request.read())["seq"])
        replica = request.headers.get("X-Replica", "?")
        if seq == WARM:
            self.warm[replica] += 1
        else:
            self.seen[seq] += 1
            self.by_replica.setdefault(replica, Counter())[seq] += 1
        return web.Response(status=200, text="ok")


# --- the publisher -------------------------------------------------------------------------


class SeqPublisher:
    """Publishes ``{"seq": i}`` for i in 0..n-1 at QoS 1, paced to ``rate`` per second with at most
    ``window`` unacknowledged; remembers which ones the broker acknowledged (PUBACK)."""

    def __init__(self, port: int, topic: str, n: int = N, rate: int = RATE, window: int = 200):
        self.topic, self.n, self.rate = topic, n, rate
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self._slots = threading.Semaphore(window)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"), protocol=mqtt.MQTTv311,
                                  clean_session=False)
        self.client.max_inflight_messages = window
        self.client.on_publish = lambda *_: self._slots.release()
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def warm_up(self) -> None:
        self.client.publish(self.topic, json.dumps({"seq": WARM}), qos=1).wait_for_publish(5)

    def run(self, deadline: float) -> None:
        start = time.monotonic()
        for i in range(self.n):
            ahead = start + i / self.rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
            while not self._slots.acquire(timeout=0.5):
                if time.monotonic() > deadline:
                    raise AssertionError(f"publisher stalled at {i}")
            self.infos.append(self.client.publish(self.topic, json.dumps({"seq": i}), qos=1))
        while len(self.acked()) < self.n and time.monotonic() < deadline:
            time.sleep(0.05)

    def acked(self) -> set[int]:
        return {i for i, info in enumerate(self.infos) if info.is_published()}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- the replicas --------------------------------------------------------------------------


def replica_config(broker_port: int, topic: str, group: str, sink: SeqSink) -> str:
    """One routes.yaml for every replica; what differs per pod comes from its environment."""
    return textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:${{GW_ADMIN_PORT}}"}}
          spool: {{path: "${{GW_REPLICA_DIR}}/spool.db", min_free_bytes: 0, concurrency: {SPOOL_CONCURRENCY}}}
          state_dir: "${{GW_REPLICA_DIR}}/state"
          drain: 5s
          log: {{level: info, format: json}}
        connectors:
          plant:
            type: mqtt
            url: "mqtt://127.0.0.1:{broker_port}"
            client_id: "gateway-${{POD_NAME}}"
            share: {group}
            subscribe: ["{topic}"]
            qos: 1
            max_inflight: {MAX_INFLIGHT}
            reconnect_min: 0.2
            reconnect_max: 1
          sink: {{type: rest, base_url: "{sink.url}", timeout: 10s}}
        routes:
          - name: plant-to-sink
            from: plant
            to: [{{connector: sink, path: /in, headers: {{X-Replica: "${{POD_NAME}}"}}}}]
            on_failure: {{retry: {{attempts: 1000, initial: 0.05, max: 0.5}}}}
        """)


class Replica:
    """``python -m gateway.cli run --config …`` with a pod's environment."""

    def __init__(self, name: str, config: Path, root: Path):
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.admin_port = free_port()
        self.log = self.dir / "gateway.log"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "POD_NAME": name, "GW_REPLICA_DIR": str(self.dir),
                    "GW_ADMIN_PORT": str(self.admin_port)}
        self.command = [sys.executable, "-m", "gateway.cli", "run", "--config", str(config)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20.0) -> None:
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
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit within {timeout}s of SIGTERM:\n{self.tail()}") from None

    async def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    broker: Mosquitto
    sink: SeqSink
    topic: str
    replicas: list[Replica]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    require_mosquitto()
    broker = Mosquitto(tmp_path / "mosquitto")
    sink = SeqSink()
    await sink.start()
    broker.start()
    topic = unique("replicas") + "/seq"
    config = tmp_path / "routes.yaml"
    config.write_text(replica_config(broker.port, topic, unique("gw"), sink))
    replicas = [Replica(unique("gw-a"), config, tmp_path), Replica(unique("gw-b"), config, tmp_path)]
    try:
        await asyncio.gather(*(r.start() for r in replicas))
        yield Cluster(broker, sink, topic, replicas)
    finally:
        for r in replicas:
            await r.ensure_stopped()
        await asyncio.to_thread(broker.stop)
        await sink.stop()


async def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def warm_up(c: Cluster, pub: SeqPublisher) -> None:
    """Publish warm-up messages until both replicas delivered one: both subscriptions are live
    (a message published before any group member subscribed would not be kept by the broker)."""
    for _ in range(100):
        if all(c.sink.warm[r.name] for r in c.replicas):
            return
        await asyncio.to_thread(pub.warm_up)
        await asyncio.sleep(0.1)
    raise AssertionError(f"both replicas did not receive warm-up messages: {dict(c.sink.warm)}")


async def settle(sink: SeqSink, quiet: float, timeout: float) -> None:
    """Wait until the sink received nothing new for ``quiet`` seconds."""
    end = time.monotonic() + timeout
    last, since = sink.total, time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        if sink.total != last:
            last, since = sink.total, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def reconcile(name: str, sink: SeqSink, acked: set[int]) -> tuple[set[int], int, set[int]]:
    lost = acked - set(sink.seen)
    dups = sum(n - 1 for n in sink.seen.values() if n > 1)
    unexpected = set(sink.seen) - set(range(N))
    print(f"\n[{name}] published={N} broker-acked={len(acked)} arrived={len(sink.seen)} lost={len(lost)} "
          f"duplicates={dups} unexpected={len(unexpected)}")
    return lost, dups, unexpected


async def test_two_replicas_share_the_stream_exactly_once(cluster: Cluster) -> None:
    c, t0 = cluster, time.monotonic()
    a, b = c.replicas
    pub = await asyncio.to_thread(SeqPublisher, c.broker.port, c.topic)
    try:
        await warm_up(c, pub)
        await asyncio.get_running_loop().run_in_executor(None, pub.run, time.monotonic() + 60)
        acked = pub.acked()
        await wait_for(lambda: not acked - set(c.sink.seen), 40, "every acknowledged message at the sink",
                       interval=0.2)
        await settle(c.sink, quiet=1.0, timeout=10)  # late duplicates would show up here
    finally:
        await asyncio.to_thread(pub.close)
    lost, dups, unexpected = reconcile("two replicas, no faults", c.sink, acked)
    split = {r.name: c.sink.count(r.name) for r in c.replicas}
    print(f"[two replicas, no faults] split {split[a.name]} / {split[b.name]} "
          f"({100 * split[a.name] / N:.1f} % / {100 * split[b.name] / N:.1f} %), "
          f"{time.monotonic() - t0:.1f} s")
    assert len(acked) == N
    assert not lost and not unexpected
    assert dups == 0, "without faults every message is delivered exactly once"
    assert sum(split.values()) == N
    assert min(split.values()) >= N // 10, f"both replicas must do part of the work: {split}"
    for r in c.replicas:
        assert await r.terminate() == 0, r.tail()


async def test_sigkill_of_one_replica_loses_nothing(cluster: Cluster) -> None:
    c, t0 = cluster, time.monotonic()
    survivor, victim = c.replicas
    pub = await asyncio.to_thread(SeqPublisher, c.broker.port, c.topic)
    loop = asyncio.get_running_loop()
    try:
        await warm_up(c, pub)
        publishing = loop.run_in_executor(None, pub.run, time.monotonic() + 90)
        await wait_for(lambda: c.sink.total >= N * 4 // 10, 40, "40 % of the stream at the sink")
        await victim.kill9()
        at_kill = {r.name: c.sink.count(r.name) for r in c.replicas}
        acked_at_kill = len(pub.acked())
        await publishing
        acked = pub.acked()
        # The survivor finishes its share; the victim's waits in its session and spool.
        await settle(c.sink, quiet=1.5, timeout=30)
        survivor_after = c.sink.count(survivor.name) - at_kill[survivor.name]
        waiting = len(acked - set(c.sink.seen))
        # The killed pod comes back with the same name (StatefulSet): same client id and spool.
        await victim.start()
        await wait_for(lambda: not acked - set(c.sink.seen), 40, "every acknowledged message at the sink",
                       interval=0.2)
        await settle(c.sink, quiet=1.0, timeout=10)
    finally:
        await asyncio.to_thread(pub.close)
    lost, dups, unexpected = reconcile("SIGKILL of one replica", c.sink, acked)
    victim_after = c.sink.count(victim.name) - at_kill[victim.name]
    dup_seqs = [s for s, n in c.sink.seen.items() if n > 1]
    dups_by = {r.name: sum(1 for s in dup_seqs if c.sink.by_replica.get(r.name, Counter())[s]) for r in c.replicas}
    print(f"[SIGKILL of one replica] killed at {acked_at_kill} broker-acked; before the kill "
          f"{survivor.name}={at_kill[survivor.name]} {victim.name}={at_kill[victim.name]}; after it the survivor "
          f"delivered {survivor_after}; {waiting} waited for the killed replica (its broker session and spool) "
          f"and it delivered {victim_after} after its restart; duplicated sequence numbers delivered by each: "
          f"{dups_by}; {time.monotonic() - t0:.1f} s")
    assert len(acked) == N
    assert not lost, f"LOST broker-acknowledged messages: {sorted(lost)[:20]}"
    assert not unexpected
    assert survivor_after > 0, "the survivor must keep working after the kill"
    assert max(c.sink.by_replica[survivor.name].values()) == 1, "the survivor itself delivered something twice"
    # The killed replica's in-flight window: MQTT deliveries whose PUBACK did not reach the broker
    # (redelivered to its session), and spool jobs sent or settling whose removal was not written.
    assert dups <= MAX_INFLIGHT + 2 * SPOOL_CONCURRENCY, "duplicates beyond the killed replica's in-flight window"
    for r in c.replicas:
        assert await r.terminate() == 0, r.tail()
