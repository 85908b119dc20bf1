"""Spooled vs direct delivery, REST in → file out, in one gateway process and one run.

    .venv/bin/python -m bench.bench_spool [--seconds 8] [--connections 64] [--probes 300]

The baseline is the direct route: its 202 waits for the file sink's fsync'd append. The spooled
route's 202 waits for the spool's fsync'd group commit instead, and the append happens after.
Measured, for each route, in the same run against the same process:

* throughput and ack latency under load (``wrk``, N connections; an aiohttp load generator
  when wrk is missing);
* ack latency one request at a time (what spooling adds to a lone message);
* spooled only: end-to-end latency, from sending to the line being in the file, one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import aiohttp

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = {"sensor": "boiler-7", "temperature": 97.5, "site": "north", "severity": "critical"}
LUA = textwrap.dedent(f"""
    wrk.method = "POST"
    wrk.body = '{json.dumps(BODY)}'
    wrk.headers["Content-Type"] = "application/json"
""")


def wait_ready(admin: str, timeout: float = 60) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("the gateway did not become ready")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {p: _ms(re.search(rf"\s{p}%\s+(\S+)", out).group(1)) for p in ("50", "99")}  # type: ignore[union-attr]
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "errors": float(non2xx.group(1)) if non2xx else 0.0}


async def _aiohttp_load(url: str, seconds: int, connections: int) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < end:
            t = time.perf_counter()
            async with session.post(url, json=BODY) as r:
                await r.read()
                if r.status != 202:
                    errors += 1
            lat.append((time.perf_counter() - t) * 1000)

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        started = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(connections)))
        took = time.monotonic() - started
    q = statistics.quantiles(lat, n=100)
    return {"rps": len(lat) / took, "p50": q[49], "p99": q[98], "errors": float(errors)}


def load(url: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    if shutil.which("wrk"):
        return wrk(url, seconds, connections, script)
    return asyncio.run(_aiohttp_load(url, seconds, connections))


async def end_to_end(url: str, out: Path, probes: int) -> tuple[list[float], list[float]]:
    """One at a time: (ack latency, sent → line in the file latency), in ms."""
    acks: list[float] = []
    e2e: list[float] = []
    offset = out.stat().st_size if out.exists() else 0
    async with aiohttp.ClientSession() as session:
        for i in range(probes):
            marker = f"probe-{i}-{time.time_ns()}"
            t = time.perf_counter()
            async with session.post(url, json={"probe": marker}) as r:
                await r.read()
                assert r.status == 202, r.status
            acks.append((time.perf_counter() - t) * 1000)
            for _ in range(20_000):  # bounded: 20 s at most
                with open(out, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                if marker.encode() in chunk:
                    e2e.append((time.perf_counter() - t) * 1000)
                    offset += len(chunk)
                    break
                await asyncio.sleep(0.0005)
    return acks, e2e


def depth(spool: Path) -> int:
    with sqlite3.connect(spool) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def drain_time(spool: Path, timeout: float = 120) -> tuple[int, float]:
    """(jobs waiting right now, seconds until none are)."""
    waiting = depth(spool)
    started = time.monotonic()
    while depth(spool) and time.monotonic() - started < timeout:
        time.sleep(0.02)
    return waiting, time.monotonic() - started


def pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--probes", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    script = work / "post.lua"
    script.write_text(LUA)
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    (work / "routes.yaml").write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "{admin}"}}
          spool: {{path: {work}/spool.db}}
          log: {{level: warning}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}},
                 endpoints: [{{path: "/spooled/**"}}, {{path: "/direct/**"}}]}}
          spooled-file: {{type: file, path: {work}/spooled.jsonl}}
          direct-file: {{type: file, path: {work}/direct.jsonl}}
        routes:
          - name: spooled
            from: api
            match: {{subject: "/spooled/**"}}
            to: [{{connector: spooled-file, format: body}}]
          - name: direct
            from: api
            match: {{subject: "/direct/**"}}
            mode: direct
            to: [{{connector: direct-file, format: body}}]
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(work / "routes.yaml")],
                          cwd=work, env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    rows: dict[str, dict[str, float]] = {}
    backlog: list[tuple[int, float, float]] = []  # (waiting after the load, drain seconds, load req/s)
    try:
        wait_ready(admin)
        for route in ("direct", "spooled"):  # warm up both
            load(f"{base}/{route}/warmup", 2, args.connections, script)
        # interleaved twice, best of two, so neither route gets the quieter half of the run
        for _ in range(2):
            for route in ("direct", "spooled"):
                r = load(f"{base}/{route}/x", args.seconds, args.connections, script)
                if route == "spooled":
                    backlog.append((*drain_time(work / "spool.db"), r["rps"]))
                key = f"{route}, {args.connections} connections"
                if key not in rows or r["rps"] > rows[key]["rps"]:
                    rows[key] = r
        for route in ("direct", "spooled"):
            rows[f"{route}, 1 connection"] = load(f"{base}/{route}/x", max(3, args.seconds // 2), 1, script)
        acks, e2e = asyncio.run(end_to_end(f"{base}/spooled/probe", work / "spooled.jsonl", args.probes))
        direct_acks, _ = asyncio.run(end_to_end(f"{base}/direct/probe", work / "direct.jsonl", args.probes))
        left = drain_time(work / "spool.db")[0] if depth(work / "spool.db") else 0
    finally:
        gw.terminate()
        gw.wait(timeout=60)

    tool = "wrk" if shutil.which("wrk") else "aiohttp"
    print(f"REST in → file out, one gateway process, load by {tool}; baseline = direct mode\n")
    print(f"{'route':<28} {'req/s':>9} {'vs direct':>10} {'ack p50':>9} {'ack p99':>9} {'non-202':>8}")
    for name, r in rows.items():
        baseline = rows[name.replace("spooled", "direct")]
        print(f"{name:<28} {r['rps']:>9.0f} {r['rps'] / baseline['rps']:>10.0%} {r['p50']:>7.2f}ms "
              f"{r['p99']:>7.2f}ms {r['errors']:>8.0f}")
    added = pct(acks, 50) - pct(direct_acks, 50)
    print(f"\none at a time ({args.probes} probes, aiohttp):")
    print(f"  direct   ack p50 {pct(direct_acks, 50):6.2f} ms  p99 {pct(direct_acks, 99):6.2f} ms"
          "  (202 after the file's fsync)")
    print(f"  spooled  ack p50 {pct(acks, 50):6.2f} ms  p99 {pct(acks, 99):6.2f} ms"
          "  (202 after the spool's fsync)")
    print(f"  spooled  sent → in the file p50 {pct(e2e, 50):6.2f} ms  p99 {pct(e2e, 99):6.2f} ms")
    print(f"  latency spooling adds to the acknowledgement: {added:+.2f} ms (p50); "
          f"to the delivery: {pct(e2e, 50) - pct(direct_acks, 50):+.2f} ms (p50)")
    for waiting, took, rps in backlog:
        total = rps * args.seconds
        print(f"  spooled under load: {waiting} of ~{total:.0f} jobs still waiting when the load stopped, "
              f"drained in {took:.2f} s (delivery keeps up with ~{(total - waiting) / args.seconds:.0f}/s "
              "while taking in)")
    written = sum(1 for _ in open(work / "spooled.jsonl", "rb"))
    print(f"\nlines in spooled.jsonl: {written}; jobs left in the spool after the run: {left}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
