"""A 10,000-route config beside a 10-route one (the baseline), same run: validate, start, serve,
reload under load.

    .venv/bin/python -m bench.bench_bigconfig [--rounds 3] [--reloads 20]

For each size (rounds interleaved: 10, 10,000, 10, 10,000, ...) a config from
:mod:`bench.bigconfig` is

1. validated in a fresh process (``load_config``: what ``gateway validate`` does), wall and CPU;
2. run by ``gateway run``: the time from the spawn to ``/readyz`` 200, the CPU used by then and
   the RSS; then REST requests that match a route (4 in flight, one route picked at random per
   request) for the p99 of the first 200 answers after ready, and of a steady phase;
3. reloaded ``--reloads`` times under that load, each reload a new version of every route
   (SIGHUP, then wait for ``gateway_config_reloads_total{outcome="applied"}``): the reload time,
   the worst loop lag the gateway's watchdog recorded meanwhile (the upper bound of its histogram
   bucket), the worst and p99 answer time meanwhile, the RSS (now and the peak) after them, and
   the gateway's CPU µs per request over the whole run from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.bigconfig import big_config
from tests.ports import free_port

GATEWAY = str(Path(sys.executable).with_name("gateway"))
TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    validate_s: float = 0.0
    validate_cpu_s: float = 0.0
    ready_s: float = 0.0
    ready_cpu_s: float = 0.0
    rss_ready_mib: float = 0.0
    first_p99_ms: float = 0.0
    steady_p99_ms: float = 0.0
    reload_s: list[float] = field(default_factory=list)
    reload_lag_s: float = 0.0
    reload_worst_ms: float = 0.0
    reload_p99_ms: float = 0.0
    rss_after_mib: float = 0.0
    rss_peak_mib: float = 0.0
    cpu_us_per_req: float = 0.0


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _lag_buckets(metrics: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'gateway_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics):
        out[float(m.group(1))] = float(m.group(2))
    return out


def worst_lag(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the smallest bucket holding every observation made between the two."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    for le in sorted(after):
        if after[le] - before.get(le, 0.0) >= total:
            return le
    return float("inf")


def _applied(metrics: str) -> float:
    m = re.search(r'gateway_config_reloads_total\{outcome="applied"\} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


def write_atomically(path: Path, text: str) -> None:
    """As an editor saves: the file watcher never sees it half written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def validate(path: Path) -> tuple[float, float]:
    code = ("import json, sys, time\nfrom gateway.config.loader import load_config\n"
            "w, c = time.perf_counter(), time.process_time()\nload_config(sys.argv[1])\n"
            "print(json.dumps([time.perf_counter() - w, time.process_time() - c]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    wall, cpu = json.loads(out.stdout)
    return wall, cpu


class Load:
    """REST requests that each match a route, ``concurrency`` in flight; answer times per phase."""

    def __init__(self, api: str, routes: int, concurrency: int = 4):
        self.url = f"http://{api}"
        self.shape0 = list(range(0, routes, 4))  # the routes taking /sites/<site>/<device>/<x>
        self.concurrency = concurrency
        self.times: list[float] = []
        self.requests = 0
        self.errors = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(self._one(http) for _ in range(self.concurrency)))

    async def _one(self, http: aiohttp.ClientSession) -> None:
        while not self._stop.is_set():
            i = random.choice(self.shape0)
            path = f"/sites/s{i // 20:04d}/d{i % 20:02d}/reading"
            started = time.perf_counter()
            try:
                async with http.post(self.url + path, json={"t": 99}) as r:
                    await r.read()
                    ok = r.status < 300
            except aiohttp.ClientError:
                ok = False
            self.times.append(time.perf_counter() - started)
            self.requests += 1
            self.errors += not ok

    def take(self) -> list[float]:
        times, self.times = self.times, []
        return times

    def stop(self) -> None:
        self._stop.set()


def p99(times: list[float]) -> float:
    return statistics.quantiles(times, n=100)[98] * 1000 if len(times) >= 2 else float("nan")


async def run_one(n: int, reloads: int, tmp: Path) -> Result:
    res = Result()
    api, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    var = tmp / f"var-{n}"
    var.mkdir(exist_ok=True)
    path = tmp / f"routes-{n}.yaml"
    path.write_text(big_config(n, api=api, admin=admin, var=str(var)))
    res.validate_s, res.validate_cpu_s = await asyncio.to_thread(validate, path)

    async def get(http: aiohttp.ClientSession, what: str) -> tuple[int, str]:
        async with http.get(f"http://{admin}{what}") as r:
            return r.status, await r.text()

    started = time.monotonic()
    with open(tmp / f"gateway-{n}.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(GATEWAY, "run", "--config", str(path), stdout=log,
                                                    stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"gateway exited with {proc.returncode}")
                try:
                    if (await get(http, "/readyz"))[0] == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.01)
            res.ready_s = time.monotonic() - started
            res.ready_cpu_s = _cpu(proc.pid)
            res.rss_ready_mib = _status_mib(proc.pid, "VmRSS")
            load = Load(api, n)
            cpu0 = _cpu(proc.pid)
            runner = asyncio.create_task(load.run())
            while len(load.times) < 200:
                await asyncio.sleep(0.01)
            res.first_p99_ms = p99(load.take()[:200])
            await asyncio.sleep(3)
            res.steady_p99_ms = p99(load.take())
            before = _lag_buckets((await get(http, "/metrics"))[1])
            during: list[float] = []
            for k in range(1, reloads + 1):
                write_atomically(path, big_config(n, api=api, admin=admin, var=str(var), tag=f"v{k}"))
                applied = _applied((await get(http, "/metrics"))[1])
                t0 = time.monotonic()
                proc.send_signal(signal.SIGHUP)
                while _applied((await get(http, "/metrics"))[1]) <= applied:
                    await asyncio.sleep(0.02)
                res.reload_s.append(time.monotonic() - t0)
                await asyncio.sleep(0.5)  # the old config goes away meanwhile
                during += load.take()
            after = _lag_buckets((await get(http, "/metrics"))[1])
            load.stop()
            await runner
            res.cpu_us_per_req = (_cpu(proc.pid) - cpu0) / max(load.requests, 1) * 1e6
            res.reload_lag_s = worst_lag(before, after)
            res.reload_worst_ms = max(during) * 1000
            res.reload_p99_ms = p99(during)
            res.rss_after_mib = _status_mib(proc.pid, "VmRSS")
            res.rss_peak_mib = _status_mib(proc.pid, "VmHWM")
            if load.errors:
                print(f"  ({n} routes: {load.errors} of {load.requests} requests failed)")
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
    return res


def median(results: list[Result], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reloads", type=int, default=20)
    ap.add_argument("--routes", type=int, default=10_000)
    args = ap.parse_args()
    sizes = (10, args.routes)
    results: dict[int, list[Result]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.rounds):
            for n in sizes:
                results[n].append(await run_one(n, args.reloads, Path(d)))
    rows = [
        ("validate (fresh process), s", "validate_s", "{:.2f}"),
        ("  its CPU, s", "validate_cpu_s", "{:.2f}"),
        ("spawn to /readyz 200, s", "ready_s", "{:.2f}"),
        ("  CPU used by then, s", "ready_cpu_s", "{:.2f}"),
        ("RSS at ready, MiB", "rss_ready_mib", "{:.0f}"),
        ("p99 of the first 200 requests, ms", "first_p99_ms", "{:.1f}"),
        ("p99 steady (3 s), ms", "steady_p99_ms", "{:.1f}"),
        (f"worst loop lag over {args.reloads} reloads, s (≤ bucket)", "reload_lag_s", "{:g}"),
        ("worst request during reloads, ms", "reload_worst_ms", "{:.0f}"),
        ("p99 request during reloads, ms", "reload_p99_ms", "{:.1f}"),
        ("RSS after the reloads, MiB", "rss_after_mib", "{:.0f}"),
        ("RSS peak, MiB", "rss_peak_mib", "{:.0f}"),
        ("gateway CPU per request (whole run), µs", "cpu_us_per_req", "{:.0f}"),
    ]
    print(f"median of {args.rounds} interleaved rounds    {sizes[0]:>10} routes (baseline) {sizes[1]:>10} routes")
    for label, attr, fmt in rows:
        a, b = median(results[sizes[0]], attr), median(results[sizes[1]], attr)
        print(f"  {label:<48} {fmt.format(a):>16}  {fmt.format(b):>16}")
    for n in sizes:
        times = [t for r in results[n] for t in r.reload_s]
        print(f"  reload time, {n} routes: median {statistics.median(times):.2f} s, worst {max(times):.2f} s "
              f"({len(times)} reloads)")


if __name__ == "__main__":
    asyncio.run(main())
