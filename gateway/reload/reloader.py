"""The reloader: applies a validated config to the running gateway, one change at a time.

It opens what the new config adds, drains what it replaces or removes, swaps the routing state
in one assignment, and records the outcome (:class:`Status`, the history, metrics and log
events). Its errors: :class:`ReloadRefused` (the change cannot be applied now) and
:class:`ReloadFailed` (applying it failed part-way); :class:`~gateway.reload.worker.WorkerBusy`
when the admin API asks while the config worker, which parses and validates every candidate
off the event loop, is full.

Every edit it refuses (a stale base, changes on disk that are not live, an invalid config, a
file it cannot write) is logged with who asked, what (the candidate's version) and why, as
``config.refused`` or ``config.invalid``, as those it applies are logged as ``config.applied``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config.loader import LoadedConfig, load_config, load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.contract import Connector
from gateway.delivery.engine import RoutingState
from gateway.history import History, atomic_write
from gateway.logs import event
from gateway.reload.mounts import Mounts
from gateway.reload.plan import Plan, inbound_names, plan_reload
from gateway.reload.worker import ConfigWorker

if TYPE_CHECKING:
    from gateway.runtime import ConnectorSlot, Runtime


def version_of(text: str) -> str:
    """The config version: the content hash the loader gives a file's text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


class ReloadRefused(Exception):
    """A change that is valid YAML but cannot be applied now (stale base, read-only file...)."""

    def __init__(self, message: str, *, status: int = 409, current: str | None = None):
        super().__init__(message)
        self.status = status
        self.current = current


class ReloadFailed(Exception):
    """Applying a valid config failed part-way; the result says how far it got."""


@dataclass
class Status:
    """The last reload attempt, as /api/config shows it."""

    outcome: str = "startup"  # startup | applied | unchanged | invalid | failed | refused
    version: str = ""
    at: float = field(default_factory=time.time)
    by: str = "startup"
    errors: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "version": self.version, "at": self.at, "by": self.by,
                "errors": self.errors, "result": self.result}


class Reloader:
    """Applies config changes to a running :class:`~gateway.runtime.Runtime`, one at a time."""

    def __init__(self, runtime: Runtime, *, history_dir: str | None = None):
        self.rt = runtime
        self.log = logging.getLogger("gateway.reload")
        self.lock = asyncio.Lock()
        self.worker = ConfigWorker()
        self.mounts = Mounts(runtime.http)
        state_dir = runtime.config.model.gateway.state_dir
        self.history = History(history_dir if history_dir is not None else os.path.join(state_dir, ".history"),
                               log=self.log)
        self.status = Status(version=runtime.config.version)
        #: Content hash of the last file contents a watcher acted on (so one bad save logs once).
        self.seen_on_disk = runtime.config.version

    # --- entry points ------------------------------------------------------------------------

    async def started(self) -> None:
        """Record the startup version in the history (unless it is already the newest)."""
        latest = self.history.latest()
        cfg = self.rt.config
        if latest is None or latest.version != cfg.version:
            await asyncio.to_thread(self.history.record, cfg.version, cfg.source.text, "startup")

    async def from_file(self, by: str = "file", *, wait: bool = True) -> dict[str, Any]:
        """Re-read the config file and apply it if it changed. Raises ConfigError when invalid;
        with ``wait=False`` (the admin API), WorkerBusy when the config worker is full."""
        path = self._path()
        async with self.lock:
            try:
                new = await self.worker.run(functools.partial(load_config, path, self.rt.registry), wait=wait)
            except ConfigError as exc:
                self.record_invalid(exc, by)
                raise
            self.seen_on_disk = new.version
            return await self._apply(new, by)

    async def apply(self, new: LoadedConfig, *, by: str, note: str = "") -> dict[str, Any]:
        """Apply an already validated config (not saved anywhere)."""
        async with self.lock:
            return await self._apply(new, by, note)

    async def save_and_apply(self, text: str, *, base: str, by: str, note: str = "") -> dict[str, Any]:
        """The admin API's write: check the base version, validate, save atomically, apply.

        ``base`` is the version the edit was based on; an edit of anything but the running
        version, or while the file on disk holds changes that are not live, is refused (409).
        """
        path = self._path()
        async with self.lock:
            running = self.rt.config.version
            candidate = version_of(text)
            if base != running:
                raise self._refused(ReloadRefused(
                    f"this edit is based on version {base}, but version {running} is running now; "
                    "reload it and edit again", current=running), by, candidate, base)
            try:
                on_disk = await asyncio.to_thread(_read, path)
            except OSError as exc:
                raise self._refused(ReloadRefused(f"cannot read {path}: {exc.strerror}", status=503),
                                    by, candidate, base) from None
            if version_of(on_disk) != running:
                raise self._refused(ReloadRefused(
                    f"{os.path.basename(path)} on disk has changes that are not live "
                    f"(version {version_of(on_disk)}); apply or discard them first", current=running),
                    by, candidate, base)
            try:
                new = await self.worker.run(functools.partial(
                    load_config_text, text, file=path, base_dir=os.path.dirname(os.path.abspath(path)),
                    registry=self.rt.registry))
            except ConfigError as exc:
                self.record_invalid(exc, by, candidate)
                raise
            if new.version == running:
                return self._unchanged(new, by)
            try:
                await asyncio.to_thread(atomic_write, path, text)
            except OSError as exc:
                self.status = Status("refused", new.version, by=by,
                                     errors=[{"message": f"cannot write: {exc.strerror}"}])
                raise self._refused(ReloadRefused(
                    f"cannot write {path}: {exc.strerror or exc} (is it a read-only ConfigMap? "
                    "change it at its source)", status=409, current=running), by, candidate, base) from None
            self.seen_on_disk = new.version
            return await self._apply(new, by, note)

    # --- the apply -----------------------------------------------------------------------------

    async def _apply(self, new: LoadedConfig, by: str, note: str = "") -> dict[str, Any]:
        rt = self.rt
        old = rt.config
        if new.version == old.version:
            return self._unchanged(new, by)
        plan = plan_reload(old, new)
        deadline = time.monotonic() + new.model.gateway.drain
        started = time.monotonic()
        try:
            new_slots = await self._apply_connectors(old, new, plan, deadline)
        except Exception as exc:
            rt.metrics.reloads.labels("failed").inc()
            self.status = Status("failed", new.version, by=by, errors=[{"message": f"{type(exc).__name__}: {exc}"}])
            event(self.log, "config.failed", logging.ERROR, by=by, version=new.version, error=str(exc))
            raise ReloadFailed(str(exc)) from exc
        rt._apply_metrics(new)
        rt.metrics.reloads.labels("applied").inc()
        await asyncio.to_thread(self.history.record, new.version, new.source.text, by, note)
        result: dict[str, Any] = {
            "outcome": "applied", "version": new.version, "previous": old.version, "by": by,
            "restarted": sorted(plan.restart), "added": sorted(plan.added), "removed": sorted(plan.removed),
            "listening": sorted(plan.start_listening), "stopped_listening": sorted(plan.stop_listening),
            "connectors": {n: {"state": s.state, "error": s.error} for n, s in sorted(new_slots.items())},
            "restart_required": list(plan.restart_required),
            "seconds": round(time.monotonic() - started, 3),
        }
        self.status = Status("applied", new.version, by=by, result=result)
        event(self.log, "config.applied", by=by, version=new.version, previous=old.version,
              restarted=",".join(sorted(plan.restart)), added=",".join(sorted(plan.added)),
              removed=",".join(sorted(plan.removed)), routes=len(new.router), note=note)
        if plan.restart_required:
            event(self.log, "config.restart_required", logging.WARNING, version=new.version,
                  settings=",".join(plan.restart_required))
        return result

    async def _apply_connectors(self, old: LoadedConfig, new: LoadedConfig, plan: Plan,
                                deadline: float) -> dict[str, ConnectorSlot]:
        from gateway.runtime import ConnectorSlot

        rt = self.rt
        new_in = inbound_names(new)
        # 1. Added connectors open first: the new routes may name them from the first message on.
        added = {n: ConnectorSlot(n, self._make(n, new), inbound=n in new_in) for n in sorted(plan.added)}
        await asyncio.gather(*(rt._open(s) for s in added.values()))
        # 2. What is replaced or removed stops taking messages and drains its in-flight ones.
        retiring = [rt.slots[n] for n in sorted(plan.restart | plan.removed) if n in rt.slots]
        for slot in retiring:
            slot.connector.ctx.http = self.mounts.retiring()
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
        quiet = [rt.slots[n] for n in sorted(plan.stop_listening)]
        await asyncio.gather(*(rt._stop_listening(s, deadline) for s in [*retiring, *quiet] if s.inbound))
        for slot in quiet:
            slot.inbound = False
        # 3. The swap: one assignment, no await in between. In-flight messages keep their snapshot.
        rt.config = new
        rt.delivery.state = RoutingState(new.router, new.model.gateway.unmatched, new.version)
        rt.slots.update(added)
        # 4. Drain the sends of what is replaced or removed, close it, open the replacement.
        await asyncio.gather(*(self._retire(s, removed=s.name in plan.removed, deadline=deadline)
                               for s in retiring))
        replaced = {n: ConnectorSlot(n, self._make(n, new), inbound=n in new_in) for n in sorted(plan.restart)}
        await asyncio.gather(*(rt._open(s) for s in replaced.values()))
        for name in plan.removed:
            rt.slots.pop(name, None)
        rt.slots.update(replaced)
        fresh = {**added, **replaced}
        # 5. Listen: replacements, additions, and unchanged connectors that became a route's source.
        for name in sorted(set(fresh) | plan.start_listening):
            slot = rt.slots[name]
            if name in plan.start_listening:
                slot.inbound = True
            if slot.inbound and slot.state != "down" and (slot.task is None or slot.task.done()):
                slot.task = asyncio.create_task(rt._supervise(slot), name=f"connector-{name}")
        await rt.delivery.start([n for n, s in fresh.items() if type(s.connector).supports_outbound])
        await rt.http.start()
        listening = [rt.slots[n] for n in sorted(set(fresh) | plan.start_listening) if rt.slots[n].inbound]
        end = time.monotonic() + 5.0
        while any(s.state == "starting" for s in listening) and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self.mounts.clear_placeholders()
        return {n: rt.slots[n] for n in sorted(set(fresh) | plan.start_listening)}

    def _make(self, name: str, config: LoadedConfig) -> Connector:
        conn = self.rt._make(name, config)
        conn.ctx.http = self.mounts.for_connector()
        return conn

    async def _retire(self, slot: ConnectorSlot, *, removed: bool, deadline: float) -> None:
        """Let the sends in flight on the connector finish (and, if it is removed, its spooled
        jobs), then close it. Sends that still reach it after that fail as transient and are
        retried on the replacement."""
        rt = self.rt
        name = slot.name
        if type(slot.connector).supports_outbound:
            spooled, direct = _inflight(rt, name)
            direct_until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < deadline:
                now_spooled, now_direct = _inflight(rt, name)
                busy = bool(spooled & now_spooled) or (now_direct > 0 and direct > 0
                                                       and time.monotonic() < direct_until)
                if removed and not busy:
                    busy = (await rt.spool.depth()).get(name, (0, 0.0))[0] > 0
                if not busy:
                    break
                await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(slot.connector.close(), timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            event(self.log, "connector.close_failed", logging.WARNING, connector=name, error=str(exc))
        slot.state = "stopped"

    # --- bookkeeping ---------------------------------------------------------------------------

    def _unchanged(self, new: LoadedConfig, by: str) -> dict[str, Any]:
        self.status = Status("unchanged", new.version, by=by)
        event(self.log, "config.unchanged", by=by, version=new.version)
        return {"outcome": "unchanged", "version": new.version, "by": by}

    def record_invalid(self, exc: ConfigError, by: str, version: str = "") -> None:
        """Count and log a config refused as invalid, with its issues (the running one stays)."""
        self.rt.metrics.reloads.labels("invalid").inc()
        self.status = Status("invalid", self.rt.config.version, by=by, errors=[i.as_dict() for i in exc.issues])
        event(self.log, "config.invalid", logging.ERROR, by=by, version=version, running=self.rt.config.version,
              errors=len(exc.issues), first=str(exc.issues[0]) if exc.issues else "",
              issues=[str(i) for i in exc.issues[:_LOGGED_ISSUES]])

    def record_refused(self, reason: str, *, by: str, base: str, status: int, version: str = "") -> None:
        """Log an edit refused before it was validated: who, what (candidate and base versions), why."""
        event(self.log, "config.refused", logging.WARNING, by=by, version=version, base=base,
              running=self.rt.config.version, status=status, reason=reason)

    def _refused(self, exc: ReloadRefused, by: str, version: str, base: str) -> ReloadRefused:
        self.record_refused(str(exc), by=by, base=base, status=exc.status, version=version)
        return exc

    def _path(self) -> str:
        if not self.rt.config_path:
            raise ReloadRefused("this gateway was started without a config file", status=409)
        return self.rt.config_path


#: Issues a ``config.invalid`` log line lists (the API and ``gateway validate`` give them all).
_LOGGED_ISSUES = 20


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _inflight(rt: Runtime, connector: str) -> tuple[set[int], int]:
    """(ids of spooled jobs being sent on ``connector``, direct sends that may be on it).

    ``Delivery`` tracks spooled sends per connector but direct ones only in total, so every
    direct send counts when some direct route targets the connector.
    """
    spooled, direct = rt.delivery.sending(connector)
    if not any(r.mode == "direct" and any(t.connector == connector for t in r.targets)
               for r in rt.config.router.routes):
        direct = 0
    return spooled, direct

