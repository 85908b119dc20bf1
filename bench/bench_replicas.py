"""Replicas sharing the RabbitMQ spool: 1, 2 and 3 gateway processes beside one on SQLite, one run.

    .venv/bin/python -m bench.bench_replicas [--seconds 10] [--connections 32]

Every set-up is real ``gateway run`` processes with one ``routes.yaml``: REST in → spooled route →
a file out per replica. The baseline is one replica on the default SQLite spool. The load (an
aiohttp generator in this process, its connections spread over the replicas as a load balancer
would) runs for ``--seconds``; then the bench waits until every accepted message is in a file.
Reported per set-up:

* accepted/s: HTTP 202 answers per second of load;
* delivered/s: accepted messages over the time from the start of the load until the last one
  is in its file (the spool's backlog drained);
* CPU per message: user + system time of the gateway processes, and of the RabbitMQ server
  (``beam.smp``), from the start of the load until drained, over the messages delivered.

On one machine the replicas, the broker and the load generator share the same cores: the figures
show what a replica costs, not how a cluster of machines scales.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("GATEWAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BODY = {"sensor": "boiler-7", "temperature": 97.5, "site": "north", "severity": "critical"}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def broker_pid() -> int | None:
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if out else None


def config(spool: str) -> str:
    return textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:${{GW_ADMIN_PORT}}"}}
          spool: {spool}
          state_dir: "${{GW_REPLICA_DIR}}/state"
          log: {{level: warning}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:${{GW_REST_PORT}}", auth: {{type: none}},
                endpoints: [{{path: "/in/**", methods: [POST]}}]}}
          out: {{type: file, path: "${{GW_REPLICA_DIR}}/out.jsonl"}}
        routes:
          - name: spooled
            from: api
            to: [{{connector: out, format: body}}]
        """)


@dataclass
class Replica:
    home: Path
    rest_port: int
    admin_port: int
    proc: subprocess.Popen[bytes]

    def delivered(self) -> int:
        try:
            with open(self.home / "out.jsonl", "rb") as fh:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        except OSError:
            return 0


def start(work: Path, name: str, config_path: Path, extra_env: dict[str, str]) -> Replica:
    home = work / name
    home.mkdir(parents=True)
    rest, admin = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GW_REPLICA_DIR": str(home), "GW_REST_PORT": str(rest),
           "GW_ADMIN_PORT": str(admin), **extra_env}
    with open(home / "gateway.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(config_path)],
                                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Replica(home, rest, admin, proc)


async def wait_ready(replicas: list[Replica], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s:
        for r in replicas:
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{r.admin_port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                if r.proc.poll() is not None or time.monotonic() > end:
                    raise SystemExit(f"a replica in {r.home} did not become ready")
                await asyncio.sleep(0.1)


async def load(replicas: list[Replica], seconds: float, connections: int) -> int:
    """POST for ``seconds`` over ``connections``, spread over the replicas; the number of 202s."""
    accepted = 0
    end = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession, port: int) -> None:
        nonlocal accepted
        while time.monotonic() < end:
            try:
                async with session.post(f"http://127.0.0.1:{port}/in/x", json=BODY) as r:
                    await r.read()
                    accepted += r.status == 202
            except aiohttp.ClientError as exc:
                raise SystemExit(f"the replica on port {port} stopped answering: {exc}") from None

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        await asyncio.gather(*(one(session, replicas[i % len(replicas)].rest_port) for i in range(connections)))
    return accepted


async def delete_topology(prefix: str) -> None:
    conn = await aio_pika.connect(URL)
    try:
        channel = await conn.channel()
        for queue in (f"{prefix}.jobs.out", f"{prefix}.dead"):
            await channel.queue_delete(queue)
        for exchange in (f"{prefix}.jobs", f"{prefix}.dead"):
            await channel.exchange_delete(exchange)
    finally:
        await conn.close()


async def measure(work: Path, label: str, kind: str, count: int, seconds: float, connections: int) -> dict[str, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    if kind == "rabbitmq":
        spool = (f'{{type: rabbitmq, url: "${{SPOOL_AMQP_URL}}", queue_prefix: {prefix},'
                 ' path: "${GW_REPLICA_DIR}/local.db"}')
    else:
        spool = '{path: "${GW_REPLICA_DIR}/spool.db"}'
    path = work / f"{label}.yaml"
    path.write_text(config(spool))
    replicas = [start(work, f"{label}-{i}", path, {"SPOOL_AMQP_URL": URL}) for i in range(count)]
    try:
        await wait_ready(replicas)
        await load(replicas, 2, connections)  # warm-up
        while True:  # the warm-up delivered before the clock starts
            before = sum(r.delivered() for r in replicas)
            await asyncio.sleep(0.5)
            if sum(r.delivered() for r in replicas) == before:
                break
        broker = broker_pid() if kind == "rabbitmq" else None
        cpu0 = sum(cpu_seconds(r.proc.pid) for r in replicas)
        broker0 = cpu_seconds(broker) if broker else 0.0
        t0 = time.monotonic()
        accepted = await load(replicas, seconds, connections)
        loaded = time.monotonic() - t0
        target = before + accepted
        deadline = time.monotonic() + 120
        while sum(r.delivered() for r in replicas) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        drained = time.monotonic() - t0
        delivered = sum(r.delivered() for r in replicas) - before
        cpu = sum(cpu_seconds(r.proc.pid) for r in replicas) - cpu0
        broker_cpu = (cpu_seconds(broker) - broker0) if broker else 0.0
    finally:
        for r in replicas:
            r.proc.send_signal(signal.SIGTERM)
        for r in replicas:
            try:
                r.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                r.proc.kill()
        if kind == "rabbitmq":
            await delete_topology(prefix)
    return {"accepted": accepted / loaded, "delivered": delivered / drained, "missing": float(accepted - delivered),
            "gw_us": cpu / max(delivered, 1) * 1e6, "broker_us": broker_cpu / max(delivered, 1) * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    setups = [("1 replica, SQLite spool", "sqlite", 1)] + [
        (f"{n} replica{'s' if n > 1 else ''}, RabbitMQ spool", "rabbitmq", n) for n in (1, 2, 3)]
    rows = {}
    try:
        for i, (label, kind, count) in enumerate(setups):
            rows[label] = asyncio.run(measure(work, f"s{i}", kind, count, args.seconds, args.connections))
    except BaseException:
        print(f"the replicas' logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
    base = rows[setups[0][0]]
    print(f"REST in → spooled → file out, {args.connections} connections for {args.seconds:g} s per set-up, "
          f"{os.cpu_count()} cores shared by all; baseline = one replica on SQLite\n")
    print(f"{'set-up':<28} {'accepted/s':>11} {'delivered/s':>12} {'vs base':>8} {'gateway µs/msg':>15} "
          f"{'broker µs/msg':>14} {'missing':>8}")
    for label, r in rows.items():
        print(f"{label:<28} {r['accepted']:>11.0f} {r['delivered']:>12.0f} {r['delivered'] / base['delivered']:>8.0%} "
              f"{r['gw_us']:>15.0f} {r['broker_us']:>14.0f} {r['missing']:>8.0f}")


if __name__ == "__main__":
    main()
