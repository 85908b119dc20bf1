"""Alert-storm control on a route: alarm, dedupe, throttle and digest.

What an operator wants from a thousand sensor alerts is one readable email, not a thousand.
Each control is optional on a route and they apply in this order:

``alarm: {key, raise_when, clear_when}``
    Per key, fire once when ``raise_when`` becomes true (``attributes.alarm == "raised"``) and
    once more when ``clear_when`` becomes true (``"resolved"``); everything in between is
    suppressed.
``dedupe: {key, window}``
    The same key within the window passes once.
``throttle: {key, limit, window, then: drop | digest}``
    At most ``limit`` messages per key per window; the rest are dropped (counted) or folded
    into the key's digest.
``digest: {key, window, max_listed}``
    Without ``throttle``: every message is folded into its key's digest. At the end of the
    window one message is sent for the key: its ``data`` is the last event's data plus
    ``data.digest = {key, count, listed, first, last, events: [{id, subject, time, data}, …]}``,
    and ``attributes.digest`` is true, so one template can serve both (``{% if data.digest
    is defined %}…``). ``count`` is every message of the window; ``events`` lists the first
    ``max_listed`` of them (default 1,000) in the order they arrived, and ``listed`` says how
    many that is, so a template can say "and 2,345 more" when ``count > listed``. A digest that
    could not be sent is tried again every second with the same id.

Keys are templates (``"{{ subject }}"``, ``"{{ data.site }}"``). Decisions are made here, in
memory and without awaiting (atomic on the event loop); the state is kept by a
:class:`StormStore` (``gateway.delivery.stormstore``: a SQLite file in the state directory), so
a restart neither re-sends a storm nor forgets a raised alarm. What a message costs the store
does not grow with its window: a folded message is one appended row (none past ``max_listed``)
and an update of the window's summary; the events are read back only to send the digest, on the
store's thread. :meth:`StormControl.fold` returns once the message is durably in its digest, so
the sender is acknowledged only after that.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

from gateway.config.models import AlarmSpec, DedupeSpec, DigestSpec, ThrottleSpec
from gateway.envelope import Envelope, new_id
from gateway.routing.expr import Fn, compile_expression
from gateway.routing.template_bounds import BoundedEnvironment
from gateway.routing.templates import Template, make_environment
from gateway.tasks import InFlight

#: ``max_listed`` of a throttle's digest (``then: digest`` without a ``digest:``), and the default.
DEFAULT_MAX_LISTED: int = DigestSpec.model_fields["max_listed"].default

T = TypeVar("T")


@dataclass
class Decision:
    action: Literal["pass", "suppress", "digest"]
    reason: str = ""
    envelope: Envelope | None = None
    key: str = ""
    undo: Callable[[], None] | None = None


@dataclass
class _DigestRule:
    key: Template
    window: float
    max_listed: int


@dataclass
class _Compiled:
    route: str
    alarm: tuple[Template, Fn, Fn] | None = None
    dedupe: tuple[Template, float] | None = None
    throttle: tuple[Template, int, float, str] | None = None
    digest: _DigestRule | None = None


def compile_storm(route: str, dedupe: DedupeSpec | None, throttle: ThrottleSpec | None, digest: DigestSpec | None,
                  alarm: AlarmSpec | None, env: BoundedEnvironment | None = None) -> _Compiled | None:
    """Compile a route's controls; raises ``ValueError`` (ExpressionError/TemplateError) on bad input.

    ``env``: the environment of the keys' templates, shared by every route of a config (making
    one per route cost a fifth of a millisecond each); a new one when not given."""
    if not any((dedupe, throttle, digest, alarm)):
        return None
    env = env or make_environment()
    c = _Compiled(route)
    if alarm:
        c.alarm = (Template(env, alarm.key), compile_expression(alarm.raise_when), compile_expression(alarm.clear_when))
    if dedupe:
        c.dedupe = (Template(env, dedupe.key), dedupe.window)
    if throttle:
        c.throttle = (Template(env, throttle.key), throttle.limit, throttle.window, throttle.then)
        if throttle.then == "digest" and digest is None:
            c.digest = _DigestRule(Template(env, throttle.key), throttle.window, DEFAULT_MAX_LISTED)
    if digest:
        c.digest = _DigestRule(Template(env, digest.key), digest.window, digest.max_listed)
    return c


# --- what the store keeps -------------------------------------------------------------------


#: How long sending a finished window waits for the folds still being written into it.
FOLD_COMMIT_WAIT = 5.0


@dataclass
class DigestWindow:
    """One digest window's summary. The events themselves stay in the store."""

    #: Also the id of the digest message, so a digest sent again (after a failed send or a
    #: restart) keeps it and receivers can deduplicate.
    id: str
    route: str
    key: str
    window_end: float
    max_listed: int
    count: int = 0
    listed: int = 0
    #: The sequence number the next listed event gets (never reused, also after a failed fold).
    next_seq: int = 0
    first: float = 0.0
    last: float = 0.0
    #: Folds whose write has not committed yet: the window is read only once they have, or an
    #: acknowledged message would be left out of its digest and then forgotten with it.
    folding: InFlight = field(default_factory=InFlight, compare=False, repr=False)


@dataclass
class StormSnapshot:
    """Everything the store holds, as read on open (digest windows without their events)."""

    dedupe: dict[tuple[str, str], float] = field(default_factory=dict)  # (route, key) -> expires
    throttle: dict[tuple[str, str], tuple[float, int]] = field(default_factory=dict)  # -> (start, count)
    alarms: dict[tuple[str, str], bool] = field(default_factory=dict)
    digests: list[DigestWindow] = field(default_factory=list)


@dataclass
class StoredDigest:
    """A digest window as stored: what :meth:`StormControl.digest_envelope` builds the message from."""

    window: DigestWindow
    #: Envelope JSON of the window's newest message.
    last_envelope: str
    #: The listed events, ``{id, subject, time, data}``, in the order they arrived.
    events: list[dict[str, Any]]


class StormStore(Protocol):
    """Durable storm state. IO happens off the event loop; writes are applied in call order."""

    async def open(self) -> StormSnapshot:
        """Open (creating or migrating the file) and read everything back."""

    def put(self, kind: Literal["dedupe", "throttle", "alarm"], route: str, key: str, value: Any) -> None:
        """Queue a small value (``None`` deletes it); stored with the next group of writes."""

    async def add_to_digest(self, window: DigestWindow, env: Envelope, seq: int | None, at: float) -> None:
        """Count ``env`` in ``window`` (listed under ``seq`` unless that is None); durable on return."""

    async def read_digest(self, window_id: str, build: Callable[[StoredDigest], T]) -> T | None:
        """``build(stored window)`` on the store's thread (None: nothing stored for it)."""

    async def forget_digest(self, window_id: str) -> None:
        """Delete a sent window and its events."""

    async def close(self) -> None:
        """Finish the queued writes and close."""


# --- decisions ---------------------------------------------------------------------------


class StormControl:
    """Applies compiled controls; ``emit(route, envelope)`` sends a finished digest."""

    def __init__(self, store: StormStore, emit: Callable[[str, Envelope], Awaitable[bool]],
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.emit = emit
        self.clock = clock
        self.dedupe: dict[tuple[str, str], float] = {}
        self.throttle: dict[tuple[str, str], tuple[float, int]] = {}
        self.alarms: dict[tuple[str, str], bool] = {}
        #: The open window of each (route, key); a new message joins it.
        self.digests: dict[tuple[str, str], DigestWindow] = {}
        #: Windows that ended and wait to be sent, oldest first.
        self.due: list[DigestWindow] = []
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open the store and take up its state (windows that ended while stopped are sent next)."""
        snap = await self.store.open()
        self.dedupe, self.throttle, self.alarms = snap.dedupe, snap.throttle, snap.alarms
        for w in sorted(snap.digests, key=lambda w: w.window_end):
            older = self.digests.get((w.route, w.key))
            if older is not None:  # one window per key is open; the older one was being sent
                self.due.append(older)
            self.digests[(w.route, w.key)] = w

    def admit(self, c: _Compiled, env: Envelope, scope: dict[str, Any]) -> Decision:
        """Decide without awaiting, so concurrent messages see each other's effect."""
        now = self.clock()
        put = self.store.put
        if c.alarm:
            tpl, raise_when, clear_when = c.alarm
            key = tpl.render(scope)
            raised = self.alarms.get((c.route, key), False)
            if not raised and raise_when(scope):
                self.alarms[(c.route, key)] = True
                put("alarm", c.route, key, True)
                env = env.evolve(attributes={**env.attributes, "alarm": "raised", "alarm_key": key})
                scope = {**scope, "attributes": env.attributes}
            elif raised and clear_when(scope):
                self.alarms[(c.route, key)] = False
                put("alarm", c.route, key, False)
                env = env.evolve(attributes={**env.attributes, "alarm": "resolved", "alarm_key": key})
                scope = {**scope, "attributes": env.attributes}
            else:
                return Decision("suppress", "alarm unchanged", key=key)
        undo: list[Callable[[], None]] = []
        if c.dedupe:
            tpl, window = c.dedupe
            key = tpl.render(scope)
            expires = self.dedupe.get((c.route, key), 0.0)
            if expires > now:
                return Decision("suppress", "duplicate within the dedupe window", key=key)
            self.dedupe[(c.route, key)] = now + window
            put("dedupe", c.route, key, now + window)

            def undo_dedupe(k: str = key, old: float = expires) -> None:
                if old:
                    self.dedupe[(c.route, k)] = old
                else:
                    self.dedupe.pop((c.route, k), None)
                put("dedupe", c.route, k, old or None)

            undo.append(undo_dedupe)
        if c.throttle:
            tpl, limit, window, then = c.throttle
            key = tpl.render(scope)
            start, count = self.throttle.get((c.route, key), (now, 0))
            if now - start >= window:
                start, count = now, 0
            if count >= limit:
                if then == "digest":
                    return Decision("digest", "over the throttle limit", env, key=self._digest_key(c, scope))
                return Decision("suppress", "over the throttle limit", key=key)
            self.throttle[(c.route, key)] = (start, count + 1)
            put("throttle", c.route, key, [start, count + 1])
            return Decision("pass", envelope=env, undo=_chain(undo))
        if c.digest:
            return Decision("digest", "folded into the digest", env, key=self._digest_key(c, scope))
        return Decision("pass", envelope=env, undo=_chain(undo))

    @staticmethod
    def _digest_key(c: _Compiled, scope: dict[str, Any]) -> str:
        assert c.digest is not None
        return c.digest.key.render(scope)

    async def fold(self, c: _Compiled, key: str, env: Envelope) -> None:
        """Add ``env`` to its digest, durably (the sender is acknowledged after this)."""
        assert c.digest is not None
        now = self.clock()
        w = self.digests.get((c.route, key))
        if w is None:
            w = self.digests[(c.route, key)] = DigestWindow(new_id(), c.route, key, now + c.digest.window,
                                                             c.digest.max_listed, first=now)
        w.count += 1
        w.last = now
        seq = None
        if w.listed < w.max_listed:
            seq, w.next_seq = w.next_seq, w.next_seq + 1
            w.listed += 1
        try:
            with w.folding:
                await self.store.add_to_digest(w, env, seq, now)
        except BaseException:
            # Not stored, so not in the digest: the sender is refused and retries.
            w.count -= 1
            if seq is not None:
                w.listed -= 1
            raise

    def digest_envelope(self, stored: StoredDigest) -> Envelope:
        """The digest message. Runs on the store's thread: its size grows with the window."""
        w = stored.window
        last = Envelope.from_json(stored.last_envelope)
        base = last.data_or_none()
        data = dict(base) if isinstance(base, dict) else {}
        data["digest"] = {"key": w.key, "count": w.count, "listed": len(stored.events),
                          "first": _iso(w.first), "last": _iso(w.last), "events": stored.events}
        body = json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
        digest = last.evolve(id=w.id, body=body, content_type="application/json",
                             attributes={**last.attributes, "digest": True})
        digest.__dict__["data"] = data  # Envelope.data, parsed already: the loop need not parse it again
        return digest

    async def flush_due(self, force: bool = False) -> int:
        """Emit every digest whose window ended. Returns how many were sent."""
        now = self.clock()
        for rk, w in list(self.digests.items()):
            if force or w.window_end <= now:
                # Detached before awaiting: a message folded while this one is being sent starts
                # the key's next window instead of joining one that is already read.
                del self.digests[rk]
                self.due.append(w)
        sent = 0
        for w in list(self.due):
            if not await w.folding.drained(FOLD_COMMIT_WAIT):
                return sent  # a write that has not committed yet: read the window on the next tick
            env = await self.store.read_digest(w.id, self.digest_envelope)
            if env is not None and not await self.emit(w.route, env):
                return sent  # tried again on the next tick, oldest first
            await self.store.forget_digest(w.id)
            self.due.remove(w)
            sent += env is not None
        return sent

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_due()
            except Exception:  # a failed emit is retried on the next tick; the window stays stored
                await asyncio.sleep(interval)

    def start(self, interval: float = 1.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(interval), name="storm-digests")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


def _chain(undos: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not undos:
        return None

    def run() -> None:
        for u in reversed(undos):
            u()

    return run


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
