"""One worker against two (``gateway run --workers``), same run, rounds interleaved.

    .venv/bin/python -m bench.bench_workers [--seconds 10] [--rounds 3] [--connections 64] [--pin-load CPU]

Two scenarios, each with a 1-worker and a 2-worker gateway running side by side (idle while the
other is loaded):

* REST → file, spooled (the default mode): a 202 means "fsync'd in the spool"; the file sink then
  appends. Besides what was accepted, it prints what the sink wrote during each round (delivery
  can trail intake: the difference is the spool's backlog growing).
* REST → MQTT QoS 1, direct: a 202 comes after the broker's PUBACK (Mosquitto on 127.0.0.1:1883).

The load generator is ``wrk`` in its own process (``apt-get install -y wrk``); ``--pin-load CPU``
pins it to one core (``taskset``), which leaves the gateway the other(s). Each row gives the
accepted requests/s (2xx only), the p99, and the CPU µs per accepted request of the gateway (the
parent and every worker, from /proc) and of wrk. "ceiling" is what that CPU cost would allow on
as many free cores as the gateway has workers (1e6 / µs × workers): what a machine with a core to
spare per worker (4 cores for 2 workers and the load generator) would approach.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench.bench_rest import LUA, wait_port
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = str(Path(sys.executable).with_name("gateway"))

def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers), from /proc."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Run:
    accepted_rps: float
    p99: str
    gw_us: float
    wrk_us: float
    #: Lines the file sink wrote per second during the round (spooled: delivery, not intake).
    delivered_rps: float | None = None


def lines(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def load(url: str, seconds: int, connections: int, script: Path, gw_pid: int, pin: str | None,
         sink: Path | None = None) -> Run:
    cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    before_lines = lines(sink)
    before_gw = tree_cpu(gw_pid)
    before_children = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after_children = os.times()
    gw_cpu = tree_cpu(gw_pid) - before_gw
    wrk_cpu = (after_children.children_user + after_children.children_system
               - before_children.children_user - before_children.children_system)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx_m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    accepted = total - (int(non2xx_m.group(1)) if non2xx_m else 0)
    p99 = re.search(r"99%\s+(\S+)", out)
    delivered = (lines(sink) - before_lines) / seconds if sink is not None else None
    return Run(accepted / seconds, p99.group(1) if p99 else "?", gw_cpu * 1e6 / max(accepted, 1),
               wrk_cpu * 1e6 / max(total, 1), delivered)


def config(work: Path, name: str, scenario: str, workers: int) -> tuple[Path, int]:
    port, admin = free_port(), free_port()
    if scenario == "file":
        out = f"sink: {{type: file, path: {work}/{name}.jsonl}}"
        route = ["to: [{connector: sink}]"]
    else:
        out = (f"sink: {{type: mqtt, url: \"mqtt://127.0.0.1:1883\", client_id: bench-w-{uuid.uuid4().hex[:6]}, "
               "max_inflight: 1000}")
        route = ["mode: direct", "to: [{connector: sink, topic: bench/workers, qos: 1}]"]
    path = work / f"{name}.yaml"
    lines = ["gateway:", f'  admin: {{listen: "127.0.0.1:{admin}"}}',
             f"  spool: {{path: {work}/{name}-spool.db, min_free_bytes: 0}}", f"  state_dir: {work}/{name}-state",
             "  log: {level: warning}", f"  workers: {workers}", "connectors:",
             f'  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}', f"  {out}",
             "routes:", "  - name: events", "    from: api", *(f"    {r}" for r in route)]
    path.write_text("\n".join(lines) + "\n")
    return path, port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--pin-load", default=None, help="run wrk on this CPU only (taskset -c)")
    ap.add_argument("--scenarios", default="file,mqtt")
    ap.add_argument("--dir", default=None, help="where the spools and sink files go (default: a temporary "
                    "directory; /dev/shm takes the disk's fsync out of the comparison)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-workers-", dir=args.dir))
    script = work / "post.lua"
    script.write_text(LUA)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"cores usable: {len(os.sched_getaffinity(0))}, wrk pinned to: {args.pin_load or 'no'}, files in {work}, "
          f"{args.rounds} rounds of {args.seconds}s, {args.connections} connections")
    verdicts = []
    for scenario in args.scenarios.split(","):
        procs: dict[int, tuple[subprocess.Popen[bytes], int]] = {}
        try:
            for n in (1, 2):
                path, port = config(work, f"{scenario}-{n}", scenario, n)
                proc = subprocess.Popen([GATEWAY, "run", "--config", str(path)], cwd=work, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs[n] = (proc, port)
            for _proc, port in procs.values():
                wait_port(port)
            time.sleep(2)  # every worker listening
            for proc, port in procs.values():
                load(f"http://127.0.0.1:{port}/events/warmup", 2, args.connections, script, proc.pid, args.pin_load)
            runs: dict[int, list[Run]] = {1: [], 2: []}
            for _ in range(args.rounds):
                for n, (proc, port) in procs.items():
                    sink = work / f"file-{n}.jsonl" if scenario == "file" else None
                    runs[n].append(load(f"http://127.0.0.1:{port}/events/x", args.seconds, args.connections, script,
                                        proc.pid, args.pin_load, sink))
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(timeout=60)
        title = {"file": "REST → file (spooled)", "mqtt": "REST → MQTT QoS 1 (direct)"}[scenario]
        print(f"\n{title}")
        print(f"{'workers':<8} {'accepted/s per round':<28} {'median':>8} {'p99 (last)':>11} {'gw µs/req':>10} "
              f"{'wrk µs/req':>10} {'ceiling/s':>10}")
        med = {}
        for n, rs in runs.items():
            med[n] = statistics.median(r.accepted_rps for r in rs)
            us = statistics.median(r.gw_us for r in rs)
            print(f"{n:<8} {' / '.join(f'{r.accepted_rps:,.0f}' for r in rs):<28} {med[n]:>8,.0f} {rs[-1].p99:>11} "
                  f"{us:>10.0f} {statistics.median(r.wrk_us for r in rs):>10.0f} {1e6 / us * n:>10,.0f}")
        if scenario == "file":
            for n, rs in runs.items():
                print(f"  {n} worker(s): the file sink wrote {' / '.join(f'{r.delivered_rps:,.0f}' for r in rs)} "
                      "lines/s during the rounds (delivery, beside the intake above)")
        ratio = med[2] / med[1]
        verdicts.append(f"{title}: 2 workers = {ratio:.2f}× one worker (target ≥ 1.6×: "
                        f"{'met' if ratio >= 1.6 else 'NOT met'})")
    print()
    for v in verdicts:
        print(v)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
