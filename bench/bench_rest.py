"""REST in → file out through the gateway, beside a bare FastAPI endpoint that answers 202.

    .venv/bin/python -m bench.bench_rest [--seconds 10] [--connections 64]

Both servers run as their own process on uvicorn with uvloop + httptools, one worker, and are
loaded by `wrk` (Debian package) with the same JSON POST in the same run. The gateway's route
is spooled: every 202 means "fsync'd in the spool", then the file sink appends and fsyncs the
line. Target: the gateway reaches at least 60 % of the bare endpoint's requests/s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent

BARE_APP = textwrap.dedent("""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    app = FastAPI()
    @app.post("/events/{name}")
    async def accept(name: str, request: Request):
        await request.body()
        return JSONResponse({"id": "x", "status": "accepted"}, status_code=202)
""")

LUA = textwrap.dedent("""
    wrk.method = "POST"
    wrk.body = '{"sensor": "boiler-7", "temperature": 97.5, "site": "north", "severity": "critical"}'
    wrk.headers["Content-Type"] = "application/json"
""")


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def wrk(url: str, seconds: int, connections: int, script: Path) -> tuple[float, str]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+(\S+)", out)
    note = f"p99 {p99.group(1) if p99 else '?'}" + (f", {non2xx.group(1)} non-2xx" if non2xx else "")
    return rps, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="bench-rest-"))
    script = work / "post.lua"
    script.write_text(LUA)
    (work / "bare.py").write_text(BARE_APP)
    gw_port, admin_port, bare_port = free_port(), free_port(), free_port()
    (work / "routes.yaml").write_text(textwrap.dedent(f"""
        gateway:
          admin: {{listen: "127.0.0.1:{admin_port}"}}
          spool: {{path: {work}/spool.db}}
          log: {{level: warning}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{gw_port}", auth: {{type: none}}}}
          sink: {{type: file, path: {work}/out.jsonl}}
        routes:
          - name: events
            from: api
            to: [{{connector: sink}}]
    """))
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    bare = subprocess.Popen([py, "-m", "uvicorn", "bare:app", "--port", str(bare_port), "--loop", "uvloop",
                             "--http", "httptools", "--log-level", "warning", "--no-access-log"], cwd=work, env=env)
    gw = subprocess.Popen([py, "-m", "gateway.cli", "run", "--config", str(work / "routes.yaml")], cwd=work, env=env,
                          stderr=subprocess.DEVNULL)
    try:
        wait_port(bare_port)
        wait_port(gw_port)
        wrk(f"http://127.0.0.1:{bare_port}/events/warmup", 2, args.connections, script)
        wrk(f"http://127.0.0.1:{gw_port}/events/warmup", 2, args.connections, script)
        results["bare FastAPI endpoint (202)"] = wrk(f"http://127.0.0.1:{bare_port}/events/x", args.seconds,
                                                      args.connections, script)
        results["gateway REST → spool → file"] = wrk(f"http://127.0.0.1:{gw_port}/events/x", args.seconds,
                                                     args.connections, script)
    finally:
        for p in (bare, gw):
            p.terminate()
            p.wait(timeout=30)
    base = results["bare FastAPI endpoint (202)"][0]
    print(f"{'server':<32} {'req/s':>10} {'of bare':>8}  notes")
    for name, (rps, note) in results.items():
        print(f"{name:<32} {rps:>10.0f} {rps / base:>8.0%}  {note}")
    lines = sum(1 for _ in open(work / "out.jsonl", "rb"))
    print(f"lines written by the file sink: {lines}")
    ratio = results["gateway REST → spool → file"][0] / base
    print(f"target: ≥ 60 % of the bare endpoint → {'met' if ratio >= 0.6 else 'NOT met'} ({ratio:.0%})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
