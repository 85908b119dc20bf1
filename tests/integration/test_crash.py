"""The crash test, in the style of Jepsen's RabbitMQ checks.

A real gateway process (``gateway run``) takes sequence-numbered messages from concurrent
clients, spools them, and delivers them to an HTTP sink that fails and recovers on a schedule.
Meanwhile the gateway is ``kill -9``-ed at random moments and restarted. At the end every
message is classified:

* **lost** — the gateway acknowledged it (HTTP 202, PUBACK, 250…) and the sink never got it;
* **duplicated** — the sink got it more than once (allowed: delivery is at-least-once);
* **unexpected** — the sink got something no client ever sent;
* **recovered** — not acknowledged (the client saw the crash) but delivered anyway.

Pass means lost = 0 and unexpected = 0; duplicates are printed.

Adding a protocol: subclass :class:`Sender` — its inbound connector and route YAML (the route
must send to the ``sink`` connector with a JSON body ``{"id": "<sender>:<seq>"}``) and
``send(seq)``, which returns True only when the gateway acknowledged — then run
``CrashRun(tmp_path, [RestSender(), YourSender()], ...)``. The seed is printed;
``CRASH_SEED=<n>`` replays a run's schedule.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.faultproxy import HttpSink
from tests.gwtest import free_port

pytestmark = pytest.mark.integration

GATEWAY = str(Path(sys.executable).with_name("gateway"))
#: How fast spooled jobs are retried against the failing sink.
RETRY = "on_failure: {retry: {attempts: 1000, initial: 0.05, max: 0.5, max_age: 1h}}"


class Sender:
    """One inbound protocol driven by the crash test's clients."""

    name = "base"

    def connectors_yaml(self) -> str:
        """Entries under ``connectors:`` (two-space indent) for this sender's inbound side."""
        raise NotImplementedError

    def routes_yaml(self) -> str:
        """Entries under ``routes:``: from this sender's connector to ``sink``, body ``{"id": "<name>:<seq>"}``."""
        raise NotImplementedError

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, seq: int) -> bool:
        """Send message ``seq``; True only when the gateway acknowledged it."""
        raise NotImplementedError


class RestSender(Sender):
    def __init__(self, name: str = "rest") -> None:
        self.name = name
        self.port = free_port()
        self._session: aiohttp.ClientSession | None = None

    def connectors_yaml(self) -> str:
        return (f'  in-rest: {{type: rest, listen: "127.0.0.1:{self.port}", auth: {{type: none}},'
                f' endpoints: [{{path: "/in/**", methods: [POST]}}]}}\n')

    def routes_yaml(self) -> str:
        return f"""  - name: rest-to-sink
    from: in-rest
    to: [{{connector: sink, path: /sink}}]
    {RETRY}
"""

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, seq: int) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(f"http://127.0.0.1:{self.port}/in/{seq}",
                                          json={"id": f"{self.name}:{seq}"}) as r:
                await r.read()
                return r.status == 202
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False  # connection refused or reset: the gateway is down or died mid-request


class GatewayProcess:
    """``gateway run --config …`` as a child process, its output appended to a log file."""

    def __init__(self, config: Path, admin: str, log: Path, command: list[str] | None = None):
        self.config = config
        self.admin = admin
        self.log = log
        self.command = command or [GATEWAY, "run", "--config", str(config)]
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while await self.ready_status() != 200:
            if self.proc.returncode is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.tail()}")
            if loop.time() > end:
                raise AssertionError(f"gateway not ready after {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def ready_status(self) -> int | None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s, \
                    s.get(f"http://{self.admin}/readyz") as r:
                return r.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"gateway did not exit within {timeout}s:\n{self.tail()}") from None

    async def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def gateway_yaml(tmp_path: Path, admin: str, sink: HttpSink, senders: list[Sender], drain: str = "2s") -> str:
    connectors = "".join(s.connectors_yaml() for s in senders)
    routes = "".join(s.routes_yaml() for s in senders)
    return textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "{admin}"}}
          spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
          state_dir: "{tmp_path / 'state'}"
          drain: {drain}
          log: {{level: info, format: json}}
        """) + f"""connectors:
  sink: {{type: rest, base_url: "{sink.url}", timeout: 2s}}
{connectors}routes:
{routes}"""


def spool_depth(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


@dataclass
class Report:
    acknowledged: int
    unacknowledged: int
    delivered: int
    lost: list[str]
    duplicated: int
    unexpected: list[str]
    recovered: int
    kills: int
    backlog_at_kills: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"acknowledged {self.acknowledged}, unacknowledged {self.unacknowledged}, delivered {self.delivered},"
                f" lost {len(self.lost)}, duplicated {self.duplicated}, unexpected {len(self.unexpected)},"
                f" recovered {self.recovered}; kill -9 x{self.kills}, spool backlog at each kill"
                f" {self.backlog_at_kills}")


class CrashRun:
    def __init__(self, tmp_path: Path, senders: list[Sender], sink: HttpSink, *, kills: int = 4,
                 clients: int = 6, seed: int | None = None):
        self.tmp_path = tmp_path
        self.senders = senders
        self.sink = sink
        self.kills = kills
        self.clients = clients
        self.seed = int(os.environ.get("CRASH_SEED", seed if seed is not None else random.randrange(1 << 30)))
        self.rng = random.Random(self.seed)
        admin = f"127.0.0.1:{free_port()}"
        config = tmp_path / "routes.yaml"
        config.write_text(gateway_yaml(tmp_path, admin, sink, senders))
        self.gateway = GatewayProcess(config, admin, tmp_path / "gateway.log")
        self.attempted: set[str] = set()
        self.acked: set[str] = set()
        self.backlog: list[int] = []

    async def run(self) -> Report:
        print(f"\ncrash test seed {self.seed} (CRASH_SEED={self.seed} replays it)")
        for s in self.senders:
            await s.open()
        try:
            await self.gateway.start()
            stop = asyncio.Event()
            clients = [asyncio.ensure_future(self._client(s, i, stop)) for s in self.senders
                       for i in range(self.clients)]
            await self._chaos()
            stop.set()
            await asyncio.gather(*clients)
            self.sink.status = 200
            await self._settle()
            assert await self.gateway.terminate() == 0, self.gateway.tail()
        finally:
            await self.gateway.ensure_stopped()
            for s in self.senders:
                await s.close()
        return self._reconcile()

    async def _client(self, sender: Sender, index: int, stop: asyncio.Event) -> None:
        """Like a real client: send the next number, and retry it until it is acknowledged."""
        for n in range(1_000_000):
            if stop.is_set():
                return
            seq = n * self.clients + index
            ident = f"{sender.name}:{seq}"
            self.attempted.add(ident)
            for _ in range(10_000):
                if await sender.send(seq):
                    self.acked.add(ident)
                    break
                if stop.is_set():
                    return
                await asyncio.sleep(0.02)

    async def _chaos(self) -> None:
        """The sink fails and recovers; the gateway is killed at random moments, some of them
        while a backlog waits for the failing sink."""
        for k in range(self.kills):
            failing = k % 2 == 0
            self.sink.status = 503 if failing else 200
            await asyncio.sleep(self.rng.uniform(0.6, 2.0))
            await self.gateway.kill9()
            self.backlog.append(spool_depth(self.tmp_path / "spool.db"))
            if failing and self.rng.random() < 0.5:
                self.sink.status = 200  # the peer recovers while the gateway is down
            await asyncio.sleep(self.rng.uniform(0.05, 0.5))
            await self.gateway.start()
        self.sink.status = 200
        await asyncio.sleep(self.rng.uniform(0.5, 1.5))

    async def _settle(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not all(self.sink.got(i) for i in self.acked) and loop.time() < end:
            await asyncio.sleep(0.1)

    def _reconcile(self) -> Report:
        received = {i for i, n in self.sink.counts.items() if n > 0}
        return Report(
            acknowledged=len(self.acked), unacknowledged=len(self.attempted - self.acked), delivered=len(received),
            lost=sorted(self.acked - received), duplicated=self.sink.duplicates,
            unexpected=sorted(received - self.attempted), recovered=len((received & self.attempted) - self.acked),
            kills=self.kills, backlog_at_kills=self.backlog)


@pytest.fixture
async def sink() -> AsyncIterator[HttpSink]:
    async with HttpSink() as s:
        yield s


async def test_kill_9_under_load_loses_no_acknowledged_message(tmp_path: Path, sink: HttpSink) -> None:
    run = CrashRun(tmp_path, [RestSender()], sink, kills=4)
    report = await run.run()
    print(report)
    assert report.acknowledged > 100, "too little traffic for the test to mean anything"
    assert any(report.backlog_at_kills), "no kill hit a spool backlog"
    assert report.lost == [], f"LOST acknowledged messages: {report.lost[:20]} (seed {run.seed})"
    assert report.unexpected == [], f"unexpected messages: {report.unexpected[:20]}"
    assert run.gateway.starts == 1 + report.kills
