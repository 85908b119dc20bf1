"""Run the gateway as a separate process (``gateway.runtime.serve``) so a test can SIGKILL it.

Connector kinds whose entry points are not installed are passed as ``module:Class`` and put in
the process's registry. The process writes JSON logs to ``log_path``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_SCRIPT = """
import asyncio, importlib, json, sys
from gateway import logs
from gateway.registry import Registry
from gateway.runtime import serve
kinds = {}
for kind, ref in json.loads(sys.argv[2]).items():
    module, _, cls = ref.partition(":")
    kinds[kind] = getattr(importlib.import_module(module), cls)
logs.setup("info", "json")
sys.exit(asyncio.run(serve(sys.argv[1], Registry(kinds))))
"""

REPO = Path(__file__).resolve().parents[2]


class GatewayProcess:
    def __init__(self, config: Path, admin_port: int, kinds: dict[str, str], log_path: Path) -> None:
        self.config = config
        self.admin_port = admin_port
        self.kinds = kinds
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout: float = 20.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(self.config), json.dumps(self.kinds)],
                                     cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        log.close()
        end = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > end:
                raise AssertionError(f"gateway not ready within {ready_timeout}s: {self.log_tail()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL by PID: no drain, no clean close — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the drained exit; returns the exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(f"gateway did not exit within {timeout}s of SIGTERM") from None
        self.proc = None
        return code

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == name:
                out.append(rec)
        return out
