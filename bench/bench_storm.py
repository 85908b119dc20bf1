"""An alert storm over MQTT into a digest route, beside the same storm into a plain file route.

    .venv/bin/python -m bench.bench_storm [--alerts 1000] [--seconds 5] [--steps 1200,2400,3600,4800]

The storm: 3 sensors × ``--alerts`` alerts in ``--seconds`` (3 × 1,000 in 5 s = 600 alerts/s),
published at QoS 1 by a separate publisher process (paho) to our own Mosquitto with its default
limits (persistence off; ``max_queued_messages`` 1000: a subscriber that falls that far behind
loses the rest, which is how an intake that cannot keep up shows). Two gateways, one after the
other, in the same run:

* ``file``   — the baseline: every alert is spooled and appended to a file (one line each).
* ``digest`` — ``digest: {key: "{{ subject }}", window: 2s}`` into the same file connector: one
  line per sensor and window, with the digest's count.

For each: alerts published (PUBACKed by the broker), received by the gateway
(``gateway_messages_received_total``), counted (file lines; the digests' counts added up),
lost (published − counted), the gateway's CPU µs per alert and the worst event-loop lag its
watchdog recorded. Then the digest route is fed faster storms (``--steps``, alerts/s) until
one loses alerts: the rate it keeps up with on this machine (target: 600/s, nothing lost).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_port

PY = sys.executable
GATEWAY = str(Path(PY).with_name("gateway"))
SENSORS = ("s1", "s2", "s3")

PUBLISHER = textwrap.dedent('''
    import json, sys, threading, time, uuid
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, prefix, per_sensor, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    sensors = sys.argv[5].split(",")
    total = per_sensor * len(sensors)
    acked, done = [0], threading.Event()
    def on_publish(*_):
        acked[0] += 1
        if acked[0] >= total:
            done.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-storm-pub-" + uuid.uuid4().hex[:6])
    c.max_inflight_messages = 1000
    c.max_queued_messages = 0
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    start = time.perf_counter()
    for i in range(total):
        delay = start + i * seconds / total - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        s = sensors[i % len(sensors)]
        c.publish(f"{prefix}/{s}/alert", json.dumps({"sensor": s, "seq": i // len(sensors), "t": 97.5}), qos=1)
    took = time.perf_counter() - start
    done.wait(60)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"published": acked[0], "seconds": took}))
''')


@dataclass
class Storm:
    variant: str
    rate: float
    published: int
    received: int
    counted: int
    cpu_us: float
    lag_ms: float

    @property
    def lost(self) -> int:
        return self.published - self.counted


def wait_port(port: int, timeout: float = 15) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=5) as r:
        return str(r.read().decode())


def received(admin: str) -> int:
    m = re.search(r'gateway_messages_received_total\{connector="plant"\} (\S+)', get(admin, "/metrics"))
    return int(float(m.group(1))) if m else 0


def lag_buckets(admin: str) -> dict[float, float]:
    """The watchdog's loop-lag histogram: bucket bound (s) -> observations up to it."""
    return {float(le): float(n) for le, n in
            re.findall(r'gateway_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', get(admin, "/metrics"))}


def worst_lag(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the smallest bucket holding every observation made between the two."""
    added = {le: n - before.get(le, 0.0) for le, n in after.items()}
    total = added.get(float("inf"), 0.0)
    return next((le for le, n in sorted(added.items()) if n >= total), float("nan"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gateway:
    def __init__(self, tmp: Path, variant: str, mqtt_port: int):
        self.variant = variant
        self.dir = tmp / variant
        self.dir.mkdir()
        self.admin = f"127.0.0.1:{free_port()}"
        self.out = self.dir / "out.jsonl"
        storm = ('    digest: {key: "{{ subject }}", window: 2s}\n'
                 '    to: [{connector: sink, format: body, body: \'{"subject": "{{ subject }}", '
                 '"count": {{ data.digest.count }}, "listed": {{ data.digest.listed }}}\'}]\n'
                 if variant == "digest" else "    to: [{connector: sink, format: body}]\n")
        cfg = self.dir / "routes.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            gateway:
              admin: {{listen: "{self.admin}"}}
              spool: {{path: "{self.dir}/spool.db", min_free_bytes: 0}}
              state_dir: "{self.dir}/state"
              log: {{level: warning}}
            connectors:
              plant: {{type: mqtt, url: "mqtt://127.0.0.1:{mqtt_port}", client_id: bench-storm-{uuid.uuid4().hex[:6]},
                       session_expiry: 60, subscribe: ["bench/+/+/alert"], qos: 1}}
              sink: {{type: file, path: "{self.out}"}}
            routes:
              - name: alerts
                from: plant
            """) + storm)
        self.proc = subprocess.Popen([GATEWAY, "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "gateway.log", "ab"))
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"http://{self.admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.proc.kill()
        raise SystemExit(f"the {variant} gateway did not become ready")

    def lines(self) -> list[dict[str, object]]:
        if not self.out.exists():
            return []
        data = self.out.read_bytes()
        return [json.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines() if x.strip()]

    def counted(self, prefix: str) -> int:
        """Alerts of the storm on ``prefix`` in the file: a line each, or a digest's count."""
        rows = self.lines()
        if self.variant == "file":  # one storm per file gateway
            return len(rows)
        return sum(int(str(r["count"])) for r in rows if str(r["subject"]).startswith(prefix + "/"))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def storm(gw: Gateway, variant: str, mqtt_port: int, per_sensor: int, seconds: float) -> Storm:
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    before, cpu0, lag0 = received(gw.admin), cpu_seconds(gw.proc.pid), lag_buckets(gw.admin)
    pub = subprocess.run([PY, "-c", PUBLISHER, str(mqtt_port), prefix, str(per_sensor), str(seconds),
                          ",".join(SENSORS)], capture_output=True, text=True, timeout=seconds + 90, check=True)
    report = json.loads(pub.stdout)
    published = int(report["published"])
    # Settled: nothing more arrives, and the digests of every window are written (2 s windows,
    # sent within a second of their end).
    last: tuple[int, int] = (-1, -1)
    still, end = time.monotonic(), time.monotonic() + 60
    while time.monotonic() < end:
        now = (received(gw.admin), gw.counted(prefix))
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still > 4:
            break
        time.sleep(0.25)
    got = received(gw.admin) - before
    cpu = cpu_seconds(gw.proc.pid) - cpu0
    rate = published / max(seconds, float(report["seconds"]))  # a publisher that fell behind is slower
    return Storm(variant, rate, published, got, gw.counted(prefix), cpu / max(1, got) * 1e6,
                 worst_lag(lag0, lag_buckets(gw.admin)) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=int, default=1000, help="alerts per sensor in the storm")
    ap.add_argument("--seconds", type=float, default=5.0, help="how long each storm lasts")
    ap.add_argument("--steps", default="1200,2400,3600,4800", help="faster storms into the digest route (alerts/s)")
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed: apt-get install -y mosquitto")
    tmp = Path(tempfile.mkdtemp(prefix="bench-storm-"))
    port = free_port()
    (tmp / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_port(port)
    results: list[Storm] = []
    try:
        for variant in ("file", "digest"):
            gw = Gateway(tmp, variant, port)
            try:
                results.append(storm(gw, variant, port, args.alerts, args.seconds))
                if variant == "digest":
                    for rate in (float(x) for x in args.steps.split(",") if x):
                        per_sensor = round(rate * args.seconds / len(SENSORS))
                        results.append(storm(gw, variant, port, per_sensor, args.seconds))
                        if results[-1].lost:
                            break
            finally:
                gw.stop()
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(SENSORS)
    print(f"\nalert storm, MQTT QoS 1 → gateway, {n} sensors, {args.seconds:g} s storms, {os.cpu_count()} cores")
    print(f"{'route':<8} {'alerts/s':>9} {'published':>10} {'received':>9} {'counted':>8} {'lost':>6} "
          f"{'CPU µs/alert':>12} {'loop lag ≤ ms':>13}")
    for r in results:
        print(f"{r.variant:<8} {r.rate:>9.0f} {r.published:>10} {r.received:>9} {r.counted:>8} {r.lost:>6} "
              f"{r.cpu_us:>12.0f} {r.lag_ms:>13.0f}")
    digest = [r for r in results if r.variant == "digest"]
    kept = [r.rate for r in digest if not r.lost]
    losing = next((r.rate for r in digest if r.lost), None)
    print(f"\ndigest route keeps up with {max(kept) if kept else 0:.0f} alerts/s"
          + (f", loses from {losing:.0f} alerts/s" if losing else " (no step lost an alert)")
          + f"; target: {args.alerts * n / args.seconds:.0f} alerts/s with nothing lost")


if __name__ == "__main__":
    main()
