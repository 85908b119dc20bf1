"""MQTT QoS 1 → AMQP with publisher confirms, and REST → MQTT: the gateway beside baselines,
measured in the same run on the same brokers.

    PYTHONPATH=. .venv/bin/python -m bench.bench_mqtt_amqp [--seconds 30] [--rounds 3] [--no-rest]

Every party is its own process, so none of them shares an interpreter (a GIL, an event loop)
with what is measured:

* the **MQTT publisher**: paho, QoS 1, 200 in flight, 256-byte JSON payloads carrying a sequence
  number and the send time; saturating or at a fixed rate. A broker acknowledges a QoS 1 PUBLISH
  on receipt, so a publisher bounded only by its PUBACKs outruns a slower bridge and spends the
  cores on a backlog in Mosquitto: at most 1,000 messages are in flight end to end (published, not
  yet consumed; the consumer's count is shared through a small memory-mapped file);
* the **bridge** under test, subscribed with QoS 1 and publishing persistent messages with
  publisher confirms to a fresh durable queue;
* the **AMQP consumer** (aio-pika, prefetch 1,000): checks that every acknowledged sequence number
  arrived and takes the end-to-end latency of each message from its send time.

Variants:

* ``raw-amqp`` — no MQTT and no bridge: an aio-pika publisher with confirms (pipelined, bounded
  only by the end-to-end window) in one process, the consumer in another. What the AMQP broker
  path alone sustains here: the ceiling the targets are measured against ("raw").
* ``best`` — the bridge users would write with paho + aio-pika at their best: paho's network
  thread hands each message to an asyncio (uvloop) loop, every publish is in flight at once
  (pipelined confirms), and the MQTT PUBACK goes out after the confirm (``manual_ack``).
* ``naive`` — the bridge most people write first: paho's ``on_message`` publishes and waits for
  the confirm, one message at a time; paho sends the PUBACK when ``on_message`` returns.
* ``gateway`` — ``gateway run`` with one MQTT connector (``max_inflight`` = the end-to-end
  window), one AMQP connector and a direct route (PUBACK only after the AMQP confirm).

Each variant runs ``--rounds`` times, interleaved (the order rotates every round), first at
saturation and then at a quarter of its own ceiling (the median of its saturation rounds): a
warm-up, then ``--seconds`` of measurement in which the consumer counts what arrived (msg/s is
that count over the window, not a burst), each process's CPU time is read from /proc (µs per
message: the publisher, the bridge, the consumer, Mosquitto and RabbitMQ — RabbitMQ is the
machine's shared one, so other users' traffic shows in its figure). "Added" latency is a
variant's p50/p99 minus raw-amqp's at a quarter of raw-amqp's ceiling in the same round.

REST → MQTT QoS 1 (``wrk``, 50 connections, a 60-byte JSON POST): the gateway (REST in, direct
route, answered after the PUBACK) beside Node-RED running ``http in → mqtt out`` (+ ``http
response``, which answers without waiting for the PUBACK) against the same broker. Node-RED is
installed from npm into ``~/.cache/gateway-bench/node-red`` for the benchmark only.

Diagnostics: BENCH_PROFILE=file.prof runs the gateway under cProfile; BENCH_GATEWAY_LOG=file
keeps its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
SIZE = 256
VARIANTS = ("raw-amqp", "best", "naive", "gateway")
MQTT_WINDOW = 200
#: Messages in flight end to end (published, not yet consumed), the same for every variant: a
#: broker confirms a persistent message after its fsync, which takes long on a busy disk, so
#: a variant allowed fewer unconfirmed messages would be measured at a disadvantage.
E2E_WINDOW = 1000


class Progress:
    """The consumer's count of messages received, shared with the publisher (8 bytes, mmap)."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), 8)

    def set(self, value: int) -> None:
        struct.pack_into("<q", self._map, 0, value)

    def get(self) -> int:
        value: int = struct.unpack_from("<q", self._map, 0)[0]
        return value

    def room(self, sent: int) -> bool:
        """Whether one more may be published without over :data:`E2E_WINDOW` in flight."""
        return sent - self.get() < E2E_WINDOW


def wait_port(port: int, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def payload(seq: int) -> bytes:
    """A JSON object of exactly :data:`SIZE` bytes with the sequence number and the send time."""
    head = f'{{"seq":{seq},"t":{time.time():.6f},"pad":"'
    return (head + "x" * (SIZE - len(head) - 2) + '"}').encode()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_pid() -> int | None:
    """The machine's RabbitMQ (beam.smp run by the rabbitmq user), for its CPU per message."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "beam.smp" and entry.stat().st_uid != os.getuid():
                    return int(entry.name)
            except OSError:
                continue
    return None


def sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)


# --- the processes' own code (``python -m bench.bench_mqtt_amqp role …``) -------------------


def role_mqtt_pub(port: int, topic: str, start_at: float, stop_at: float, rate: float, progress: Progress) -> None:
    """QoS 1 publisher from ``start_at`` to ``stop_at``: saturating (``rate`` 0, bounded by the
    in-flight window) or at ``rate`` msg/s. Prints how many were sent and acknowledged."""
    slots = threading.Semaphore(MQTT_WINDOW)
    acked = [0]

    def on_publish(*_: object) -> None:
        acked[0] += 1
        slots.release()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages = MQTT_WINDOW
    c.max_queued_messages = 0
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    sleep_until(start_at)
    sent = 0
    while time.time() < stop_at:
        if rate:
            sleep_until(start_at + sent / rate)
        if not progress.room(sent):
            time.sleep(0.0005)
            continue
        if slots.acquire(timeout=1):
            c.publish(topic, payload(sent), qos=1)
            sent += 1
    end = time.monotonic() + 30
    while acked[0] < sent and time.monotonic() < end:
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"sent": sent, "acked": acked[0]}), flush=True)


async def role_amqp_pub(queue: str, start_at: float, stop_at: float, rate: float, progress: Progress) -> None:
    """raw-amqp's publisher: persistent messages with confirms, as many in flight as the
    end-to-end window allows."""
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    acked = 0

    async def one(seq: int) -> None:
        nonlocal acked
        try:
            await ch.default_exchange.publish(
                aio_pika.Message(payload(seq), delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue)
            acked += 1
        except aio_pika.exceptions.AMQPError:
            pass  # not confirmed: not counted, so the consumer does not wait for it

    tasks = set()
    await asyncio.sleep(max(0.0, start_at - time.time()))
    sent = 0
    while time.time() < stop_at:
        if rate:
            await asyncio.sleep(max(0.0, start_at + sent / rate - time.time()))
        if not progress.room(sent):
            await asyncio.sleep(0.0005)
            continue
        task = asyncio.create_task(one(sent))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        sent += 1
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await conn.close()
    print(json.dumps({"sent": sent, "acked": acked}), flush=True)


async def role_consume(queue: str, t0: float, t1: float, progress: Progress) -> None:
    """Count what arrives in [t0, t1] with its latency; then, told on stdin how many messages
    the publisher had acknowledged, wait for the rest and report what is missing."""
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=1000)
    q = await ch.get_queue(queue)
    seen: set[int] = set()
    dups = 0
    lat: list[float] = []
    last = [time.monotonic()]

    async def on_message(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal dups
        now = time.time()
        body = json.loads(msg.body)
        seq = body["seq"]
        if seq in seen:
            dups += 1
        seen.add(seq)
        progress.set(len(seen))
        if t0 <= now < t1:
            lat.append(now - body["t"])
        last[0] = time.monotonic()
        if len(seen) % 100 == 0:
            await msg.ack(multiple=True)

    await q.consume(on_message)
    print("ready", flush=True)
    acked = int(json.loads(await asyncio.to_thread(sys.stdin.readline))["acked"])
    while len(seen) < acked and time.monotonic() - last[0] < 10:
        await asyncio.sleep(0.1)
    await conn.close()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else float("nan")

    missing = sum(1 for s in range(acked) if s not in seen)
    print(json.dumps({"window": len(lat), "p50": pct(0.5), "p99": pct(0.99), "missing": missing, "dups": dups}),
          flush=True)


async def role_best(port: int, topic: str, queue: str) -> None:
    """paho + aio-pika at their best: pipelined confirms, PUBACK after the confirm."""
    loop = asyncio.get_running_loop()
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
    exchange = ch.default_exchange
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-best-{uuid.uuid4().hex[:6]}", manual_ack=True)
    tasks: set[asyncio.Task[None]] = set()

    async def forward(body: bytes | bytearray, mid: int) -> None:
        await exchange.publish(aio_pika.Message(bytes(body), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                               routing_key=queue)
        c.ack(mid, 1)

    def start(body: bytes | bytearray, mid: int) -> None:
        task = loop.create_task(forward(body, mid))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_message(cl: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        loop.call_soon_threadsafe(start, m.payload, m.mid)

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(topic, 1)
    c.loop_start()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def role_naive(port: int, topic: str, queue: str) -> None:
    """The first bridge people write: publish, wait for the confirm, return (paho then acks)."""
    loop = asyncio.get_running_loop()
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel(publisher_confirms=True)

    async def forward(body: bytes | bytearray) -> None:
        await ch.default_exchange.publish(aio_pika.Message(bytes(body), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                          routing_key=queue)

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-naive-{uuid.uuid4().hex[:6]}")
    c.on_message = lambda cl, u, m: asyncio.run_coroutine_threadsafe(forward(m.payload), loop).result()
    c.connect("127.0.0.1", port)
    c.subscribe(topic, 1)
    c.loop_start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def role(argv: list[str]) -> None:
    name, args = argv[0], argv[1:]
    if name == "mqtt-pub":
        role_mqtt_pub(int(args[0]), args[1], float(args[2]), float(args[3]), float(args[4]), Progress(args[5]))
        return
    import uvloop

    if name == "amqp-pub":
        uvloop.run(role_amqp_pub(args[0], float(args[1]), float(args[2]), float(args[3]), Progress(args[4])))
    elif name == "consume":
        uvloop.run(role_consume(args[0], float(args[1]), float(args[2]), Progress(args[3])))
    elif name == "best":
        uvloop.run(role_best(int(args[0]), args[1], args[2]))
    elif name == "naive":
        asyncio.run(role_naive(int(args[0]), args[1], args[2]))
    else:
        raise SystemExit(f"unknown role {name!r}")


# --- the orchestration -----------------------------------------------------------------------


def spawn(*args: str, stdin: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([PY, "-m", "bench.bench_mqtt_amqp", "role", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


def wait_ready(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise SystemExit(f"{what} did not start")


def start_gateway(tmp: Path, port: int, topic: str, queue: str) -> subprocess.Popen[bytes]:
    admin = free_port()
    cfg = tmp / "routes.yaml"
    cfg.write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin}"}}
          spool: {{path: "{tmp}/spool.db", min_free_bytes: 0}}
          state_dir: "{tmp}/state"
          log: {{level: warning}}
        connectors:
          plant: {{type: mqtt, url: "mqtt://127.0.0.1:{port}", client_id: bench-gw-{uuid.uuid4().hex[:6]},
                   session_expiry: 60, subscribe: ["{topic}"], max_inflight: {E2E_WINDOW}}}
          bus: {{type: amqp, username: guest, password: "${{BENCH_AMQP_PW}}"}}
        routes:
          - name: plant-to-bus
            from: plant
            mode: direct
            to: [{{connector: bus, routing_key: "{queue}"}}]
    """))
    env = {**os.environ, "BENCH_AMQP_PW": "guest"}
    cmd = [str(Path(PY).parent / "gateway"), "run", "--config", str(cfg)]
    if os.environ.get("BENCH_PROFILE"):
        cmd = [PY, "-m", "cProfile", "-o", os.environ["BENCH_PROFILE"], *cmd]
    log = open(os.environ["BENCH_GATEWAY_LOG"], "ab") if os.environ.get("BENCH_GATEWAY_LOG") else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    end = time.monotonic() + 20
    import urllib.request

    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("gateway did not become ready")


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def fresh_queue() -> str:
    name = f"bench.{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel()
    await ch.declare_queue(name, durable=True, arguments={"x-expires": 600_000})
    await conn.close()
    return name


@dataclass
class Run:
    variant: str
    round: int
    rate: float  # the publisher's rate; 0 = saturation
    seconds: float
    received: int = 0
    p50: float = float("nan")
    p99: float = float("nan")
    missing: int = 0
    dups: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process → CPU seconds in the window

    @property
    def msgs(self) -> float:
        return self.received / self.seconds

    def cpu_us(self, who: str) -> str:
        if who not in self.cpu or not self.received:
            return "-"
        return f"{self.cpu[who] / self.received * 1e6:.0f}"


def measure(variant: str, rnd: int, rate: float, tmp: Path, mqtt_port: int, broker_pid: int, rabbit: int | None,
            warm: float, seconds: float) -> Run:
    queue = asyncio.run(fresh_queue())
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    bridge: subprocess.Popen[Any] | None = None
    if variant == "gateway":
        bridge = start_gateway(tmp, mqtt_port, topic, queue)
    elif variant in ("best", "naive"):
        bridge = spawn(variant, str(mqtt_port), topic, queue)
        wait_ready(bridge, variant)
    start_at = time.time() + 1.5
    t0 = start_at + warm
    t1 = t0 + seconds
    progress = tmp / f"progress-{queue}"
    progress.write_bytes(bytes(8))
    consumer = spawn("consume", queue, repr(t0), repr(t1), str(progress), stdin=True)
    pub = None
    try:
        wait_ready(consumer, "consumer")
        if variant == "raw-amqp":
            pub = spawn("amqp-pub", queue, repr(start_at), repr(t1 + 0.2), repr(rate), str(progress))
        else:
            pub = spawn("mqtt-pub", str(mqtt_port), topic, repr(start_at), repr(t1 + 0.2), repr(rate), str(progress))
        procs = {"publisher": pub.pid, "consumer": consumer.pid, "mosquitto": broker_pid}
        if bridge is not None:
            procs["bridge"] = bridge.pid
        if rabbit is not None:
            procs["rabbitmq"] = rabbit
        sleep_until(t0)
        cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
        sleep_until(t1)
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in procs.items()}
        out, _ = pub.communicate(timeout=60)
        assert consumer.stdin is not None and consumer.stdout is not None
        consumer.stdin.write(out.strip().splitlines()[-1] + "\n")
        consumer.stdin.flush()
        result = json.loads(consumer.stdout.readline())
        consumer.wait(30)
    finally:
        for proc in (pub, consumer, bridge):
            if proc is not None:
                stop(proc)
    if variant == "raw-amqp":
        cpu.pop("mosquitto", None)
    return Run(variant, rnd, rate, seconds, result["window"], result["p50"], result["p99"], result["missing"],
               result["dups"], cpu)


# --- REST → MQTT beside Node-RED ------------------------------------------------------------

NODE_RED_VERSION = "4.1.8"  # 5.x needs Node.js 22; Debian 12 has 20
NODE_RED_DIR = Path.home() / ".cache" / "gateway-bench" / f"node-red-{NODE_RED_VERSION}"
WRK_LUA = 'wrk.method = "POST"\nwrk.body = \'{"site": "north", "temperature": 93.5, "ok": true}\'\n' \
          'wrk.headers["Content-Type"] = "application/json"\n'


def node_red() -> Path | None:
    red = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
    if red.exists():
        return red
    if shutil.which("npm") is None:
        return None
    NODE_RED_DIR.mkdir(parents=True, exist_ok=True)
    print(f"installing node-red@{NODE_RED_VERSION} into {NODE_RED_DIR} (benchmark only) …", flush=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"node-red@{NODE_RED_VERSION}"],
                   cwd=NODE_RED_DIR, check=False, stdout=subprocess.DEVNULL)
    return red if red.exists() else None


def start_node_red(red: Path, tmp: Path, http_port: int, mqtt_port: int) -> subprocess.Popen[bytes]:
    user = tmp / "node-red"
    user.mkdir(exist_ok=True)
    flows = [
        {"id": "t1", "type": "tab", "label": "bench"},
        {"id": "b1", "type": "mqtt-broker", "name": "local", "broker": "127.0.0.1", "port": str(mqtt_port),
         "clientid": "", "autoConnect": True, "usetls": False, "protocolVersion": "4", "keepalive": "60",
         "cleansession": True},
        {"id": "h1", "type": "http in", "z": "t1", "url": "/in", "method": "post", "wires": [["m1", "r1"]]},
        {"id": "m1", "type": "mqtt out", "z": "t1", "topic": "bench/nr", "qos": "1", "retain": "false",
         "broker": "b1", "wires": []},
        {"id": "r1", "type": "http response", "z": "t1", "statusCode": "200", "wires": []},
    ]
    (user / "flows.json").write_text(json.dumps(flows))
    (user / "settings.js").write_text(textwrap.dedent(f"""
        module.exports = {{
          uiHost: "127.0.0.1", uiPort: {http_port}, httpAdminRoot: false, flowFile: "flows.json",
          credentialSecret: false, logging: {{console: {{level: "warn"}}}},
        }};
    """))
    proc = subprocess.Popen(["node", str(red), "-u", str(user), "-s", str(user / "settings.js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http_post(http_port, "/in")
    return proc


def wait_http_post(port: int, path: str, timeout: float = 30) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"nothing answers POST {path} on {port}")


def start_rest_gateway(tmp: Path, http_port: int, mqtt_port: int) -> subprocess.Popen[bytes]:
    admin = free_port()
    cfg = tmp / "rest.yaml"
    cfg.write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin}"}}
          spool: {{path: "{tmp}/rest-spool.db", min_free_bytes: 0}}
          state_dir: "{tmp}/rest-state"
          log: {{level: warning}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{http_port}", auth: {{type: none}}}}
          plant: {{type: mqtt, url: "mqtt://127.0.0.1:{mqtt_port}", client_id: bench-rest-{uuid.uuid4().hex[:6]},
                   max_inflight: 1000}}
        routes:
          - name: api-to-plant
            from: api
            mode: direct
            to: [{{connector: plant, topic: "bench/gw", qos: 1}}]
    """))
    proc = subprocess.Popen([str(Path(PY).parent / "gateway"), "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http_post(http_port, "/in")
    return proc


@dataclass
class WrkResult:
    name: str
    rps: float
    p50: str
    p99: str
    non2xx: int
    received: int
    cpu_us: str


def wrk(port: int, seconds: float, lua: Path) -> tuple[float, str, str, int, int]:
    out = subprocess.run(["wrk", "-t2", "-c50", f"-d{seconds:g}s", "--latency", "-s", str(lua),
                          f"http://127.0.0.1:{port}/in"], capture_output=True, text=True, check=True).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    lat = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.strip().startswith(("50%", "99%"))}
    total = int(out.split(" requests in ")[0].split()[-1])
    non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    return rps, lat.get("50%", "?"), lat.get("99%", "?"), non2xx, total


def rest_to_mqtt(tmp: Path, mqtt_port: int, seconds: float) -> list[WrkResult]:
    if shutil.which("wrk") is None:
        print("REST → MQTT skipped: wrk is not installed (apt-get install -y wrk)")
        return []
    red = node_red()
    lua = tmp / "post.lua"
    lua.write_text(WRK_LUA)
    counts = {"bench/gw": 0, "bench/nr": 0}
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:6]}")

    def on_message(c: object, u: object, m: mqtt.MQTTMessage) -> None:
        counts[m.topic] = counts.get(m.topic, 0) + 1

    sub.on_message = on_message
    sub.connect("127.0.0.1", mqtt_port)
    sub.subscribe("bench/#", 1)
    sub.loop_start()
    results = []
    variants: list[tuple[str, str]] = [("gateway", "bench/gw")]
    if red is not None:
        variants.append(("node-red", "bench/nr"))
    else:
        print("Node-RED not available (npm missing or install failed): only the gateway is measured")
    for name, topic in variants:
        port = free_port()
        proc = start_rest_gateway(tmp, port, mqtt_port) if name == "gateway" else \
            start_node_red(red, tmp, port, mqtt_port)  # type: ignore[arg-type]
        try:
            wrk(port, 1, lua)  # warm-up
            before = counts[topic]
            cpu0 = cpu_seconds(proc.pid)
            rps, p50, p99, non2xx, total = wrk(port, seconds, lua)
            cpu = cpu_seconds(proc.pid) - cpu0
            time.sleep(1.0)
            results.append(WrkResult(name, rps, p50, p99, non2xx, counts[topic] - before,
                                     f"{cpu / max(1, total) * 1e6:.0f}"))
        finally:
            stop(proc)
    sub.loop_stop()
    sub.disconnect()
    return results


def spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """A median with the range of the rounds beside it."""
    if not values:
        return "-"
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return fmt(mid) if len(values) == 1 else f"{fmt(mid)} ({fmt(lo)}–{fmt(hi)})"


def report(runs: list[Run], variants: list[str]) -> None:
    procs = ("publisher", "bridge", "consumer", "mosquitto", "rabbitmq")
    print(f"\nMQTT QoS 1 → AMQP confirms, {SIZE} B, {os.cpu_count()} cores, all on 127.0.0.1; "
          "CPU µs per message of each process")
    print(f"{'variant':<9} {'rnd':>3} {'load':>10} {'msg/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'miss':>5} "
          f"{'dups':>5} " + " ".join(f"{p[:9]:>9}" for p in procs))
    for r in runs:
        load = f"{r.rate:.0f}/s" if r.rate else "saturate"
        print(f"{r.variant:<9} {r.round:>3} {load:>10} {r.msgs:>7.0f} {r.p50:>8.2f} {r.p99:>8.2f} {r.missing:>5} "
              f"{r.dups:>5} " + " ".join(f"{r.cpu_us(p):>9}" for p in procs))
    sat = {(r.variant, r.round): r for r in runs if not r.rate}
    quarter = {(r.variant, r.round): r for r in runs if r.rate}
    rounds = sorted({r.round for r in runs})
    print("\nsummary: median (range) over the rounds")
    print(f"{'variant':<9} {'msg/s':>22} {'bridge µs/msg':>22} {'p50 at ¼':>22} {'p99 at ¼':>22} "
          f"{'added p99 at ¼':>24}")
    for v in variants:
        rate = [sat[v, n].msgs for n in rounds if (v, n) in sat]
        cpu = [sat[v, n].cpu["bridge"] / sat[v, n].received * 1e6 for n in rounds
               if (v, n) in sat and "bridge" in sat[v, n].cpu and sat[v, n].received]
        p50 = [quarter[v, n].p50 for n in rounds if (v, n) in quarter]
        p99 = [quarter[v, n].p99 for n in rounds if (v, n) in quarter]
        added = [quarter[v, n].p99 - quarter["raw-amqp", n].p99 for n in rounds
                 if (v, n) in quarter and ("raw-amqp", n) in quarter]
        print(f"{v:<9} {spread(rate, lambda x: f'{x:,.0f}'):>22} {spread(cpu, lambda x: f'{x:.0f}'):>22} "
              f"{spread(p50, lambda x: f'{x:.2f}'):>22} {spread(p99, lambda x: f'{x:.2f}'):>22} "
              f"{spread(added, lambda x: f'{x:+.2f}'):>24}")

    def ratio(a: str, b: str) -> list[float]:
        return [sat[a, n].msgs / sat[b, n].msgs for n in rounds if (a, n) in sat and (b, n) in sat and sat[b, n].msgs]

    if "gateway" in variants:
        print()
        for base, target in (("naive", "≥ 1.5×"), ("raw-amqp", "≥ 70 %"), ("best", "")):
            values = ratio("gateway", base)
            if values:
                fmt = (lambda x: f"{x:.0%}") if base != "naive" else (lambda x: f"{x:.2f}×")
                goal = f"  target {target}" if target else ""
                print(f"gateway / {base} (same round): {spread(values, fmt)}{goal}")
        lost = sum(r.missing for r in runs)
        print(f"acknowledged by the publisher, never consumed: {lost} (every variant, every run)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window of each run")
    ap.add_argument("--warm", type=float, default=5.0, help="warm-up before each window")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--no-latency", action="store_true", help="skip the runs at a quarter of the ceiling")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="skip the saturation runs; measure latency at this rate (msg/s) for every variant")
    ap.add_argument("--rest-seconds", type=float, default=30.0, help="wrk run of REST → MQTT")
    ap.add_argument("--no-rest", action="store_true", help="skip REST → MQTT beside Node-RED")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed: apt-get install -y mosquitto")
    tmp = Path(tempfile.mkdtemp(prefix="bench-mqtt-amqp-"))
    port = free_port()
    (tmp / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                        "max_queued_messages 0\nmax_inflight_messages 0\nuser root\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(port)
    rabbit = rabbitmq_pid()
    runs: list[Run] = []
    rest: list[WrkResult] = []

    def run(v: str, n: int, rate: float) -> None:
        r = measure(v, n, rate, tmp, port, broker.pid, rabbit, args.warm, args.seconds)
        runs.append(r)
        load = f"{rate:.0f}/s" if rate else "saturation"
        print(f"  round {n} {v:<9} {load:>10}: {r.msgs:,.0f} msg/s, p50 {r.p50:.2f} ms, p99 {r.p99:.2f} ms, "
              f"bridge {r.cpu_us('bridge')} µs/msg, missing {r.missing}", flush=True)

    try:
        for n in range(1, args.rounds + 1 if not args.rate else 1):
            k = (n - 1) % len(variants)
            for v in variants[k:] + variants[:k]:
                run(v, n, 0.0)
        if not args.no_latency:
            ceiling = {v: args.rate * 4 or statistics.median(r.msgs for r in runs if r.variant == v and not r.rate)
                       for v in variants}
            for n in range(1, args.rounds + 1):
                k = (n - 1) % len(variants)
                for v in variants[k:] + variants[:k]:
                    run(v, n, max(1.0, round(ceiling[v] / 4)))
        if not args.no_rest:
            rest = rest_to_mqtt(tmp, port, args.rest_seconds)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    report(runs, variants)
    if rest:
        print(f"\nREST POST → MQTT QoS 1, wrk -t2 -c50 -d{args.rest_seconds:g}s")
        print(f"{'variant':<10} {'req/s':>8} {'p50':>9} {'p99':>9} {'non-2xx':>8} {'published':>10} {'CPU µs/req':>10}")
        for w in rest:
            print(f"{w.name:<10} {w.rps:>8.0f} {w.p50:>9} {w.p99:>9} {w.non2xx:>8} {w.received:>10} {w.cpu_us:>10}")
        by = {w.name: w for w in rest}
        if "node-red" in by:
            print(f"gateway / node-red: {by['gateway'].rps / by['node-red'].rps:.2f}× (target ≥ 1.5×)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "role":
        role(sys.argv[2:])
    else:
        main()
