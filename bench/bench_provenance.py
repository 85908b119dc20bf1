"""The cost of provenance: REST in → spool → file out with ``gateway.provenance`` on and off.

    .venv/bin/python -m bench.bench_provenance [--seconds 8] [--rounds 3] [--rate 800] [--connections 32]

Two gateway processes with the same route, one with provenance on (the default) and one with
``enabled: false``, loaded in turn with the same JSON POST; the order alternates (off first in
odd rounds, on first in even ones) so that a busy machine weighs on both alike. Each round has
two parts: a fixed rate (``--rate`` requests/s from an aiohttp client, the same for both: the CPU
per message compares like with like, since the spool's group commits grow with the load) and as
fast as `wrk` (Debian package) goes (throughput). Printed per round and in sum: requests/s, p99,
and the gateway process's CPU time per message (utime + stime from /proc/PID/stat over the part,
divided by the requests), then the ratio on/off. Every message records three events (received,
route matched, the attempt). Then, in this process, the two halves of that cost alone (CPU
time, 20,000 messages): the recording calls on the event loop and the store's writes on its
thread; on a shared machine these are steadier than the difference of two processes. Target:
provenance costs at most 15 % more CPU per message; the bytes on disk per message are printed,
for sizing ``max_size``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

from bench.bench_rest import LUA, wait_port
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wrk(url: str, seconds: int, connections: int, script: Path) -> tuple[int, float, str]:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return total, rps, (p99.group(1) if p99 else "?") + (f", {non2xx.group(1)} non-2xx" if non2xx else "")


BODY = json.dumps({"sensor": "boiler-7", "temperature": 97.5, "site": "north", "severity": "critical"}).encode()


async def _paced(url: str, rate: int, seconds: int, connections: int) -> tuple[int, float, str]:
    """``rate`` POSTs a second for ``seconds``, at most ``connections`` at once: (answered 202, rate, p99)."""
    latencies: list[float] = []
    ok = 0
    gate = asyncio.Semaphore(connections)

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        async with gate:
            start = time.perf_counter()
            async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                ok += r.status == 202
            latencies.append(time.perf_counter() - start)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        t0 = time.perf_counter()
        tasks = []
        for i in range(rate * seconds):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session)))
        await asyncio.gather(*tasks)
        took = time.perf_counter() - t0
    latencies.sort()
    return ok, ok / took, f"{latencies[int(len(latencies) * 0.99)] * 1000:.1f}ms"


def paced(url: str, rate: int, seconds: int, connections: int) -> tuple[int, float, str]:
    return asyncio.run(_paced(url, rate, seconds, connections))


def in_process(work: Path, count: int = 20_000) -> tuple[float, float]:
    """CPU µs per message of the recording calls (as the delivery makes them for a spooled
    message: route matched, received, the attempt) and of writing them (the store's thread)."""
    from gateway.contract import Outcome
    from gateway.delivery.provenance import Provenance
    from gateway.delivery.store import Job
    from gateway.envelope import Envelope

    async def run() -> tuple[float, float]:
        prov = Provenance(str(work / "in-process.db"))
        await prov.open()
        envs = [Envelope(source="api", protocol="rest", subject="/events/x", body=BODY,
                         attributes={"http_method": "POST", "query": {}, "peer": "127.0.0.1:40000"})
                for _ in range(count)]
        jobs = [Job(envelope_id=e.id, route="events", connector="sink", envelope="", options="", policy="")
                for e in envs]
        outcomes = [Outcome.accepted(e.id) for e in envs]
        # the calls buffer (the loop does not run here, so no flush); each 500 are written as one group
        loop_cpu = write_cpu = 0.0
        for i in range(0, count, 500):
            t0 = time.process_time()
            for env, job, outcome in zip(envs[i:i + 500], jobs[i:i + 500], outcomes[i:i + 500], strict=True):
                prov.route(env.id, "events", "matched")
                prov.received(env, outcome)
                prov.sent(job, None, time.perf_counter())
            t1 = time.process_time()
            rows, prov._buf = prov._buf, []
            assert prov._db is not None
            prov._write([rows])
            write_cpu += time.process_time() - t1
            loop_cpu += t1 - t0
        if prov._flush_timer is not None:
            prov._flush_timer.cancel()
            prov._flush_timer = None
        await prov.close()
        return loop_cpu / count * 1e6, write_cpu / count * 1e6

    return asyncio.run(run())


def gateway(work: Path, name: str, enabled: bool) -> tuple[subprocess.Popen[bytes], int, Path]:
    folder = work / name
    folder.mkdir()
    port, admin = free_port(), free_port()
    (folder / "routes.yaml").write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin}"}}
          spool: {{path: {folder}/spool.db}}
          state_dir: {folder}/state
          log: {{level: warning}}
          provenance: {{enabled: {str(enabled).lower()}}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
          sink: {{type: file, path: {folder}/out.jsonl}}
        routes:
          - name: events
            from: api
            to: [{{connector: sink}}]
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(folder / "routes.yaml")],
                            cwd=folder, env=env, stderr=subprocess.DEVNULL)
    return proc, port, folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rate", type=int, default=800, help="requests/s of the fixed-rate part")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-provenance-"))
    script = work / "post.lua"
    script.write_text(LUA)
    procs = {"off": gateway(work, "off", False), "on": gateway(work, "on", True)}
    parts = {"fixed": lambda url: paced(url, args.rate, args.seconds, args.connections),
             "wrk": lambda url: wrk(url, args.seconds, args.connections, script)}
    # per part and gateway: requests, seconds of load, CPU seconds
    sums = {(part, name): [0, 0.0, 0.0] for part in parts for name in procs}
    try:
        for _, port, _ in procs.values():
            wait_port(port)
        for _, port, _ in procs.values():
            wrk(f"http://127.0.0.1:{port}/events/warmup", 2, args.connections, script)
        print(f"{'round':<6} {'load':<6} {'provenance':<10} {'req/s':>8} {'p99':>16} {'CPU µs/msg':>11}")
        for r in range(1, args.rounds + 1):
            for part, load in parts.items():
                order = list(procs) if r % 2 else list(procs)[::-1]  # off-on, on-off, ...: neither always goes first
                for name in order:
                    proc, port, _ = procs[name]
                    before = cpu_seconds(proc.pid)
                    total, rps, note = load(f"http://127.0.0.1:{port}/events/x")
                    cpu = cpu_seconds(proc.pid) - before
                    s = sums[(part, name)]
                    s[0] += total
                    s[1] += total / rps
                    s[2] += cpu
                    print(f"{r:<6} {part:<6} {name:<10} {rps:>8.0f} {note:>16} {cpu / total * 1e6:>11.0f}")
    finally:
        for proc, _, _ in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{'all rounds':<24} {'req/s':>8} {'CPU µs/msg':>11}")
    extra = {}
    for part in parts:
        rate = {n: sums[(part, n)][0] / sums[(part, n)][1] for n in procs}
        cpu = {n: sums[(part, n)][2] / sums[(part, n)][0] * 1e6 for n in procs}
        for name in procs:
            print(f"{part:<6} provenance {name:<6} {rate[name]:>8.0f} {cpu[name]:>11.0f}")
        extra[part] = cpu["on"] / cpu["off"] - 1
        print(f"{part:<6} on/off: throughput {rate['on'] / rate['off']:.0%}, CPU per message {extra[part]:+.0%} "
              f"({cpu['on'] - cpu['off']:+.0f} µs)")
    messages = sum(sums[(part, "on")][0] for part in parts)
    loop_us, write_us = in_process(work)
    print(f"in this process: recording on the loop {loop_us:.1f} µs/msg, writing on the store's thread "
          f"{write_us:.1f} µs/msg")
    db = procs["on"][2] / "provenance.db"
    stored = sum(os.path.getsize(p) for p in db.parent.glob("provenance.db*"))
    print(f"provenance store: {stored / messages:.0f} bytes on disk per message "
          f"({messages} messages; 256 MiB holds about {256 * 1024 * 1024 * messages / stored / 1e6:.1f} million)")
    met = extra["fixed"] <= 0.15
    print(f"target: ≤ +15 % CPU per message at a fixed rate → {'met' if met else 'NOT met'} ({extra['fixed']:+.0%})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
