"""The running gateway: one asyncio loop, every connector a supervised task.

Order matters. Start: spool → outbound side of every connector (``open``) → delivery workers →
inbound listeners → HTTP listeners. Stop (SIGTERM/SIGINT): readiness false → inbound stops
taking messages and drains → delivery drains in-flight sends within the deadline (spooled work
stays in the spool for the next start) → HTTP listeners close → connectors close → spool
closes. A connector that fails to open or listen is retried with backoff and reported down;
the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.config.loader import LoadedConfig, load_config
from gateway.config.yamlsrc import ConfigError
from gateway.contract import Connector, ConnectorContext, Health
from gateway.delivery.engine import Delivery, RoutingState
from gateway.delivery.spool import Spool
from gateway.http import HttpHub
from gateway.logs import event
from gateway.metrics import Metrics
from gateway.registry import Registry


@dataclass
class ConnectorSlot:
    name: str
    connector: Connector
    inbound: bool
    state: str = "starting"  # starting | up | down | stopped
    error: str = ""
    task: asyncio.Task[None] | None = None
    since: float = field(default_factory=time.time)

    def health(self) -> Health:
        if self.state != "up":
            return Health(False, self.error or self.state)
        try:
            return self.connector.health()
        except Exception as exc:
            return Health(False, f"health check failed: {type(exc).__name__}")


class Runtime:
    def __init__(self, config: LoadedConfig, *, registry: Registry | None = None, config_path: str | None = None,
                 log: logging.Logger | None = None):
        self.config = config
        self.registry = registry or Registry()
        self.config_path = config_path
        self.log = log or logging.getLogger("gateway")
        self.metrics = Metrics()
        settings = config.model.gateway
        self.spool = Spool(settings.spool.path, min_free_bytes=settings.spool.min_free_bytes)
        self.http = HttpHub(logging.getLogger("gateway.http"))
        self.slots: dict[str, ConnectorSlot] = {}
        self.delivery = Delivery(
            state=RoutingState(config.router, settings.unmatched, config.version),
            connector=self._connector_for_send, spool=self.spool, metrics=self.metrics,
            log=logging.getLogger("gateway.delivery"),
        )
        self.started_at = time.time()
        self.stopping = False
        self._stop_event = asyncio.Event()
        self._gauge_task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.config_history: list[dict[str, Any]] = []

    # --- helpers -------------------------------------------------------------------------

    def _connector_for_send(self, name: str) -> Connector | None:
        slot = self.slots.get(name)
        return slot.connector if slot is not None else None

    def _inbound_names(self, config: LoadedConfig) -> set[str]:
        return {s for r in config.router.routes for s in r.sources}

    def _make(self, name: str, config: LoadedConfig) -> Connector:
        cls = config.kinds[name]
        state_dir = os.path.join(config.model.gateway.state_dir, name)
        ctx = ConnectorContext(name=name, logger=logging.getLogger(f"gateway.connector.{name}"), http=self.http,
                               state_dir=state_dir)
        return cls(config.connectors[name], ctx)

    # --- readiness -----------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        connectors = {}
        ready = not self.stopping
        for name, slot in self.slots.items():
            h = slot.health()
            connectors[name] = {"up": h.up, "detail": h.detail, "state": slot.state}
            self.metrics.connector_up.labels(name).set(1 if h.up else 0)
            ready = ready and h.up
        spool_ok = self.spool.healthy and self.spool.has_space
        ready = ready and spool_ok
        self.metrics.ready.set(1 if ready else 0)
        return ready, {"ready": ready, "stopping": self.stopping, "spool": {"ok": spool_ok},
                       "connectors": connectors, "config_version": self.config.version}

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        from gateway.admin import mount_admin

        await self.spool.open()
        self._apply_metrics(self.config)
        for name in self.config.connectors:
            self.slots[name] = ConnectorSlot(name, self._make(name, self.config),
                                             inbound=name in self._inbound_names(self.config))
        # Outbound first: every connector opens before any inbound listens.
        await asyncio.gather(*(self._open(slot) for slot in self.slots.values()))
        await self.delivery.start([n for n, s in self.slots.items() if type(s.connector).supports_outbound])
        for slot in self.slots.values():
            if slot.inbound and slot.task is None:
                slot.task = asyncio.create_task(self._supervise(slot), name=f"connector-{slot.name}")
        mount_admin(self)
        # Give inbound connectors a moment to mount their HTTP apps before the listeners start.
        await asyncio.sleep(0)
        for _ in range(50):
            if all(s.state != "starting" for s in self.slots.values() if s.inbound):
                break
            await asyncio.sleep(0.02)
        await self.http.start()
        self._gauge_task = asyncio.create_task(self._gauges(), name="gauges")
        self.config_history.append({"version": self.config.version, "applied_at": time.time(), "by": "startup"})
        event(self.log, "gateway.started", config=self.config.version, routes=len(self.config.router),
              connectors=",".join(self.slots))

    def _apply_metrics(self, config: LoadedConfig) -> None:
        self.metrics.routes_loaded.set(len(config.router))
        self.metrics.config_info.clear()
        self.metrics.config_info.labels(config.version).set(1)

    async def _open(self, slot: ConnectorSlot) -> None:
        try:
            await slot.connector.open()
            if not slot.inbound:
                slot.state = "up"
        except Exception as exc:
            slot.state, slot.error = "down", f"open failed: {exc}"
            event(self.log, "connector.down", logging.WARNING, connector=slot.name, error=str(exc))
            if slot.task is None:
                slot.task = asyncio.create_task(self._supervise(slot, opened=False), name=f"connector-{slot.name}")

    async def _supervise(self, slot: ConnectorSlot, opened: bool = True) -> None:
        """Open (if needed) and listen; on failure retry with backoff and jitter, forever."""
        delay = 1.0
        while not self.stopping:
            try:
                if not opened:
                    await slot.connector.open()
                    opened = True
                if slot.inbound:
                    await slot.connector.listen(self.delivery.deliver)
                slot.state, slot.error = "up", ""
                event(self.log, "connector.up", connector=slot.name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                slot.state, slot.error = "down", str(exc)
                event(self.log, "connector.down", logging.WARNING, connector=slot.name, error=str(exc),
                      retry_in=round(delay, 1))
                await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))
                delay = min(30.0, delay * 2)

    async def _gauges(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.delivery.refresh_gauges()
                self.readiness()
            await asyncio.sleep(2.0)

    def request_stop(self) -> None:
        self._stop_event.set()

    async def wait(self) -> None:
        await self._stop_event.wait()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        drain = self.config.model.gateway.drain
        deadline = time.monotonic() + drain
        event(self.log, "gateway.stopping", drain=drain)
        self.metrics.ready.set(0)
        for slot in self.slots.values():
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
        inbound = [s for s in self.slots.values() if s.inbound]
        await asyncio.gather(*(self._stop_listening(s, deadline) for s in inbound))
        await self.delivery.drain(deadline)
        await self.http.stop()
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(slot.connector.close(), timeout=5)
            slot.state = "stopped"
        if self._gauge_task:
            self._gauge_task.cancel()
        await self.spool.close()
        event(self.log, "gateway.stopped")

    async def _stop_listening(self, slot: ConnectorSlot, deadline: float) -> None:
        try:
            await asyncio.wait_for(slot.connector.stop_listening(max(0.0, deadline - time.monotonic())),
                                   timeout=max(0.1, deadline - time.monotonic() + 1))
        except Exception as exc:
            event(self.log, "connector.stop_failed", logging.WARNING, connector=slot.name, error=str(exc))

    # --- reload ----------------------------------------------------------------------------

    async def reload(self, new: LoadedConfig, *, by: str = "file") -> dict[str, Any]:
        """Apply a validated config: swap routes atomically, restart only changed connectors."""
        old = self.config
        changed = {n for n in new.connectors if n in old.connectors and new.connectors[n] != old.connectors[n]}
        added = set(new.connectors) - set(old.connectors)
        removed = set(old.connectors) - set(new.connectors)
        new_inbound = self._inbound_names(new)
        restart = changed | {n for n in set(new.connectors) & set(old.connectors)
                             if (n in new_inbound) != self.slots[n].inbound}
        deadline = time.monotonic() + new.model.gateway.drain
        # 1. stop inbound of what changes, so nothing new arrives on the old settings
        for name in restart | removed:
            slot = self.slots[name]
            if slot.task and not slot.task.done():
                slot.task.cancel()
            if slot.inbound:
                await self._stop_listening(slot, deadline)
        # 2. new routes take effect for every message from now on; in-flight ones keep theirs
        self.config = new
        self.delivery.state = RoutingState(new.router, new.model.gateway.unmatched, new.version)
        # 3. replace changed connectors, add new ones, close removed ones
        for name in restart | removed:
            old_slot = self.slots.pop(name)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old_slot.connector.close(), timeout=5)
        for name in restart | added:
            slot = self.slots[name] = ConnectorSlot(name, self._make(name, new), inbound=name in new_inbound)
            await self._open(slot)
            if slot.inbound and slot.state != "down":
                slot.task = asyncio.create_task(self._supervise(slot), name=f"connector-{name}")
        await self.delivery.start([n for n in restart | added if type(self.slots[n].connector).supports_outbound])
        await self.http.start()
        self._apply_metrics(new)
        self.metrics.reloads.labels("applied").inc()
        self.config_history.append({"version": new.version, "applied_at": time.time(), "by": by})
        del self.config_history[:-20]
        result = {"version": new.version, "restarted": sorted(restart), "added": sorted(added),
                  "removed": sorted(removed)}
        event(self.log, "config.applied", by=by, version=new.version, restarted=",".join(sorted(restart)),
              added=",".join(sorted(added)), removed=",".join(sorted(removed)))
        return result

    async def reload_from_file(self, by: str = "file") -> dict[str, Any]:
        if not self.config_path:
            raise ConfigError([])
        try:
            new = load_config(self.config_path, self.registry)
        except ConfigError as exc:
            self.metrics.reloads.labels("invalid").inc()
            event(self.log, "config.invalid", logging.ERROR, by=by, errors=len(exc.issues),
                  first=str(exc.issues[0]) if exc.issues else "")
            raise
        if new.version == self.config.version:
            return {"version": new.version, "unchanged": True}
        return await self.reload(new, by=by)


async def serve(config_path: str, registry: Registry | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads the config. Returns the exit code."""
    registry = registry or Registry()
    config = load_config(config_path, registry)
    runtime = Runtime(config, registry=registry, config_path=config_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)

    def on_hup() -> None:
        async def go() -> None:
            with contextlib.suppress(ConfigError):
                await runtime.reload_from_file(by="sighup")
        asyncio.ensure_future(go())  # noqa: RUF006 - fire and forget, outcome is logged

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await runtime.start()
    except Exception as exc:
        event(runtime.log, "gateway.start_failed", logging.ERROR, error=str(exc))
        await runtime.stop()
        return 1
    watcher = asyncio.create_task(_watch(runtime, config_path), name="config-watch")
    await runtime.wait()
    watcher.cancel()
    await runtime.stop()
    return 0


async def _watch(runtime: Runtime, path: str) -> None:
    """Reload when the file changes; watches the directory so a ConfigMap symlink swap counts."""
    try:
        from watchfiles import awatch
    except ImportError:  # pragma: no cover
        return
    directory = os.path.dirname(os.path.abspath(path))
    async for _changes in awatch(directory, debounce=300, recursive=False, force_polling=False):
        with contextlib.suppress(ConfigError):
            await runtime.reload_from_file(by="file")
