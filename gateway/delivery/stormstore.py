"""The storm controls' durable state: a SQLite file written in groups from one thread.

Implements :class:`gateway.routing.storm.StormStore`. Tables:

``kv (kind, route, key, value)``
    dedupe expiries, throttle windows and raised alarms: one small JSON value per key.
``digest_window (id, route, key, window_end, count, listed, first, last, last_envelope)``
    each digest window's summary, updated in place.
``digest_event (window, seq, time, event)``
    the listed events of each window, appended (one row per event, none past ``max_listed``).

Every call is queued to one thread (:class:`gateway.groupthread.GroupThread`), which takes all
that is waiting, applies it in one transaction and commits once (one fsync for the group), then
answers the callers: a storm of alerts costs a small, constant amount of work each, and the
loop neither serializes nor waits on anything that grows with a window. Writes are applied in
the order they were made. :meth:`add_to_digest` returns when its group is committed
(``synchronous=FULL``, WAL), so a message acknowledged after it survives ``kill -9``.
:meth:`put` does not wait: a dedupe mark or alarm lost to a crash makes a message pass again
(at least once), never lose one.

A file written by the single-table layout (digests as one JSON row of ``kv`` each) is migrated
in the transaction that opens it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from gateway.envelope import Envelope, new_id
from gateway.groupthread import GroupThread
from gateway.logs import event
from gateway.routing.storm import DEFAULT_MAX_LISTED, DigestWindow, StoredDigest, StormSnapshot

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (kind TEXT, route TEXT, key TEXT, value TEXT, PRIMARY KEY (kind, route, key));
CREATE TABLE IF NOT EXISTS digest_window (
    id TEXT PRIMARY KEY, route TEXT NOT NULL, key TEXT NOT NULL, window_end REAL NOT NULL,
    max_listed INTEGER NOT NULL, count INTEGER NOT NULL, listed INTEGER NOT NULL,
    first REAL NOT NULL, last REAL NOT NULL, last_envelope TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS digest_event (
    window TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL, event TEXT NOT NULL,
    PRIMARY KEY (window, seq)) WITHOUT ROWID;
"""


@dataclass
class _Put:
    kind: str
    route: str
    key: str
    value: Any


@dataclass
class _Fold:
    window: DigestWindow
    env: Envelope
    seq: int | None
    at: float


@dataclass
class _Read:
    window_id: str
    build: Callable[[StoredDigest], Any]


@dataclass
class _Forget:
    window_id: str


_Item = _Put | _Fold | _Read | _Forget


class SqliteStormStore:
    """Storm state in one SQLite file (WAL, ``synchronous=FULL``), written from one thread."""

    def __init__(self, path: str, log: logging.Logger | None = None):
        self.path = path
        self.log = log or logging.getLogger("gateway.storm")
        self._db: sqlite3.Connection | None = None
        self._thread: GroupThread[_Item, Any] = GroupThread("storm-store", self._handle)

    async def open(self) -> StormSnapshot:
        self._thread.start()
        return await asyncio.to_thread(self._open)

    def put(self, kind: Literal["dedupe", "throttle", "alarm"], route: str, key: str, value: Any) -> None:
        fut = self._thread.submit(_Put(kind, route, key, value))
        fut.add_done_callback(self._put_done)

    async def add_to_digest(self, window: DigestWindow, env: Envelope, seq: int | None, at: float) -> None:
        await self._thread.submit(_Fold(window, env, seq, at))

    async def read_digest(self, window_id: str, build: Callable[[StoredDigest], T]) -> T | None:
        result: T | None = await self._thread.submit(_Read(window_id, build))
        return result

    async def forget_digest(self, window_id: str) -> None:
        await self._thread.submit(_Forget(window_id))

    async def close(self) -> None:
        await self._thread.stop()
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    def _put_done(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            event(self.log, "storm.state_write_failed", logging.WARNING, error=str(fut.exception()))

    # --- on the store's thread ---------------------------------------------------------------

    def _open(self) -> StormSnapshot:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        now = time.time()
        snap = StormSnapshot()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM kv WHERE kind='dedupe' AND CAST(value AS REAL) <= ?", (now,))
            _migrate_digests(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for kind, route, key, value in db.execute("SELECT kind, route, key, value FROM kv"):
            v = json.loads(value)
            if kind == "dedupe":
                snap.dedupe[(route, key)] = float(v)
            elif kind == "throttle":
                snap.throttle[(route, key)] = (v[0], v[1])
            elif kind == "alarm":
                snap.alarms[(route, key)] = bool(v)
        rows = db.execute("SELECT id, route, key, window_end, max_listed, count, listed, first, last, "
                          "(SELECT max(seq) FROM digest_event WHERE window = id) FROM digest_window").fetchall()
        for wid, route, key, end, max_listed, count, listed, first, last, max_seq in rows:
            snap.digests.append(DigestWindow(wid, route, key, end, max_listed, count, listed,
                                             0 if max_seq is None else max_seq + 1, first, last))
        self._db = db
        return snap

    def _handle(self, items: list[_Item]) -> Sequence[Any]:
        db = self._db
        if db is None:
            raise RuntimeError("the storm state is not open")
        answers: list[Any] = [None] * len(items)
        events: list[tuple[str, int, str, str]] = []
        windows: dict[str, list[Any]] = {}  # id -> the summary row, added up over the group
        puts: list[_Put] = []
        forgets: list[str] = []
        for i, item in enumerate(items):
            if isinstance(item, _Put):
                puts.append(item)
            elif isinstance(item, _Fold):
                try:
                    row = _fold_rows(item, events, windows)
                except Exception as exc:  # this message alone cannot be stored
                    answers[i] = exc
                    continue
                windows[item.window.id] = row
            elif isinstance(item, _Forget):
                forgets.append(item.window_id)
        if puts or events or windows or forgets:
            db.execute("BEGIN")
            try:
                for p in puts:  # in order: an undo follows the mark it undoes
                    if p.value is None:
                        db.execute("DELETE FROM kv WHERE kind=? AND route=? AND key=?", (p.kind, p.route, p.key))
                    else:
                        db.execute("INSERT OR REPLACE INTO kv (kind, route, key, value) VALUES (?,?,?,?)",
                                   (p.kind, p.route, p.key, json.dumps(p.value)))
                db.executemany(
                    "INSERT INTO digest_window (id, route, key, window_end, max_listed, count, listed, first, last,"
                    " last_envelope) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET"
                    " count = count + excluded.count, listed = listed + excluded.listed,"
                    " last = max(last, excluded.last), last_envelope = excluded.last_envelope", windows.values())
                db.executemany("INSERT OR REPLACE INTO digest_event (window, seq, time, event) VALUES (?,?,?,?)",
                               events)
                for wid in forgets:
                    db.execute("DELETE FROM digest_event WHERE window=?", (wid,))
                    db.execute("DELETE FROM digest_window WHERE id=?", (wid,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        # Reads after the commit: a window is read with every fold queued before the read and
        # never with one that could still fail.
        for i, item in enumerate(items):
            if isinstance(item, _Read):
                try:
                    answers[i] = _read(db, item)
                except Exception as exc:
                    answers[i] = exc
        return answers


def _fold_rows(f: _Fold, events: list[tuple[str, int, str, str]], windows: dict[str, list[Any]]) -> list[Any]:
    """Add ``f`` to the group's rows; returns its window's summary row (added up)."""
    w, env = f.window, f.env
    last_envelope = env.to_json()
    if f.seq is not None:
        data = env.data_or_none()
        when = env.time.isoformat()
        event = {"id": env.id, "subject": env.subject, "time": when, "data": None if isinstance(data, bytes) else data}
        events.append((w.id, f.seq, when, json.dumps(event, ensure_ascii=False, default=str)))
    row = windows.get(w.id)
    listed = int(f.seq is not None)
    if row is None:
        return [w.id, w.route, w.key, w.window_end, w.max_listed, 1, listed, w.first, f.at, last_envelope]
    row[5] += 1
    row[6] += listed
    if f.at >= row[8]:
        row[8], row[9] = f.at, last_envelope
    return row


def _read(db: sqlite3.Connection, r: _Read) -> Any:
    row = db.execute("SELECT route, key, window_end, max_listed, count, listed, first, last, last_envelope "
                     "FROM digest_window WHERE id=?", (r.window_id,)).fetchone()
    if row is None:
        return None
    route, key, end, max_listed, count, listed, first, last, last_envelope = row
    events = [json.loads(e) for (e,) in db.execute(
        "SELECT event FROM digest_event WHERE window=? ORDER BY time, seq", (r.window_id,))]
    window = DigestWindow(r.window_id, route, key, end, max_listed, count, listed, 0, first, last)
    return r.build(StoredDigest(window, last_envelope, events))


def _migrate_digests(db: sqlite3.Connection) -> None:
    """Digests of the single-table layout (``kv`` rows of kind ``digest``) into the digest tables."""
    for route, key, value in db.execute("SELECT route, key, value FROM kv WHERE kind='digest'").fetchall():
        v = json.loads(value)
        wid = new_id()
        listed = v.get("events") or []
        db.execute("INSERT INTO digest_window (id, route, key, window_end, max_listed, count, listed, first, last,"
                   " last_envelope) VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (wid, route, key, v["window_end"], max(DEFAULT_MAX_LISTED, len(listed)), v["count"], len(listed),
                    v["first"], v["last"], v["last_env"]))
        db.executemany("INSERT INTO digest_event (window, seq, time, event) VALUES (?,?,?,?)",
                       [(wid, i, str(e.get("time", "")), json.dumps(e, ensure_ascii=False, default=str))
                        for i, e in enumerate(listed)])
    db.execute("DELETE FROM kv WHERE kind='digest'")
