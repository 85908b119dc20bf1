"""The supervisor: owns the connector slots and their lifecycle, and applies a reload plan to them.

Each configured connector lives in a :class:`ConnectorSlot` (its instance, whether it is a route's
source, its state). The supervisor makes connectors, opens them, keeps each inbound one listening
(retrying with backoff and jitter, forever, while reporting it down), stops them listening and
closes them. The runtime composes it and decides the order of the whole gateway's start and stop;
the reloader computes a :class:`~gateway.reload.plan.Plan` and hands it to :meth:`Supervisor.apply`,
which opens what is added, drains what is replaced or removed, and lets the caller swap the
routing state at the one moment it is safe.

Shared HTTP paths (:class:`Mounts`): while a connector is replaced, its paths answer ``503`` +
``Retry-After`` instead of ``404``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.config.loader import LoadedConfig
from gateway.contract import Connector, ConnectorContext, Health, HttpMount
from gateway.delivery.engine import Delivery
from gateway.delivery.store import SpoolBackend
from gateway.http import HttpHub, Receive, Scope, Send, send_problem
from gateway.logs import event
from gateway.reload.plan import Plan, inbound_names

#: Inbound kinds that serve a port of this pod: REST and SOAP on the shared HTTP listeners, SMTP on
#: its own. Listening, they take work whatever any peer is doing, and a replica whose listener is
#: not up would refuse the connections its Service sends it, so every one must be up for the pod
#: to be ready. Every other inbound kind (MQTT, AMQP, IMAP, POP3 and XMPP consumers, file and
#: maildir pollers) is a client of something outside the pod: it takes work only while connected,
#: and a down broker is down for every replica alike. Those make the pod ready only when it has
#: no listener, and then while at least one of them is up.
LISTENER_KINDS = frozenset({"rest", "soap", "smtp"})


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

    def status(self) -> dict[str, Any]:
        """What /readyz shows for this connector: ``state`` is ``up`` only while it is started
        *and* its health check passes (``down`` when either fails), so ``up`` never contradicts it."""
        h = self.health()
        state = "up" if h.up else ("down" if self.state == "up" else self.state)
        return {"state": state, "up": h.up, "detail": h.detail, "inbound": self.inbound,
                "kind": type(self.connector).kind}

    @property
    def listener(self) -> bool:
        """An inbound side that serves a port of this pod (see :data:`LISTENER_KINDS`)."""
        return self.inbound and type(self.connector).kind in LISTENER_KINDS


class Supervisor:
    """The connector slots of one running gateway and everything that starts, watches or stops them.

    ``delivery`` is where inbound connectors hand their messages and what drains outbound sends;
    ``accepting`` is every connector's :attr:`~gateway.contract.ConnectorContext.accepting`.
    """

    def __init__(self, *, http: HttpHub, delivery: Delivery, spool: SpoolBackend,
                 accepting: Callable[[], bool], log: logging.Logger, worker: int = 0, workers: int = 1):
        self.http = http
        #: This process's index among the gateway's worker processes, and their number.
        self.worker, self.workers = worker, workers
        self.delivery = delivery
        self.spool = spool
        self.accepting = accepting
        self.log = log
        self.slots: dict[str, ConnectorSlot] = {}
        self.mounts = Mounts(http)
        #: Set by :meth:`stop_listening`: a connector that is down is no longer retried.
        self.stopping = False
        self._rng = random.Random()

    def _inbound_here(self, config: LoadedConfig) -> set[str]:
        """The route sources that listen in this process: all of them in worker 0, only those
        whose kind shares its inbound side (:attr:`~gateway.contract.Connector.shares_inbound`)
        in the other workers (two processes polling one mailbox would take each mail twice)."""
        names = inbound_names(config)
        if self.worker == 0:
            return set(names)
        return {n for n in names if config.kinds[n].shares_inbound}

    def connector(self, name: str) -> Connector | None:
        slot = self.slots.get(name)
        return slot.connector if slot is not None else None

    def make(self, name: str, config: LoadedConfig, *, http: HttpMount | None = None) -> Connector:
        cls = config.kinds[name]
        state_dir = os.path.join(config.model.gateway.state_dir, name)
        ctx = ConnectorContext(name=name, logger=logging.getLogger(f"gateway.connector.{name}"),
                               http=http or self.http, state_dir=state_dir, accepting=self.accepting,
                               dead_letter=self.delivery.dead_letter_inbound, worker=self.worker,
                               workers=self.workers)
        return cls(config.connectors[name], ctx)

    # --- start and stop ------------------------------------------------------------------------

    async def start(self, config: LoadedConfig) -> None:
        """Make every connector of ``config``, open them all (outbound first: every connector opens
        before any inbound listens), start delivery to the outbound ones, then listen; returns once
        the inbound ones have settled (up or down) or after about a second."""
        inbound = self._inbound_here(config)
        for name in config.connectors:
            self.slots[name] = ConnectorSlot(name, self.make(name, config), inbound=name in inbound)
        await asyncio.gather(*(self.open(slot) for slot in self.slots.values()))
        await self.delivery.start([n for n, s in self.slots.items() if type(s.connector).supports_outbound])
        for slot in self.slots.values():
            if slot.inbound and slot.task is None:
                self.listen(slot)
        # Give inbound connectors a moment to mount their HTTP apps before the listeners start.
        await asyncio.sleep(0)
        for _ in range(50):
            if all(s.state != "starting" for s in self.slots.values() if s.inbound):
                break
            await asyncio.sleep(0.02)

    async def open(self, slot: ConnectorSlot) -> None:
        """Open the connector; one that fails is reported down and retried in the background."""
        try:
            await slot.connector.open()
            if not slot.inbound:
                slot.state = "up"
        except Exception as exc:
            slot.state, slot.error = "down", f"open failed: {exc}"
            event(self.log, "connector.down", logging.WARNING, connector=slot.name, error=str(exc))
            if slot.task is None:
                slot.task = asyncio.create_task(self._supervise(slot, opened=False), name=f"connector-{slot.name}")

    def listen(self, slot: ConnectorSlot) -> None:
        """Start the task that keeps an opened inbound connector listening."""
        slot.task = asyncio.create_task(self._supervise(slot), name=f"connector-{slot.name}")

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

    async def stop_listening(self, deadline: float) -> None:
        """Stop retrying, and let every inbound connector stop taking messages and drain by ``deadline``."""
        self.stopping = True
        for slot in self.slots.values():
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
        await asyncio.gather(*(self._stop_listening(s, deadline) for s in self.slots.values() if s.inbound))

    async def _stop_listening(self, slot: ConnectorSlot, deadline: float) -> None:
        try:
            await asyncio.wait_for(slot.connector.stop_listening(max(0.0, deadline - time.monotonic())),
                                   timeout=max(0.1, deadline - time.monotonic() + 1))
        except Exception as exc:
            event(self.log, "connector.stop_failed", logging.WARNING, connector=slot.name, error=str(exc))

    async def close(self) -> None:
        """Close every connector (each within 5 s); call after delivery has drained."""
        for slot in self.slots.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(slot.connector.close(), timeout=5)
            slot.state = "stopped"

    # --- reload ----------------------------------------------------------------------------------

    async def apply(self, plan: Plan, new: LoadedConfig, *, deadline: float,
                    swap: Callable[[], None]) -> dict[str, ConnectorSlot]:
        """Apply ``plan`` (from the running config to ``new``) to the connectors.

        ``swap`` makes ``new`` the running config: it is called once, with no await around it,
        after what is added is open and what is replaced or removed has stopped taking messages,
        and before those drain. Unchanged connectors are not touched. Returns the slots that
        (re)started or started listening, each in the state it reached.
        """
        new_in = self._inbound_here(new)
        # 1. Added connectors open first: the new routes may name them from the first message on.
        added = {n: ConnectorSlot(n, self.make(n, new, http=self.mounts.for_connector()), inbound=n in new_in)
                 for n in sorted(plan.added)}
        await asyncio.gather(*(self.open(s) for s in added.values()))
        # 2. What is replaced or removed stops taking messages and drains its in-flight ones.
        retiring = [self.slots[n] for n in sorted(plan.restart | plan.removed) if n in self.slots]
        for slot in retiring:
            slot.connector.ctx.http = self.mounts.retiring()
            if slot.task is not None and not slot.task.done():
                slot.task.cancel()
        quiet = [self.slots[n] for n in sorted(plan.stop_listening)]
        await asyncio.gather(*(self._stop_listening(s, deadline) for s in [*retiring, *quiet] if s.inbound))
        for slot in quiet:
            slot.inbound = False
        # 3. The swap: no await in between. In-flight messages keep their snapshot.
        swap()
        self.slots.update(added)
        # 4. Drain the sends of what is replaced or removed, close it, open the replacement.
        await asyncio.gather(*(self._retire(s, new, removed=s.name in plan.removed, deadline=deadline)
                               for s in retiring))
        replaced = {n: ConnectorSlot(n, self.make(n, new, http=self.mounts.for_connector()), inbound=n in new_in)
                    for n in sorted(plan.restart)}
        await asyncio.gather(*(self.open(s) for s in replaced.values()))
        for name in plan.removed:
            self.slots.pop(name, None)
        self.slots.update(replaced)
        fresh = {**added, **replaced}
        # 5. Listen: replacements, additions, and unchanged connectors that became a route's source.
        for name in sorted(set(fresh) | plan.start_listening):
            slot = self.slots[name]
            if name in plan.start_listening and name in new_in:
                slot.inbound = True
            if slot.inbound and slot.state != "down" and (slot.task is None or slot.task.done()):
                self.listen(slot)
        await self.delivery.start([n for n, s in fresh.items() if type(s.connector).supports_outbound])
        await self.http.start()
        listening = [self.slots[n] for n in sorted(set(fresh) | plan.start_listening) if self.slots[n].inbound]
        end = time.monotonic() + 5.0
        while any(s.state == "starting" for s in listening) and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self.mounts.clear_placeholders()
        return {n: self.slots[n] for n in sorted(set(fresh) | plan.start_listening)}

    async def _retire(self, slot: ConnectorSlot, new: LoadedConfig, *, removed: bool, deadline: float) -> None:
        """Let the sends in flight on the connector finish (and, if it is removed, its spooled
        jobs), then close it. Sends that still reach it after that fail as transient and are
        retried on the replacement."""
        name = slot.name
        if type(slot.connector).supports_outbound:
            spooled, direct = self._inflight(name, new)
            direct_until = min(deadline, time.monotonic() + 1.0)
            while time.monotonic() < deadline:
                now_spooled, now_direct = self._inflight(name, new)
                busy = bool(spooled & now_spooled) or (now_direct > 0 and direct > 0
                                                       and time.monotonic() < direct_until)
                if removed and not busy:
                    busy = (await self.spool.depth()).get(name, (0, 0.0))[0] > 0
                if not busy:
                    break
                await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(slot.connector.close(), timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            event(self.log, "connector.close_failed", logging.WARNING, connector=name, error=str(exc))
        slot.state = "stopped"

    def _inflight(self, connector: str, config: LoadedConfig) -> tuple[set[int], int]:
        """(ids of spooled jobs being sent on ``connector``, direct sends that may be on it).

        ``Delivery`` tracks spooled sends per connector but direct ones only in total, so every
        direct send counts when some direct route of ``config`` targets the connector.
        """
        spooled, direct = self.delivery.sending(connector)
        if not any(r.mode == "direct" and any(t.connector == connector for t in r.targets)
                   for r in config.router.routes):
            direct = 0
        return spooled, direct


# --- shared HTTP paths across a restart ------------------------------------------------------------


def _key(listen: str, prefix: str) -> tuple[str, str]:
    return listen, "/" + prefix.strip("/") if prefix.strip("/") else "/"


async def _reloading(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send_problem(send, 503, "Service Unavailable", "this endpoint is being reloaded; retry shortly",
                           [(b"retry-after", b"1")])


class Mounts:
    """Keeps a shared HTTP path answering ``503`` (retry) while its connector is replaced.

    Connectors made by a reload mount through :meth:`for_connector`. A connector being retired
    gets :meth:`retiring`: its ``unmount`` leaves a 503 placeholder, or does nothing when a newer
    connector already serves that path; the replacement's ``mount`` removes the placeholder.
    """

    def __init__(self, hub: HttpHub):
        self.hub = hub
        self._claims: dict[tuple[str, str], _ConnectorMounts] = {}
        self._placeholders: set[tuple[str, str]] = set()

    def for_connector(self) -> _ConnectorMounts:
        return _ConnectorMounts(self, retiring=False)

    def retiring(self) -> _ConnectorMounts:
        return _ConnectorMounts(self, retiring=True)

    def clear_placeholders(self) -> None:
        for key in self._placeholders:
            self.hub.unmount(*key)
        self._placeholders.clear()


class _ConnectorMounts:
    """The :class:`~gateway.contract.HttpMount` one connector sees."""

    def __init__(self, mounts: Mounts, *, retiring: bool):
        self._m = mounts
        self._retiring = retiring

    def mount(self, listen: str, prefix: str, app: Any, *, owner: str) -> None:
        key = _key(listen, prefix)
        if key in self._m._placeholders:
            self._m.hub.unmount(*key)
            self._m._placeholders.discard(key)
        self._m.hub.mount(listen, prefix, app, owner=owner)
        self._m._claims[key] = self

    def unmount(self, listen: str, prefix: str) -> None:
        key = _key(listen, prefix)
        holder = self._m._claims.get(key)
        if holder is not None and holder is not self:
            return  # a newer connector serves this path now
        self._m._claims.pop(key, None)
        self._m.hub.unmount(*key)
        if self._retiring:
            self._m.hub.mount(listen, prefix, _reloading, owner="reload")
            self._m._placeholders.add(key)
