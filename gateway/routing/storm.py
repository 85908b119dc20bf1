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
``digest: {key, window}``
    Without ``throttle``: every message is folded into its key's digest. At the end of the
    window one message is sent for the key: its ``data`` is the last event's data plus
    ``data.digest = {key, count, first, last, events: [{id, subject, time, data}, …]}``,
    and ``attributes.digest`` is true, so one template can serve both (``{% if data.digest
    is defined %}…``).

Keys are templates (``"{{ subject }}"``, ``"{{ data.site }}"``). State lives in a SQLite file
in the gateway's state directory, so a restart neither re-sends a storm nor forgets a raised
alarm. Decisions are made in memory without awaiting (atomic on the event loop) and written
through to disk; a digest is stored durably before the sender is acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.config.models import AlarmSpec, DedupeSpec, DigestSpec, ThrottleSpec
from gateway.envelope import Envelope
from gateway.routing.expr import Fn, compile_expression
from gateway.routing.templates import Template, make_environment

MAX_DIGEST_EVENTS = 1000


@dataclass
class Decision:
    action: Literal["pass", "suppress", "digest"]
    reason: str = ""
    envelope: Envelope | None = None
    key: str = ""
    undo: Callable[[], None] | None = None


@dataclass
class _Compiled:
    route: str
    alarm: tuple[Template, Fn, Fn] | None = None
    dedupe: tuple[Template, float] | None = None
    throttle: tuple[Template, int, float, str] | None = None
    digest: tuple[Template, float] | None = None


def compile_storm(route: str, dedupe: DedupeSpec | None, throttle: ThrottleSpec | None, digest: DigestSpec | None,
                  alarm: AlarmSpec | None) -> _Compiled | None:
    """Compile a route's controls; raises ``ValueError`` (ExpressionError/TemplateError) on bad input."""
    if not any((dedupe, throttle, digest, alarm)):
        return None
    env = make_environment()
    c = _Compiled(route)
    if alarm:
        c.alarm = (Template(env, alarm.key), compile_expression(alarm.raise_when), compile_expression(alarm.clear_when))
    if dedupe:
        c.dedupe = (Template(env, dedupe.key), dedupe.window)
    if throttle:
        c.throttle = (Template(env, throttle.key), throttle.limit, throttle.window, throttle.then)
        if throttle.then == "digest" and digest is None:
            c.digest = (Template(env, throttle.key), throttle.window)
    if digest:
        c.digest = (Template(env, digest.key), digest.window)
    return c


@dataclass
class _DigestBuffer:
    route: str
    key: str
    window_end: float
    events: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    last_env: str = ""  # Envelope JSON of the newest event


class StormState:
    """Durable state of every route's controls (one SQLite file, WAL)."""

    def __init__(self, path: str):
        self.path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storm")
        self._db: sqlite3.Connection | None = None
        self.dedupe: dict[tuple[str, str], float] = {}  # (route, key) -> expires
        self.throttle: dict[tuple[str, str], tuple[float, int]] = {}  # -> (window_start, count)
        self.alarms: dict[tuple[str, str], bool] = {}
        self.digests: dict[tuple[str, str], _DigestBuffer] = {}

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS kv (kind TEXT, route TEXT, key TEXT, value TEXT, "
                   "PRIMARY KEY (kind, route, key))")
        now = time.time()
        for kind, route, key, value in db.execute("SELECT kind, route, key, value FROM kv").fetchall():
            v = json.loads(value)
            if kind == "dedupe" and v > now:
                self.dedupe[(route, key)] = v
            elif kind == "throttle":
                self.throttle[(route, key)] = (v[0], v[1])
            elif kind == "alarm":
                self.alarms[(route, key)] = bool(v)
            elif kind == "digest":
                self.digests[(route, key)] = _DigestBuffer(route=route, key=key, **v)
        self._db = db

    async def save(self, kind: str, route: str, key: str, value: Any) -> None:
        """Write through; durable (fsync) when this returns."""
        text = json.dumps(value, default=str)

        def op() -> None:
            assert self._db is not None
            if value is None:
                self._db.execute("DELETE FROM kv WHERE kind=? AND route=? AND key=?", (kind, route, key))
            else:
                self._db.execute("INSERT OR REPLACE INTO kv (kind, route, key, value) VALUES (?,?,?,?)",
                                 (kind, route, key, text))

        await asyncio.get_running_loop().run_in_executor(self._pool, op)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._pool, db.close)
        self._pool.shutdown(wait=True)


class StormControl:
    """Applies compiled controls; ``emit(route, envelope)`` sends a finished digest."""

    def __init__(self, state: StormState, emit: Callable[[str, Envelope], Awaitable[bool]],
                 clock: Callable[[], float] = time.time):
        self.state = state
        self.emit = emit
        self.clock = clock
        self._task: asyncio.Task[None] | None = None
        self._pending_writes: set[asyncio.Task[None]] = set()

    def _write(self, kind: str, route: str, key: str, value: Any) -> None:
        task = asyncio.ensure_future(self.state.save(kind, route, key, value))
        self._pending_writes.add(task)
        task.add_done_callback(self._pending_writes.discard)

    def admit(self, c: _Compiled, env: Envelope, scope: dict[str, Any]) -> Decision:
        """Decide without awaiting, so concurrent messages see each other's effect."""
        now = self.clock()
        st = self.state
        if c.alarm:
            tpl, raise_when, clear_when = c.alarm
            key = tpl.render(scope)
            raised = st.alarms.get((c.route, key), False)
            if not raised and raise_when(scope):
                st.alarms[(c.route, key)] = True
                self._write("alarm", c.route, key, True)
                env = env.evolve(attributes={**env.attributes, "alarm": "raised", "alarm_key": key})
                scope = {**scope, "attributes": env.attributes}
            elif raised and clear_when(scope):
                st.alarms[(c.route, key)] = False
                self._write("alarm", c.route, key, False)
                env = env.evolve(attributes={**env.attributes, "alarm": "resolved", "alarm_key": key})
                scope = {**scope, "attributes": env.attributes}
            else:
                return Decision("suppress", "alarm unchanged", key=key)
        undo: list[Callable[[], None]] = []
        if c.dedupe:
            tpl, window = c.dedupe
            key = tpl.render(scope)
            expires = st.dedupe.get((c.route, key), 0.0)
            if expires > now:
                return Decision("suppress", "duplicate within the dedupe window", key=key)
            st.dedupe[(c.route, key)] = now + window
            self._write("dedupe", c.route, key, now + window)

            def undo_dedupe(k: str = key, old: float = expires) -> None:
                if old:
                    st.dedupe[(c.route, k)] = old
                else:
                    st.dedupe.pop((c.route, k), None)
                self._write("dedupe", c.route, k, old or None)

            undo.append(undo_dedupe)
        if c.throttle:
            tpl, limit, window, then = c.throttle
            key = tpl.render(scope)
            start, count = st.throttle.get((c.route, key), (now, 0))
            if now - start >= window:
                start, count = now, 0
            if count >= limit:
                if then == "digest":
                    return Decision("digest", "over the throttle limit", env, key=self._digest_key(c, scope))
                return Decision("suppress", "over the throttle limit", key=key)
            st.throttle[(c.route, key)] = (start, count + 1)
            self._write("throttle", c.route, key, [start, count + 1])
            return Decision("pass", envelope=env, undo=_chain(undo))
        if c.digest:
            return Decision("digest", "folded into the digest", env, key=self._digest_key(c, scope))
        return Decision("pass", envelope=env, undo=_chain(undo))

    @staticmethod
    def _digest_key(c: _Compiled, scope: dict[str, Any]) -> str:
        assert c.digest is not None
        return c.digest[0].render(scope)

    async def fold(self, c: _Compiled, key: str, env: Envelope) -> None:
        """Add ``env`` to its digest, durably (the sender is acknowledged after this)."""
        assert c.digest is not None
        now = self.clock()
        buf = self.state.digests.get((c.route, key))
        if buf is None:
            buf = self.state.digests[(c.route, key)] = _DigestBuffer(c.route, key, now + c.digest[1], first=now)
        buf.count += 1
        buf.last = now
        buf.last_env = env.to_json()
        if len(buf.events) < MAX_DIGEST_EVENTS:
            buf.events.append({"id": env.id, "subject": env.subject, "time": env.time.isoformat(),
                               "data": env.data_or_none() if not isinstance(env.data_or_none(), bytes) else None})
        await self.state.save("digest", c.route, key, _stored(buf))

    def digest_envelope(self, buf: _DigestBuffer) -> Envelope:
        last = Envelope.from_json(buf.last_env)
        base = last.data_or_none()
        data = dict(base) if isinstance(base, dict) else {}
        # Folds finish in completion order; the digest lists events in the order they arrived.
        events = sorted(buf.events, key=lambda e: str(e.get("time", "")))
        data["digest"] = {"key": buf.key, "count": buf.count,
                          "first": _iso(buf.first), "last": _iso(buf.last), "events": events}
        body = json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
        return last.evolve(id=_digest_id(last), body=body, content_type="application/json",
                           attributes={**last.attributes, "digest": True})

    async def flush_due(self, force: bool = False) -> int:
        """Emit every digest whose window ended. Returns how many were sent."""
        now = self.clock()
        sent = 0
        for (route, key), buf in list(self.state.digests.items()):
            if not force and buf.window_end > now:
                continue
            # Detach before awaiting: an alert folded while the digest is being sent starts the
            # next window instead of being lost with this one.
            self.state.digests.pop((route, key), None)
            if await self.emit(route, self.digest_envelope(buf)):
                sent += 1
                nxt = self.state.digests.get((route, key))
                await self.state.save("digest", route, key, None if nxt is None else _stored(nxt))
            else:
                nxt = self.state.digests.get((route, key))
                if nxt is not None:  # merge what arrived meanwhile; retried on the next tick
                    buf.events.extend(nxt.events[: max(0, MAX_DIGEST_EVENTS - len(buf.events))])
                    buf.count += nxt.count
                    buf.last, buf.last_env = nxt.last, nxt.last_env
                self.state.digests[(route, key)] = buf
        return sent

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_due()
            except Exception:  # a failed emit is retried on the next tick; the buffer stays
                await asyncio.sleep(interval)

    def start(self, interval: float = 1.0) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(interval), name="storm-digests")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._pending_writes:
            await asyncio.gather(*self._pending_writes, return_exceptions=True)


def _stored(buf: _DigestBuffer) -> dict[str, Any]:
    return {"window_end": buf.window_end, "events": buf.events, "count": buf.count, "first": buf.first,
            "last": buf.last, "last_env": buf.last_env}


def _chain(undos: list[Callable[[], None]]) -> Callable[[], None] | None:
    if not undos:
        return None

    def run() -> None:
        for u in reversed(undos):
            u()

    return run


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()


def _digest_id(last: Envelope) -> str:
    from gateway.envelope import new_id

    return new_id()
