"""Hostile-input tests: a real gateway process under attack, and a probe of its event loop.

The gateway runs as a child process (``gateway run --config …``), so an attack that freezes its
event loop cannot freeze the test. While the attack runs, :class:`LoopProbe` asks ``/healthz`` on
the admin port every 50 ms from a thread and keeps the worst answer time: every protocol shares
the loop that answers it, so a slow ``/healthz`` is a stalled gateway. The gateway's own watchdog
histogram (``gateway_event_loop_lag_seconds``) says the same from the inside.

    async with HostileGateway(tmp_path, ROUTES) as gw:
        with LoopProbe(gw.admin) as probe:
            ...attack...
        probe.assert_responsive()
        assert gw.loop_lag_worst() < 0.5
        await gw.alive()
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.ports import free_port

GATEWAY = str(Path(sys.executable).with_name("gateway"))

#: The bound every hostile test asserts on /healthz while its attack runs. A healthy gateway
#: answers in about a millisecond; half a second leaves room for a slow, shared CI machine.
RESPONSIVE = 0.5


def _get(admin: str, path: str, timeout: float) -> tuple[int, bytes]:
    host, port = admin.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


class LoopProbe:
    """A thread that GETs ``/healthz`` every ``every`` seconds while the ``with`` block runs.

    ``worst`` is the longest answer (an unanswered request counts for as long as it waited);
    ``answers`` how many requests it made; ``failures`` the ones that did not answer 200.
    """

    def __init__(self, admin: str, *, every: float = 0.05, timeout: float = 30.0):
        self.admin = admin
        self.every = every
        self.timeout = timeout
        self.worst = 0.0
        self.answers = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-probe", daemon=True)

    def __enter__(self) -> LoopProbe:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, _ = _get(self.admin, "/healthz", self.timeout)
                if status != 200:
                    self.failures.append(f"/healthz answered {status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"/healthz: {type(exc).__name__}: {exc}")
            took = time.monotonic() - t0
            self.answers += 1
            self.worst = max(self.worst, took)
            self._stop.wait(self.every)

    def assert_responsive(self, bound: float = RESPONSIVE) -> None:
        assert self.answers > 0, "the probe made no request"
        assert not self.failures, f"/healthz failed during the attack: {self.failures[:3]}"
        assert self.worst < bound, (
            f"/healthz took {self.worst:.3f} s during the attack (bound {bound} s, "
            f"{self.answers} requests): the event loop was held")


class HostileGateway:
    """``gateway run`` on a config written into ``tmp_path``, as a child process.

    ``yaml_text`` is routes.yaml; without a ``gateway:`` section one is added (admin port, spool,
    state directory inside ``tmp_path``). ``env`` adds environment variables for the child.
    """

    def __init__(self, tmp_path: Path, yaml_text: str, *, env: dict[str, str] | None = None,
                 ready_timeout: float = 30.0):
        self.tmp_path = tmp_path
        self.env = env or {}
        self.ready_timeout = ready_timeout
        text = textwrap.dedent(yaml_text)
        if "gateway:" not in text:
            text = (
                "gateway:\n"
                f"  admin: {{listen: \"127.0.0.1:{free_port()}\"}}\n"
                f"  spool: {{path: \"{tmp_path / 'spool.db'}\", min_free_bytes: 0}}\n"
                f"  state_dir: \"{tmp_path / 'state'}\"\n"
                "  log: {format: json}\n"
                "  drain: 5s\n" + text
            )
        m = re.search(r"admin:\s*\{?\s*listen:\s*\"?([^\"\s,}]+)", text)
        if m is None:
            raise ValueError("the config's gateway: section needs admin: {listen: HOST:PORT}")
        self.admin: str = m.group(1)
        self.config_path = tmp_path / "routes.yaml"
        self.config_path.write_text(text)
        self.log_path = tmp_path / "gateway.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> HostileGateway:
        with open(self.log_path, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                GATEWAY, "run", "--config", str(self.config_path), stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        end = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.returncode is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = await asyncio.to_thread(_get, self.admin, "/readyz", 1.0)
                if status == 200:
                    return self
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > end:
                raise AssertionError(f"gateway not ready after {self.ready_timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def alive(self) -> None:
        """The process runs and ``/healthz`` answers 200 within the responsive bound."""
        assert self.proc is not None and self.proc.returncode is None, (
            f"the gateway exited ({self.proc.returncode if self.proc else None}):\n{self.tail()}")
        t0 = time.monotonic()
        status, _ = await asyncio.to_thread(_get, self.admin, "/healthz", 10.0)
        took = time.monotonic() - t0
        assert status == 200, f"/healthz answered {status}"
        assert took < RESPONSIVE, f"/healthz took {took:.3f} s after the attack"

    def metrics(self) -> str:
        status, body = _get(self.admin, "/metrics", 10.0)
        assert status == 200, f"/metrics answered {status}"
        return body.decode()

    def loop_lag_worst(self) -> float:
        """The worst loop lag the gateway's watchdog recorded, as the upper bound of the smallest
        histogram bucket that holds every observation (``inf`` if one went past the last bucket)."""
        end = time.monotonic() + 2.0
        while True:  # the watchdog observes ten times a second: a quick test may ask before the first
            buckets: list[tuple[float, float]] = []
            count = 0.0
            for line in self.metrics().splitlines():
                m = re.match(r'gateway_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
                if m:
                    buckets.append((float(m.group(1)), float(m.group(2))))
                m = re.match(r"gateway_event_loop_lag_seconds_count (\S+)", line)
                if m:
                    count = float(m.group(1))
            if count > 0 or time.monotonic() > end:
                break
            time.sleep(0.05)
        assert buckets and count > 0, "the gateway exported no gateway_event_loop_lag_seconds observation"
        for le, n in sorted(buckets):
            if n >= count:
                return le
        return float("inf")

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue  # a line being written
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
