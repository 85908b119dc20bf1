"""REST → file, spooled, over minutes: does delivery keep up with intake, and at what rate?

    .venv/bin/python -m bench.bench_sustained [--seconds 300] [--baseline-seconds 30] [--connections 64]
    .venv/bin/python -m bench.bench_sustained --short          # 60 s spooled, 15 s baselines

One gateway process (a child), one load generator process (``wrk``; ``apt-get install -y wrk``)
posting the same JSON body. Measured in the same run against the same process:

* the baseline, the direct route (its 202 waits for the file sink's fsync'd append), before and
  after the spooled run (the mean of the two brackets it on a shared machine);
* the spooled route for ``--seconds``: every ``--every`` seconds accepted/s, refused/s (503),
  delivered/s (lines the file sink appended) and the backlog (jobs in the spool), from the
  gateway's ``/metrics``;
* CPU µs per accepted message of the gateway and of the load generator, from ``/proc``.

The sustained accepted rate is what a client can rely on: over a long run intake cannot exceed
delivery for long (admission bounds the backlog), so it is the delivery rate. Target: ≥ 80 %
of the direct route, backlog bounded, and every line in the file once the spool drained. On a
machine shared with other work the rates swing with the neighbours' load; the ratio of CPU per
message (direct / spooled) is the steadier figure and is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

from bench.bench_rest import LUA
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` so far (and of its waited-for children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICK


def scrape(admin: str) -> dict[str, float]:
    """The counters this bench reads, summed over their labels."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"accepted": 0.0, "retry": 0.0, "delivered": 0.0, "depth": 0.0}
    for line in text.splitlines():
        m = re.match(r'(\w+)\{([^}]*)\} ([\d.e+-]+)$', line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2), float(m.group(3))
        if name == "gateway_inbound_outcomes_total" and 'outcome="accepted"' in labels:
            out["accepted"] += value
        elif name == "gateway_inbound_outcomes_total" and 'outcome="retry"' in labels:
            out["retry"] += value
        elif name == "gateway_messages_delivered_total" and 'connector="spooled-file"' in labels:
            out["delivered"] += value
        elif name == "gateway_spool_depth":
            out["depth"] += value
    return out


def accepted_spooled(m0: dict[str, float], m1: dict[str, float]) -> float:
    """Messages accepted during the spooled run (nothing else was sent then)."""
    return m1["accepted"] - m0["accepted"]


def wait_ready(admin: str, timeout: float = 60) -> None:
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


def start_wrk(url: str, seconds: int, connections: int, script: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                            stdout=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen[str]) -> tuple[float, float, float]:
    """(requests/s, non-2xx/s, CPU seconds of wrk)."""
    cpu = 0.0
    # wrk's own CPU: read just before it exits (its /proc entry goes with it)
    while proc.poll() is None:
        try:
            cpu = cpu_seconds(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.2)
    out = proc.communicate()[0]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    took = float(total.group(2)) * (0.001 if total.group(3) == "ms" else 1.0) if total else 1.0
    return rps, (float(non2xx.group(1)) / took if non2xx else 0.0), cpu


def direct_round(gw: int, base: str, seconds: int, connections: int, script: Path) -> dict[str, float]:
    cpu0 = cpu_seconds(gw)
    rps, refused, wrk_cpu = finish_wrk(start_wrk(f"{base}/direct/x", seconds, connections, script))
    gw_cpu = cpu_seconds(gw) - cpu0
    ok = max(1.0, (rps - refused) * seconds)
    return {"accepted": rps - refused, "refused": refused, "gw_us": gw_cpu / ok * 1e6, "wrk_us": wrk_cpu / ok * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=300, help="spooled run")
    ap.add_argument("--baseline-seconds", type=int, default=30, help="each direct-route run (one before, one after)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--every", type=int, default=10, help="seconds per printed sample")
    ap.add_argument("--short", action="store_true", help="60 s spooled, 15 s baselines")
    ap.add_argument("--spool-settings", default="", help="extra YAML flow-map entries for gateway.spool")
    args = ap.parse_args()
    if args.short:
        args.seconds, args.baseline_seconds, args.every = 60, 15, 5
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-sustained-"))
    script = work / "post.lua"
    script.write_text(LUA)
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    extra = f", {args.spool_settings}" if args.spool_settings else ""
    (work / "routes.yaml").write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "{admin}"}}
          spool: {{path: {work}/spool.db{extra}}}
          log: {{level: warning}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}},
                 endpoints: [{{path: "/spooled/**"}}, {{path: "/direct/**"}}]}}
          spooled-file: {{type: file, path: {work}/spooled.jsonl, max_bytes: 10GB, keep: 0}}
          direct-file: {{type: file, path: {work}/direct.jsonl, max_bytes: 10GB, keep: 0}}
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
    samples: list[tuple[float, float, float, float, float]] = []
    try:
        wait_ready(admin)
        finish_wrk(start_wrk(f"{base}/direct/warmup", 3, args.connections, script))
        before = direct_round(gw.pid, base, args.baseline_seconds, args.connections, script)
        m0, cpu0, t0 = scrape(admin), cpu_seconds(gw.pid), time.monotonic()
        load = start_wrk(f"{base}/spooled/x", args.seconds, args.connections, script)
        prev, prev_t = m0, t0
        print(f"{'t (s)':>6} {'accepted/s':>11} {'refused/s':>10} {'delivered/s':>12} {'backlog':>9}", flush=True)
        wrk_cpu = 0.0
        while load.poll() is None:
            while load.poll() is None and time.monotonic() < prev_t + args.every:
                with contextlib.suppress(OSError):  # wrk's CPU while it runs: /proc forgets it at exit
                    wrk_cpu = cpu_seconds(load.pid)
                time.sleep(0.2)
            if load.poll() is not None:
                break
            now, cur = time.monotonic(), scrape(admin)
            dt = now - prev_t
            row = (now - t0, (cur["accepted"] - prev["accepted"]) / dt, (cur["retry"] - prev["retry"]) / dt,
                   (cur["delivered"] - prev["delivered"]) / dt, cur["depth"])
            samples.append(row)
            print(f"{row[0]:>6.0f} {row[1]:>11.0f} {row[2]:>10.0f} {row[3]:>12.0f} {row[4]:>9.0f}", flush=True)
            prev, prev_t = cur, now
        load.communicate()
        m1, cpu1, t1 = scrape(admin), cpu_seconds(gw.pid), time.monotonic()
        after = direct_round(gw.pid, base, args.baseline_seconds, args.connections, script)
        drain_started = time.monotonic()
        while scrape(admin)["delivered"] - m0["delivered"] < accepted_spooled(m0, m1) \
                and time.monotonic() - drain_started < 300:
            time.sleep(0.5)
    finally:
        gw.terminate()
        gw.wait(timeout=60)
    took = t1 - t0
    accepted = accepted_spooled(m0, m1)
    refused = m1["retry"] - m0["retry"]
    delivered = m1["delivered"] - m0["delivered"]
    direct = (before["accepted"] + after["accepted"]) / 2
    steady = [s for s in samples if s[0] > took / 2]
    lines = sum(1 for _ in open(work / "spooled.jsonl", "rb")) if (work / "spooled.jsonl").exists() else 0
    print(f"\nREST → file, {args.connections} connections (wrk), one gateway process; the machine may be shared\n")
    print(f"{'run':<34} {'accepted/s':>11} {'refused/s':>10} {'delivered/s':>12} {'gw µs/msg':>10} "
          f"{'wrk µs/msg':>10}")
    for name, r in (("direct (baseline), before", before), ("direct (baseline), after", after)):
        print(f"{name:<34} {r['accepted']:>11.0f} {r['refused']:>10.0f} {r['accepted']:>12.0f} "
              f"{r['gw_us']:>10.0f} {r['wrk_us']:>10.0f}")
    print(f"{f'spooled, {took:.0f} s':<34} {accepted / took:>11.0f} {refused / took:>10.0f} "
          f"{delivered / took:>12.0f} {(cpu1 - cpu0) / max(1.0, accepted) * 1e6:>10.0f} "
          f"{wrk_cpu / max(1.0, accepted) * 1e6:>10.0f}")
    if steady:
        acc = sum(s[1] for s in steady) / len(steady)
        print(f"{'spooled, second half':<34} {acc:>11.0f} {sum(s[2] for s in steady) / len(steady):>10.0f} "
              f"{sum(s[3] for s in steady) / len(steady):>12.0f}")
        peak = max(s[4] for s in samples)
        print(f"\nbacklog: peak {peak:.0f}, second half {min(s[4] for s in steady):.0f}–"
              f"{max(s[4] for s in steady):.0f}")
        ratio = acc / direct if direct else 0.0
        print(f"sustained accepted rate (second half) / direct: {ratio:.0%} "
              f"→ target ≥ 80 %: {'met' if ratio >= 0.8 else 'NOT met'}")
    spooled_us = (cpu1 - cpu0) / max(1.0, accepted) * 1e6
    direct_us = (before["gw_us"] + after["gw_us"]) / 2
    print(f"gateway CPU per message, direct / spooled: {direct_us:.0f} / {spooled_us:.0f} µs = "
          f"{direct_us / spooled_us:.0%} (the rate ratio to expect where CPU is what runs out, as on a shared machine)")
    print(f"lines in spooled.jsonl after the drain: {lines} (accepted on the spooled route: {accepted:.0f}; "
          f"{'none' if lines >= accepted else accepted - lines} missing)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
