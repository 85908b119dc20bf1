"""The reloader: applies a validated config to the running gateway, one change at a time.

It plans each change (:mod:`~gateway.reload.plan`), has the gateway's
:class:`~gateway.supervisor.Supervisor` open what the new config adds, drain what it replaces or
removes and swap the routing state in one assignment, and records the outcome (:class:`Status`,
the history, metrics and log events). Its errors: :class:`ReloadRefused` (the change cannot be
applied now) and :class:`ReloadFailed` (applying it failed part-way);
:class:`~gateway.reload.worker.WorkerBusy` when the admin API asks while the config worker, which
parses and validates every candidate off the event loop, is full.

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
from typing import TYPE_CHECKING, Any, Protocol

from gateway.config.loader import LoadedConfig, load_config, load_config_text
from gateway.config.yamlsrc import ConfigError, Issue
from gateway.history import History, atomic_write
from gateway.logs import event
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.reload.plan import plan_reload
from gateway.reload.worker import ConfigWorker, dismantle

if TYPE_CHECKING:
    from gateway.supervisor import Supervisor


def version_of(text: str) -> str:
    """The hash of routes.yaml's text alone: the config version of a config that reads no other
    files (see :func:`~gateway.config.loader.config_version`)."""
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


class ReloadHost(Protocol):
    """What the reloader needs of the running gateway (:class:`~gateway.runtime.Runtime` is one)."""

    @property
    def config(self) -> LoadedConfig: ...
    @property
    def config_path(self) -> str | None: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def supervisor(self) -> Supervisor: ...

    def swap_config(self, new: LoadedConfig) -> None:
        """Make ``new`` the running config and routing state, in one step with no await."""

    def apply_metrics(self, config: LoadedConfig) -> None:
        """Set the gauges and the zero series of ``config``."""


class Reloader:
    """Applies config changes to a running gateway, one at a time.

    It computes the :class:`~gateway.reload.plan.Plan` of each change and asks the host's
    :class:`~gateway.supervisor.Supervisor` to apply it.
    """

    def __init__(self, host: ReloadHost, *, history_dir: str | None = None):
        self.host = host
        self.log = logging.getLogger("gateway.reload")
        self.lock = asyncio.Lock()
        self.worker = ConfigWorker()
        #: Configs replaced (or never applied) that wait to be taken apart (:meth:`_retire`).
        self._graves: list[LoadedConfig] = []
        self._sweeper: asyncio.Task[None] | None = None
        state_dir = host.config.model.gateway.state_dir
        self.history = History(history_dir if history_dir is not None else os.path.join(state_dir, ".history"),
                               log=self.log)
        self.status = Status(version=host.config.version)
        #: Content hash of the last file contents a watcher acted on (so one bad save logs once).
        self.seen_on_disk = host.config.version

    # --- entry points ------------------------------------------------------------------------

    async def started(self) -> None:
        """Record the startup version in the history (unless it is already the newest)."""
        latest = self.history.latest()
        cfg = self.host.config
        if latest is None or latest.version != cfg.version:
            await asyncio.to_thread(self.history.record, cfg.version, cfg.source.text, "startup")

    async def from_file(self, by: str = "file", *, wait: bool = True) -> dict[str, Any]:
        """Re-read the config file and apply it if it changed. Raises ConfigError when invalid;
        with ``wait=False`` (the admin API), WorkerBusy when the config worker is full."""
        path = self._path()
        async with self.lock:
            try:
                new = await self.worker.run(functools.partial(load_config, path, self.host.registry), wait=wait,
                                            keep=True)
                _not_emptied(new, self.host.config, path)
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
            running = self.host.config.version
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
            if version_of(on_disk) != version_of(self.host.config.source.text):
                raise self._refused(ReloadRefused(
                    f"{os.path.basename(path)} on disk has changes that are not live "
                    f"(version {version_of(on_disk)}); apply or discard them first", current=running),
                    by, candidate, base)
            try:
                new = await self.worker.run(functools.partial(
                    load_config_text, text, file=path, base_dir=os.path.dirname(os.path.abspath(path)),
                    registry=self.host.registry), keep=True)
            except ConfigError as exc:
                self.record_invalid(exc, by, candidate)
                raise
            if new.version == running:
                self._retire(new)
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

    async def restore_running(self, seen: str, running: LoadedConfig) -> str:
        """Write the running config's text over the file on disk (a hand edit that is not live),
        provided the file still holds version ``seen`` and ``running`` is still the running
        config; returns the replaced version. :class:`ReloadRefused` (409; 503 when the file
        cannot be read) otherwise."""
        path = self._path()
        async with self.lock:
            try:
                on_disk = await asyncio.to_thread(_read_lenient, path)
            except OSError as exc:
                raise ReloadRefused(f"cannot read {path}: {exc.strerror}", status=503) from None
            if version_of(on_disk) != seen:
                raise ReloadRefused(f"{os.path.basename(path)} changed again (version {version_of(on_disk)} "
                                    f"is on disk, not {seen}); look at it again")
            if running is not self.host.config:
                raise ReloadRefused(f"version {self.host.config.version} was applied meanwhile; look again")
            try:
                await asyncio.to_thread(atomic_write, path, running.source.text)
            except OSError as exc:
                raise ReloadRefused(f"cannot write {path}: {exc.strerror or exc} (is it a read-only "
                                    "ConfigMap? change it at its source)") from None
            self.seen_on_disk = running.version
        return version_of(on_disk)

    # --- the apply -----------------------------------------------------------------------------

    async def _apply(self, new: LoadedConfig, by: str, note: str = "") -> dict[str, Any]:
        host = self.host
        old = host.config
        if new.version == old.version:
            self._retire(new)
            return self._unchanged(new, by)
        try:
            return await self._apply_changed(old, new, by, note)
        finally:
            self._retire(old if host.config is new else new)

    def _retire(self, config: LoadedConfig) -> None:
        """Have ``config`` (replaced, or never applied) taken apart in the config worker once no
        message uses it any more, instead of freed on the event loop by whichever reference goes
        last (a quarter second for 10,000 routes). See :func:`~gateway.reload.worker.dismantle`."""
        self._graves.append(config)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="config-sweeper")

    def close(self) -> None:
        """Stop taking old configs apart (the gateway stops: the process frees them)."""
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def _sweep(self) -> None:
        delay = 0.5
        while self._graves:
            await asyncio.sleep(delay)
            graves, self._graves = self._graves, []
            try:
                self._graves += await self.worker.run(functools.partial(dismantle, graves), wait=True)
            except RuntimeError:  # the worker was closed: the gateway is stopping
                return
            delay = min(delay * 2, 2.0)  # a look costs microseconds; a config waiting costs 100+ MiB

    async def _apply_changed(self, old: LoadedConfig, new: LoadedConfig, by: str, note: str) -> dict[str, Any]:
        host = self.host
        plan = plan_reload(old, new)
        deadline = time.monotonic() + new.model.gateway.drain
        started = time.monotonic()
        try:
            new_slots = await host.supervisor.apply(plan, new, deadline=deadline,
                                                    swap=lambda: host.swap_config(new))
        except Exception as exc:
            host.metrics.reloads.labels("failed").inc()
            self.status = Status("failed", new.version, by=by, errors=[{"message": f"{type(exc).__name__}: {exc}"}])
            event(self.log, "config.failed", logging.ERROR, by=by, version=new.version, error=str(exc))
            raise ReloadFailed(str(exc)) from exc
        host.apply_metrics(new)
        host.metrics.reloads.labels("applied").inc()
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

    # --- bookkeeping ---------------------------------------------------------------------------

    def _unchanged(self, new: LoadedConfig, by: str) -> dict[str, Any]:
        self.status = Status("unchanged", new.version, by=by)
        event(self.log, "config.unchanged", by=by, version=new.version)
        return {"outcome": "unchanged", "version": new.version, "by": by}

    def record_invalid(self, exc: ConfigError, by: str, version: str = "") -> None:
        """Count and log a config refused as invalid, with its issues (the running one stays)."""
        self.host.metrics.reloads.labels("invalid").inc()
        self.status = Status("invalid", self.host.config.version, by=by, errors=[i.as_dict() for i in exc.issues])
        event(self.log, "config.invalid", logging.ERROR, by=by, version=version, running=self.host.config.version,
              errors=len(exc.issues), first=str(exc.issues[0]) if exc.issues else "",
              issues=[str(i) for i in exc.issues[:_LOGGED_ISSUES]])

    def record_refused(self, reason: str, *, by: str, base: str, status: int, version: str = "") -> None:
        """Log an edit refused before it was validated: who, what (candidate and base versions), why."""
        event(self.log, "config.refused", logging.WARNING, by=by, version=version, base=base,
              running=self.host.config.version, status=status, reason=reason)

    def _refused(self, exc: ReloadRefused, by: str, version: str, base: str) -> ReloadRefused:
        self.record_refused(str(exc), by=by, base=base, status=exc.status, version=version)
        return exc

    def _path(self) -> str:
        if not self.host.config_path:
            raise ReloadRefused("this gateway was started without a config file", status=409)
        return self.host.config_path


def _not_emptied(new: LoadedConfig, running: LoadedConfig, path: str) -> None:
    """Refuse a file with no connectors and no routes in place of a running config that has some.

    That is what a file being rewritten in place looks like for a moment (an editor or a script
    that truncates, then writes), and applying it would stop every listener and every route; a
    gateway meant to do nothing is stopped, not reloaded."""
    if new.model.connectors or new.model.routes or not (running.model.connectors or running.model.routes):
        return
    raise ConfigError([Issue((), "the file has no connectors and no routes (being written?): not applied; "
                                 "the running config stays", line=1, file=os.path.basename(path))])


#: Issues a ``config.invalid`` log line lists (the API and ``gateway validate`` give them all).
_LOGGED_ISSUES = 20


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _read_lenient(path: str) -> str:
    """The file's text, undecodable bytes replaced (a hand edit may hold any bytes)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()
