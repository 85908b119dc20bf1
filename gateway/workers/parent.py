"""The parent of the worker processes: starts them, restarts one that dies, stops them all, and
serves the gateway's one admin port (see :mod:`gateway.workers` and docs/workers.md).

The parent routes no message. On ``gateway.admin.listen`` (with that address's ``gateway.http``
bounds and TLS) it answers:

* ``/healthz`` itself (the parent is alive);
* ``/readyz``: ready while it is not stopping and at least one worker is ready (``SO_REUSEPORT``
  gives new connections only to the workers listening); the body lists every worker;
* ``/metrics``: every worker's metrics scraped from its private admin address and added up
  (counters, histograms and most gauges summed; ``gateway_ready`` and ``gateway_connector_up``
  the minimum, ``gateway_config_info``, ``gateway_routes_loaded`` and the oldest spool age the
  maximum), plus ``gateway_workers`` and ``gateway_worker_restarts_total``;
* everything else (the admin API and editor) is proxied to worker 0, which is told the client's
  address (its loopback rule and login limits apply to the real client, not to the parent). After a request that may
  have changed the config (any successful one that is not a read), every other worker is told to
  reload the file (SIGHUP) and the answer waits until each runs worker 0's version: it says so in
  ``X-Gateway-Workers`` (``confirmed 2/2 <version>``) and, for a JSON object, in ``workers``.

A worker that exits unasked is started again with the same index (its spool, its MQTT client id)
after a backoff that grows from half a second to 30 s and resets once it has run for a minute.
A worker whose first start fails (a port taken, a spool that cannot open) stops the gateway, which
exits 1 as one process would.
SIGTERM/SIGINT stop the workers (each drains as a single gateway does) and then the parent;
SIGHUP is passed on to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.loader import LoadedConfig
from gateway.http import (
    BodyTooLarge,
    ClientDisconnected,
    HttpHub,
    Receive,
    Scope,
    Send,
    parse_listen,
    read_body,
    send_problem,
)
from gateway.logs import event
from gateway.metrics import CONTENT_TYPE
from gateway.tasks import Backoff
from gateway.workers import CLIENT_HEADER, EXIT_START_FAILED, FORWARD_PATH, SECRET_HEADER, WorkerIdentity

log = logging.getLogger("gateway.workers")

#: Gauges whose sum over workers means nothing: the least of them, or the most.
_MIN_GAUGES = frozenset({"gateway_ready", "gateway_connector_up"})
_MAX_GAUGES = frozenset({"gateway_config_info", "gateway_routes_loaded", "gateway_spool_oldest_age_seconds"})
#: How long the parent waits for every worker to run a new config version.
CONFIRM_TIMEOUT = 30.0
#: A worker that ran this long before it died is restarted after the shortest backoff again.
_STABLE_AFTER = 60.0
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
                         b"proxy-authorization", b"proxy-authenticate", b"host", b"content-length",
                         b"date", b"server"})
#: Headers only the parent sets (an outside client's are dropped).
_OURS = frozenset({SECRET_HEADER.encode(), CLIENT_HEADER.encode()})
#: Paths whose successful non-read requests cannot change the config: no reload round after them.
_NOT_CONFIG = ("/api/dead-letters", "/api/login", "/api/logout", "/api/routes/validate", "/api/routes/test")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Worker:
    identity: WorkerIdentity
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.identity.admin_listen}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def merge_metrics(texts: Sequence[str]) -> list[Metric]:
    """The workers' expositions as one: each series added up over the workers (see the module card)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                values[fam.name] = {}
            series = values[fam.name]
            pick = min if fam.name in _MIN_GAUGES else max if fam.name in _MAX_GAUGES else None
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key not in series:
                    series[key] = s.value
                elif pick is not None:
                    series[key] = pick(series[key], s.value)
                else:
                    series[key] += s.value
    for name, metric in families.items():
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
    return list(families.values())


class _Collected:
    """A registry collector that yields metrics gathered elsewhere."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


class Parent:
    """The worker processes of one gateway and its admin port."""

    def __init__(self, config_path: str, config: LoadedConfig, count: int):
        self.config_path = config_path
        self.config = config
        self._stop = asyncio.Event()
        secret = secrets.token_urlsafe(32)
        peers = tuple(f"127.0.0.1:{_free_port()}" for _ in range(count))
        self.workers = [_Worker(WorkerIdentity(i, count, peers[i], peers, secret)) for i in range(count)]
        settings = config.model.gateway
        admin = parse_listen(settings.admin.listen)  # the data plane's bounds are the workers' business
        self.http = HttpHub(logging.getLogger("gateway.http"),
                            {a: lim for a, lim in settings.http.items() if parse_listen(a) == admin})
        self.http.mount(settings.admin.listen, "/", self.app, owner="admin")
        self._max_body = settings.admin.max_config_bytes + 64 * 1024
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: A worker's first start failed: the gateway stops and exits 1.
        self._failed = False

    @property
    def stopping(self) -> bool:
        """Set by SIGTERM/SIGINT: from then on no worker is started again."""
        return self._stop.is_set()

    # --- processes ---------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_workers(signal.SIGHUP))
        self._session = aiohttp.ClientSession(auto_decompress=False)
        try:
            await self.http.start()
        except OSError as exc:
            event(log, "gateway.start_failed", logging.ERROR, error=str(exc))
            await self._session.close()
            return 1
        event(log, "workers.starting", workers=len(self.workers), admin=self.config.model.gateway.admin.listen)
        self._tasks = [asyncio.create_task(self._keep(w), name=f"worker-{w.identity.index}") for w in self.workers]
        await self._stop.wait()
        await self.stop()
        return 1 if self._failed else 0

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w``, and again after a backoff each time it exits unasked."""
        backoff = Backoff(0.5, 30.0)
        index = w.identity.index
        while not self.stopping:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.cli", "run", "--config", self.config_path,
                env={**os.environ, **w.identity.env()})
            started = time.monotonic()
            event(log, "worker.started", worker=index, pid=w.proc.pid)
            code = await w.proc.wait()
            if self.stopping:
                return
            if code == EXIT_START_FAILED and w.restarts == 0:
                # What stops a first start (a port taken, a spool that cannot open) is not cured
                # by starting again: fail as one process would.
                event(log, "worker.start_failed", logging.ERROR, worker=index, pid=w.proc.pid)
                self._failed = True
                self._stop.set()
                return
            if time.monotonic() - started >= _STABLE_AFTER:
                backoff.reset()
            delay = backoff.next()
            w.restarts += 1
            event(log, "worker.exited", logging.WARNING, worker=index, pid=w.proc.pid, code=code,
                  restart_in=round(delay, 2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)

    def _signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.alive and w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM to every worker; each drains as one gateway does. Killed if it outlasts its drain."""
        self._stop.set()
        event(log, "workers.stopping")
        self._signal_workers(signal.SIGTERM)
        grace = self.config.model.gateway.drain + 20.0
        procs = [w.proc for w in self.workers if w.alive and w.proc is not None]
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=grace)
        for p in procs:
            if p.returncode is None:
                event(log, "worker.killed", logging.WARNING, pid=p.pid, after=grace)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.stop()
        if self._session is not None:
            await self._session.close()
        event(log, "workers.stopped")

    # --- the admin port ----------------------------------------------------------------------------

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope.get("path", "/")
        if path == "/healthz":
            await _json(send, 200, {"status": "ok", "workers": sum(w.alive for w in self.workers)})
        elif path == "/readyz":
            ready, body = await self.readiness()
            await _json(send, 200 if ready else 503, body)
        elif path == "/metrics":
            await _send(send, 200, await self.metrics(), [(b"content-type", CONTENT_TYPE.encode())])
        elif path.startswith(FORWARD_PATH):
            await send_problem(send, 404, "Not Found", f"nothing is served at {path}")
        else:
            await self.proxy(scope, receive, send)

    async def _get(self, w: _Worker, path: str) -> tuple[int, bytes]:
        assert self._session is not None
        async with self._session.get(w.url + path, timeout=aiohttp.ClientTimeout(total=3.0)) as resp:
            return resp.status, await resp.read()

    async def _worker_status(self, w: _Worker) -> dict[str, Any]:
        out: dict[str, Any] = {"index": w.identity.index, "pid": w.proc.pid if w.proc else None,
                               "admin": w.identity.admin_listen,
                               "alive": w.alive, "restarts": w.restarts, "ready": False}
        if not w.alive:
            return out
        try:
            status, body = await self._get(w, "/readyz?verbose")
            detail = json.loads(body)
            out.update(ready=status == 200, config_version=detail.get("config_version"),
                       reasons=detail.get("reasons", []))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            out["reasons"] = [f"not answering: {type(exc).__name__}"]
        return out

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        workers = await asyncio.gather(*(self._worker_status(w) for w in self.workers))
        ready = not self.stopping and any(w["ready"] for w in workers)
        reasons = ["stopping"] if self.stopping else []
        reasons += [f"worker {w['index']}: {'; '.join(w.get('reasons') or ['not running'])}"
                    for w in workers if not w["ready"]]
        return ready, {"ready": ready, "reasons": reasons, "stopping": self.stopping, "workers": workers,
                       "config_version": workers[0].get("config_version")}

    async def metrics(self) -> bytes:
        async def scrape(w: _Worker) -> str:
            if not w.alive:
                return ""
            try:
                status, body = await self._get(w, "/metrics")
            except (aiohttp.ClientError, TimeoutError):
                return ""
            return body.decode() if status == 200 else ""

        texts = await asyncio.gather(*(scrape(w) for w in self.workers))
        merged = merge_metrics([t for t in texts if t])
        own = [Metric("gateway_workers", "Worker processes running (gateway.workers).", "gauge"),
               Metric("gateway_worker_restarts", "Worker processes restarted after they exited unasked.", "counter")]
        own[0].add_sample("gateway_workers", {}, sum(w.alive for w in self.workers))
        own[1].add_sample("gateway_worker_restarts_total", {}, sum(w.restarts for w in self.workers))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(merged + own))
        return generate_latest(registry)

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass an admin request to worker 0; after a config change, bring every worker to its version."""
        assert self._session is not None
        owner = self.workers[0]
        try:
            body = await read_body(receive, self._max_body)
        except BodyTooLarge:
            await send_problem(send, 413, "Content Too Large", "the request body is too large")
            return
        except ClientDisconnected:
            return
        method: str = scope["method"]
        query = scope.get("query_string", b"").decode("latin-1")
        url = owner.url + scope.get("raw_path", scope["path"].encode()).decode("latin-1") + (f"?{query}" if query
                                                                                          else "")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k not in _HOP_BY_HOP and k not in _OURS]
        client = scope.get("client") or ("", 0)
        headers += [(SECRET_HEADER, owner.identity.secret), (CLIENT_HEADER, f"{client[0]} {client[1]}")]
        try:
            async with self._session.request(method, url, data=body, headers=headers, allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=300)) as resp:
                status, answer = resp.status, await resp.read()
                out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()
                       if k.lower().encode() not in _HOP_BY_HOP]
        except (aiohttp.ClientError, TimeoutError) as exc:
            await send_problem(send, 503, "Service Unavailable", "worker 0 is not answering, try again shortly",
                               headers=[(b"retry-after", b"1")])
            event(log, "workers.proxy_failed", logging.WARNING, path=scope["path"], error=type(exc).__name__)
            return
        if method not in ("GET", "HEAD", "OPTIONS") and status < 300 and not scope["path"].startswith(_NOT_CONFIG):
            confirmed, versions = await self.confirm_config()
            version = versions.get(0) or ""
            note = f"confirmed {sum(v == version for v in versions.values())}/{len(self.workers)} {version}"
            out.append((b"x-gateway-workers", note.encode()))
            if resp.content_type == "application/json":
                with contextlib.suppress(ValueError):
                    doc = json.loads(answer)
                    if isinstance(doc, dict):
                        doc["workers"] = {"confirmed": confirmed, "versions": {str(i): v for i, v in versions.items()}}
                        answer = json.dumps(doc).encode()
        await _send(send, status, answer, out)

    async def confirm_config(self) -> tuple[bool, dict[int, str | None]]:
        """Tell every worker but 0 to reload the file, and wait until each runs worker 0's version
        (or :data:`CONFIRM_TIMEOUT` passes): whether they all do, and each one's version."""
        versions: dict[int, str | None] = {}
        owner = await self._worker_status(self.workers[0])
        target = owner.get("config_version")
        versions[0] = target
        others = [w for w in self.workers[1:] if w.alive]
        for w in others:
            if w.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + CONFIRM_TIMEOUT
        while True:
            states = await asyncio.gather(*(self._worker_status(w) for w in others))
            for w, st in zip(others, states, strict=True):
                versions[w.identity.index] = st.get("config_version")
            done = all(versions[w.identity.index] == target for w in others)
            if done or time.monotonic() > end:
                confirmed = done and target is not None and len(others) == len(self.workers) - 1
                if not confirmed:
                    event(log, "workers.config_unconfirmed", logging.WARNING, version=target,
                          versions=json.dumps(versions))
                return confirmed, versions
            await asyncio.sleep(0.05)


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, doc: dict[str, Any]) -> None:
    await _send(send, status, json.dumps(doc).encode(), [(b"content-type", b"application/json")])


async def run_parent(config_path: str, config: LoadedConfig, count: int) -> int:
    """Run ``count`` worker processes until SIGTERM/SIGINT; the exit code."""
    return await Parent(config_path, config, count).run()
