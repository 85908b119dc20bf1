"""REST → SOAP request/reply through the gateway, beside zeep calling the SOAP service directly.

    .venv/bin/python -m bench.bench_soap [--requests 1000] [--concurrency 16]

The legacy SOAP service (tests/legacy: spyne behind uvicorn) and the gateway (`gateway run`) each
run as their own process on 127.0.0.1. In the same run, two clients call Calculator.Add:

* baseline — zeep's AsyncClient (httpx) posting SOAP straight to the service;
* gateway  — httpx posting JSON to the gateway's REST endpoint; a request/reply route calls the
             service through the soap connector and answers JSON;
* façade   — httpx posting JSON to the REST façade the soap connector generates from the WSDL
             (checked against the XSD before routing), the same route shape behind it.

Both are measured at the given concurrency (calls/s, p50, p99) and one call at a time (p50, p99:
the latency the gateway adds). Every answer is checked; a wrong one aborts the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_http(url: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


async def measure(call: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = iter(range(requests))

    async def worker() -> None:
        for i in queue:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started), latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


async def run(args: argparse.Namespace, legacy_url: str, gateway_url: str, facade_url: str) -> None:
    import zeep
    from zeep.proxy import AsyncServiceProxy
    from zeep.transports import AsyncTransport

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http, \
            httpx.AsyncClient(limits=limits, timeout=30) as soap_http:
        transport = AsyncTransport(client=soap_http, wsdl_client=httpx.Client())
        client = zeep.AsyncClient(str(ROOT / "deploy" / "examples" / "calculator.wsdl"), transport=transport)
        binding = client.wsdl.bindings["{http://example.com/calculator}CalculatorSoap11"]
        service = AsyncServiceProxy(client, binding, address=f"{legacy_url}/calculator/soap11")

        async def direct(i: int) -> None:
            if await service.Add(i, 1) != i + 1:
                raise SystemExit("wrong answer from the service")

        async def through_gateway(i: int) -> None:
            r = await http.post(f"{gateway_url}/call/Add", json={"a": i, "b": 1})
            if r.status_code != 200 or r.json() != {"result": i + 1}:
                raise SystemExit(f"wrong answer from the gateway: {r.status_code} {r.text[:200]}")

        async def through_facade(i: int) -> None:
            r = await http.post(f"{facade_url}/api/calc/Add", json={"a": i, "b": 1})
            if r.status_code != 200 or r.json() != {"result": i + 1}:
                raise SystemExit(f"wrong answer from the façade: {r.status_code} {r.text[:200]}")

        for fn in (direct, through_gateway, through_facade):  # warm up connections and caches
            await measure(fn, 100, 4)
        rows = []
        for label, fn in (("zeep → SOAP service (baseline)", direct), ("REST → gateway → SOAP", through_gateway),
                          ("REST façade → gateway → SOAP", through_facade)):
            rps, lat = await measure(fn, args.requests, args.concurrency)
            _, seq = await measure(fn, args.sequential, 1)
            rows.append((label, rps, pct(lat, 50), pct(lat, 99), pct(seq, 50), pct(seq, 99)))
    print(f"\n{args.requests} calls at concurrency {args.concurrency}; {args.sequential} calls one at a time "
          f"(Calculator.Add, SOAP 1.1)\n")
    print(f"{'':34} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} │ {'1-at-a-time p50':>16} {'p99':>7}")
    for label, rps, p50, p99, s50, s99 in rows:
        print(f"{label:34} {rps:9.0f} {p50:8.2f} {p99:8.2f} │ {s50:16.2f} {s99:7.2f}")
    base, gw, facade = rows
    print(f"\ngateway / baseline throughput: {gw[1] / base[1]:.0%}; latency added one at a time: "
          f"p50 {gw[4] - base[4]:+.2f} ms, p99 {gw[5] - base[5]:+.2f} ms")
    print(f"façade / baseline throughput: {facade[1] / base[1]:.0%}; latency added at concurrency "
          f"{args.concurrency}: p50 {facade[2] - base[2]:+.2f} ms, p99 {facade[3] - base[3]:+.2f} ms; one at a "
          f"time: p50 {facade[4] - base[4]:+.2f} ms, p99 {facade[5] - base[5]:+.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=200)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soap-"))
    legacy_port, gw_port, admin_port, facade_port = free_port(), free_port(), free_port(), free_port()
    legacy_url, gateway_url = f"http://127.0.0.1:{legacy_port}", f"http://127.0.0.1:{gw_port}"
    facade_url = f"http://127.0.0.1:{facade_port}"
    (work / "routes.yaml").write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin_port}"}}
          spool: {{path: "{work}/spool.db"}}
          state_dir: "{work}/state"
          log: {{level: warning}}
        connectors:
          api:
            type: rest
            listen: "127.0.0.1:{gw_port}"
            auth: {{type: none}}
            endpoints: [{{path: "/call/*", methods: [POST]}}]
          calc:
            type: soap
            wsdl: {ROOT / "deploy" / "examples" / "calculator.wsdl"}
            endpoint: "{legacy_url}/calculator/soap11"
          calc-facade:
            type: soap
            wsdl: {ROOT / "deploy" / "examples" / "calculator.wsdl"}
            endpoint: "{legacy_url}/calculator/soap11"
            rest_facade: {{listen: "127.0.0.1:{facade_port}", prefix: /api/calc, auth: {{type: none}}}}
        routes:
          - name: rest-to-soap
            from: api
            to: [{{connector: calc, operation: "{{{{ subject.rsplit('/', 1)[1] }}}}", reply: true}}]
          - name: facade-to-soap
            from: calc-facade
            to: [{{connector: calc-facade, operation: "{{{{ subject }}}}", reply: true}}]
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.legacy", str(legacy_port)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL),
        subprocess.Popen([str(Path(sys.executable).parent / "gateway"), "run", "-c", str(work / "routes.yaml")],
                         cwd=work, env=env, stderr=subprocess.DEVNULL),
    ]
    try:
        wait_http(f"{legacy_url}/calculator/soap11?wsdl")
        wait_http(f"http://127.0.0.1:{admin_port}/healthz")
        asyncio.run(run(args, legacy_url, gateway_url, facade_url))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
