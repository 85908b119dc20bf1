"""What OpenTelemetry tracing costs: REST → file and MQTT → AMQP, each with tracing off, on with a
no-op exporter, and on exporting over OTLP/HTTP to a local receiver, in the same run.

    .venv/bin/python -m bench.bench_tracing [--seconds 5] [--count 5000] [--rounds 3]

Three ``gateway run`` processes per flow, one per variant, identical but for ``gateway.tracing``:

* ``off``  — tracing disabled (the default): the W3C context is still carried, no span is made.
* ``none`` — ``enabled: true, exporter: none``: every span made and batched, then discarded.
* ``otlp`` — ``enabled: true`` to a local OTLP/HTTP receiver (no OpenTelemetry Collector package
  installs here): a process of its own that decodes each protobuf request and counts the spans.
* ``otlp-10%`` — the same with ``sample_ratio: 0.1``: a tenth of the traces recorded and sent.

The variants take turns, ``--rounds`` times (interleaved, so a neighbour's load falls on all of
them alike). REST → file: ``wrk -c50`` POSTs for ``--seconds`` to a spooled route (a 202 means
fsync'd). MQTT → AMQP: a QoS 1 publisher sends ``--count`` messages as fast as the gateway takes
them (direct route, AMQP publisher confirms; bench_mqtt_amqp's traffic and consumer). msg/s and
CPU µs per message of the gateway process itself (from /proc: its export thread included) are
the medians of the rounds; "vs off" is the ratio to ``off`` in this run. ``spans`` is what the
receiver counted against what the gateway made (3 per message: inbound, route, attempt), and
``dropped`` the gateway's ``gateway_tracing_spans_dropped_total``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, cast

from bench.bench_mqtt_amqp import cpu_seconds, fresh_queue, run_mqtt_variant, stop, wait_port
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
VARIANTS = ("off", "none", "otlp", "otlp-10%")
WRK_LUA = ('wrk.method = "POST"\nwrk.body = \'{"sensor": "boiler-7", "temperature": 97.5, "site": "north"}\'\n'
           'wrk.headers["Content-Type"] = "application/json"\n')

#: The OTLP/HTTP receiver: stdlib HTTP server, opentelemetry-proto to decode; GET /count → spans.
RECEIVER = textwrap.dedent("""
    import sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest, ExportTraceServiceResponse)
    spans = 0
    lock = threading.Lock()
    OK = ExportTraceServiceResponse().SerializeToString()
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_POST(self):
            global spans
            req = ExportTraceServiceRequest()
            req.ParseFromString(self.rfile.read(int(self.headers["content-length"])))
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            with lock:
                spans += n
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(OK)))
            self.end_headers()
            self.wfile.write(OK)
        def do_GET(self):
            body = str(spans).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def turn(r: int) -> tuple[str, ...]:
    """The variants in round ``r``'s order: a different one goes first each round."""
    k = r % len(VARIANTS)
    return VARIANTS[k:] + VARIANTS[:k]


def tracing_yaml(variant: str, otlp_port: int) -> str:
    if variant == "off":
        return "tracing: {enabled: false}"
    if variant == "none":
        return "tracing: {enabled: true, exporter: none}"
    ratio = ", sample_ratio: 0.1" if variant == "otlp-10%" else ""
    return f'tracing: {{enabled: true, endpoint: "http://127.0.0.1:{otlp_port}/v1/traces"{ratio}}}'


def start(tmp: Path, name: str, variant: str, otlp_port: int, connectors: str,
          routes: str) -> tuple[subprocess.Popen[bytes], int]:
    admin = free_port()
    work = tmp / f"{name}-{variant.replace('%', '')}"
    work.mkdir()
    cfg = work / "routes.yaml"
    cfg.write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin}"}}
          spool: {{path: "{work}/spool.db", min_free_bytes: 0}}
          state_dir: "{work}/state"
          log: {{level: warning}}
          {tracing_yaml(variant, otlp_port)}
        connectors:
        """) + textwrap.indent(textwrap.dedent(connectors).strip(), "  ") + "\nroutes:\n"
        + textwrap.indent(textwrap.dedent(routes).strip(), "  ") + "\n")
    env = {**os.environ, "BENCH_AMQP_PW": "guest", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PY, "-m", "gateway.cli", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, admin
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"gateway {name}/{variant} did not become ready")


def dropped(admin: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        m = re.search(r"^gateway_tracing_spans_dropped_total (\S+)", r.read().decode(), re.MULTILINE)
    return int(float(m.group(1))) if m else 0


def received(otlp_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{otlp_port}/count", timeout=5) as r:
        return int(r.read())


def wrk(port: int, seconds: float, lua: Path) -> tuple[float, int, int]:
    out = subprocess.run(["wrk", "-t2", "-c50", f"-d{seconds:g}s", "-s", str(lua), f"http://127.0.0.1:{port}/in"],
                         capture_output=True, text=True, check=True).stdout
    rps = float(out.split("Requests/sec:")[1].split()[0])
    total = int(out.split(" requests in ")[0].split()[-1])
    non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    return rps, total, non2xx


class Row:
    def __init__(self) -> None:
        self.rates: list[float] = []
        self.cpu_us: list[float] = []
        self.messages = 0
        self.errors = 0
        self.dropped = 0
        #: Messages of the warm-up (their spans reach the receiver too).
        self.warm = 0

    def add(self, rate: float, cpu: float, messages: int, errors: int = 0) -> None:
        self.rates.append(rate)
        self.cpu_us.append(cpu / max(1, messages) * 1e6)
        self.messages += messages
        self.errors += errors


def in_process() -> dict[str, float]:
    """CPU µs the delivery's tracing hooks take for one message with one attempt, by variant
    (``off``: the W3C context handling alone), measured in this process: best of 5."""
    from gateway.config.models import TracingSettings
    from gateway.contract import Outcome, Target, TargetOptions
    from gateway.envelope import Envelope
    from gateway.metrics import Metrics
    from gateway.otel import OtelTracing
    from gateway.routing.router import CompiledRoute
    from gateway.tracing import Tracing

    class Sink:
        kind = "file"
        config = None

    env = Envelope(source="api", protocol="rest", subject="/in", body=b'{"t": 97.5}',
                   attributes={"http_method": "POST", "peer": "127.0.0.1:5555"})
    spec = Target(route="r", connector="sink", options=TargetOptions())
    route = cast(CompiledRoute, type("Route", (), {"name": "r", "mode": "spooled"}))
    out: dict[str, float] = {}
    for name, t in (("off", Tracing()),
                    ("none", OtelTracing(TracingSettings(enabled=True, exporter="none"), Metrics()))):
        def one(t: Tracing = t) -> None:
            carried, hop = t.received(env)
            t.routed(carried, route, [])
            t.attempt(carried, spec, cast(Any, Sink)).end()
            hop.finish(Outcome.accepted(carried.id))
        best = float("inf")
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(5000):
                one()
            best = min(best, (time.process_time() - t0) / 5000 * 1e6)
        out[name] = best
    return out


def rest_to_file(tmp: Path, otlp_port: int, seconds: float, rounds: int) -> dict[str, Row]:
    lua = tmp / "post.lua"
    lua.write_text(WRK_LUA)
    gws: dict[str, tuple[subprocess.Popen[bytes], int, int]] = {}
    rows = {v: Row() for v in VARIANTS}
    try:
        for v in VARIANTS:
            port = free_port()
            proc, admin = start(tmp, "rest", v, otlp_port,
                                f'api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}\n'
                                f'sink: {{type: file, path: "{tmp}/rest-{v}.jsonl"}}',
                                "- {name: events, from: api, to: [{connector: sink}]}")
            wait_port(port)
            gws[v] = (proc, admin, port)
            rows[v].warm += wrk(port, 1, lua)[1]  # warm-up
        for r in range(rounds):
            for v in turn(r):
                proc, _, port = gws[v]
                cpu0 = cpu_seconds(proc.pid)
                rps, total, non2xx = wrk(port, seconds, lua)
                rows[v].add(rps, cpu_seconds(proc.pid) - cpu0, total, non2xx)
        for v in VARIANTS:
            rows[v].dropped = dropped(gws[v][1])
    finally:
        for proc, *_ in gws.values():
            stop(proc)
    return rows


async def mqtt_to_amqp(tmp: Path, otlp_port: int, count: int, rounds: int) -> dict[str, Row]:
    mport = free_port()
    (tmp / "mosquitto.conf").write_text(f"listener {mport} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                                        "max_queued_messages 0\nmax_inflight_messages 0\nuser root\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(mport)
    gws: dict[str, tuple[subprocess.Popen[bytes], int, str, str]] = {}
    rows = {v: Row() for v in VARIANTS}
    try:
        for v in VARIANTS:
            topic, queue = f"bench/{uuid.uuid4().hex[:6]}", await fresh_queue()
            proc, admin = start(tmp, "mqtt", v, otlp_port, f"""\
                plant: {{type: mqtt, url: "mqtt://127.0.0.1:{mport}", client_id: bench-tr-{uuid.uuid4().hex[:6]},
                         session_expiry: 60, subscribe: ["{topic}"], max_inflight: 512}}
                bus: {{type: amqp, username: guest, password: "${{BENCH_AMQP_PW}}"}}""",
                f'- {{name: plant-to-bus, from: plant, mode: direct,\n'
                f'   to: [{{connector: bus, routing_key: "{queue}"}}]}}')
            gws[v] = (proc, admin, topic, queue)
            warm = await run_mqtt_variant(v, mport, topic, queue, min(1000, count), None, proc.pid)
            rows[v].warm += warm.count
        for r in range(rounds):
            for v in turn(r):
                proc, _, topic, queue = gws[v]
                res = await run_mqtt_variant(v, mport, topic, queue, count, None, proc.pid)
                rows[v].add(res.rate, res.cpu or 0.0, res.count, res.missing)
        for v in VARIANTS:
            rows[v].dropped = dropped(gws[v][1])
    finally:
        for proc, *_ in gws.values():
            stop(proc)
        broker.terminate()
        broker.wait(10)
    return rows


def report(title: str, rows: dict[str, Row], spans_otlp: int, unit: str) -> None:
    base_rate = statistics.median(rows["off"].rates)
    base_cpu = statistics.median(rows["off"].cpu_us)
    print(f"\n{title}")
    print(f"{'tracing':<8} {unit + '/s':>9} {'vs off':>7} {'CPU µs/msg':>11} {'vs off':>7} {'msgs':>8} "
          f"{'errors':>7} {'dropped':>8}  per round (msg/s | µs/msg)")
    for v, row in rows.items():
        rate, cpu = statistics.median(row.rates), statistics.median(row.cpu_us)
        rounds = ", ".join(f"{r:.0f}|{c:.0f}" for r, c in zip(row.rates, row.cpu_us, strict=True))
        print(f"{v:<8} {rate:>9.0f} {rate / base_rate:>7.2f} {cpu:>11.0f} {cpu / base_cpu:>7.2f} {row.messages:>8} "
              f"{row.errors:>7} {row.dropped:>8}  {rounds}")
    made = (rows["otlp"].messages + rows["otlp"].warm) * 3
    sampled = (rows["otlp-10%"].messages + rows["otlp-10%"].warm) * 3 // 10
    print(f"spans received by the OTLP receiver: {spans_otlp}; made: {made} by otlp, about {sampled} by otlp-10% "
          "(warm-ups included)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0, help="REST → file: wrk duration per round")
    ap.add_argument("--count", type=int, default=5000, help="MQTT → AMQP: messages per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("rest", "mqtt"))
    args = ap.parse_args()
    for tool in ("wrk", "mosquitto"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install -y {tool}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    otlp_port = free_port()
    (tmp / "receiver.py").write_text(RECEIVER)
    receiver = subprocess.Popen([PY, str(tmp / "receiver.py"), str(otlp_port)])
    wait_port(otlp_port)
    try:
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; "
              f"{args.rounds} interleaved rounds, medians")
        if args.only != "mqtt":
            before = received(otlp_port)
            cpu0 = cpu_seconds(receiver.pid)
            rest = rest_to_file(tmp, otlp_port, args.seconds, args.rounds)
            time.sleep(1.0)  # the last batch (the exporter sends every 5 s or per 512 spans, and at stop)
            report(f"REST POST → spooled → file, wrk -t2 -c50 -d{args.seconds:g}s per round", rest,
                   received(otlp_port) - before, "req")
            spans = (rest["otlp"].messages + rest["otlp"].warm) * 3
            print(f"receiver CPU: {(cpu_seconds(receiver.pid) - cpu0) / max(1, spans) * 1e6:.1f} µs/span")
        if args.only != "rest":
            before = received(otlp_port)
            mq = await mqtt_to_amqp(tmp, otlp_port, args.count, args.rounds)
            time.sleep(1.0)
            report(f"MQTT QoS 1 → direct → AMQP confirms, {args.count} messages per round at saturation", mq,
                   received(otlp_port) - before, "msg")
        hooks = in_process()
        print(f"\nthe delivery's tracing hooks in-process, one message with one attempt (CPU µs, best of 5): "
              f"off {hooks['off']:.1f} (the W3C context alone), none {hooks['none']:.1f} (3 spans made)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        receiver.terminate()
        receiver.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
