"""The embedded durable spool: one SQLite file in WAL mode.

A delivery job is written — and fsync'd (``synchronous=FULL``) — before the inbound side
acknowledges; it is removed only once its target delivered it or it was moved to the dead
letters. Writes from many concurrent messages are grouped into one transaction (group commit),
so the fsync cost is shared instead of paid per message.

All SQLite work runs on one dedicated thread; the asyncio loop never blocks on disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            envelope_id TEXT NOT NULL,
            route TEXT NOT NULL,
            connector TEXT NOT NULL,
            envelope TEXT NOT NULL,
            options TEXT NOT NULL,
            policy TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            next_at REAL NOT NULL,
            last_error TEXT NOT NULL DEFAULT ''
        )""",
        "CREATE INDEX jobs_due ON jobs (connector, next_at)",
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            envelope_id TEXT NOT NULL,
            route TEXT NOT NULL,
            connector TEXT NOT NULL,
            envelope TEXT NOT NULL,
            options TEXT NOT NULL,
            reason TEXT NOT NULL,
            last_error TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            first_at REAL NOT NULL,
            dead_at REAL NOT NULL
        )""",
        "CREATE INDEX dead_letters_route ON dead_letters (route, dead_at)",
    ],
}


class SpoolError(Exception):
    """The spool could not store or update something (disk error, corrupt file)."""


class SpoolFull(SpoolError):
    """Free space on the spool's filesystem is below the configured minimum."""


@dataclass
class Job:
    envelope_id: str
    route: str
    connector: str
    envelope: str  # Envelope.to_json()
    options: str  # JSON of the rendered target options
    policy: str  # JSON of the route's retry policy
    attempts: int = 0
    created_at: float = 0.0
    next_at: float = 0.0
    last_error: str = ""
    id: int | None = None


@dataclass
class DeadLetter:
    id: int
    envelope_id: str
    route: str
    connector: str
    envelope: str
    options: str
    reason: str
    last_error: str
    attempts: int
    first_at: float
    dead_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "envelope_id": self.envelope_id, "route": self.route, "connector": self.connector,
            "reason": self.reason, "last_error": self.last_error, "attempts": self.attempts,
            "first_at": self.first_at, "dead_at": self.dead_at,
            "envelope": json.loads(self.envelope), "options": json.loads(self.options),
        }


_DL_COLUMNS = ("id, envelope_id, route, connector, envelope, options, reason, last_error, attempts, "
               "first_at, dead_at")
_JOB_COLUMNS = ("id, envelope_id, route, connector, envelope, options, policy, attempts, created_at, next_at, "
                "last_error")


class Spool:
    def __init__(self, path: str, *, min_free_bytes: int = 64 * 1024 * 1024):
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._free_checked_at = 0.0
        self._free_ok = True
        self.healthy = True

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    def _open_sync(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(f"spool {self.path} has schema {version}, newer than this gateway ({SCHEMA_VERSION})")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            db.execute("BEGIN IMMEDIATE")
            for stmt in _MIGRATIONS[v]:
                db.execute(stmt)
            db.execute(f"PRAGMA user_version={v}")
            db.execute("COMMIT")
        self._db = db

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            self._writer = None
        if self._pending:
            await self._flush()
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        self._pool.shutdown(wait=True)

    # --- plumbing --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Queue ``op`` for the next group commit and wait until it is durable."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            results = await self._run(self._commit_batch, [op for op, _ in batch])
        except Exception as exc:
            self.healthy = False
            err = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        self.healthy = True
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        results: list[Any] = []
        try:
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    results.append(op(db))
                    db.execute("RELEASE op")
                except sqlite3.DatabaseError as exc:
                    if isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc).lower():
                        raise
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    results.append(SpoolError(str(exc)))
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        return results

    def check_space(self) -> None:
        """Raise :class:`SpoolFull` when the disk is nearly full (checked at most once a second)."""
        now = time.monotonic()
        if now - self._free_checked_at > 1.0:
            self._free_checked_at = now
            try:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
                self._free_ok = free >= self.min_free_bytes
            except OSError:
                self._free_ok = False
        if not self._free_ok:
            raise SpoolFull(f"less than {self.min_free_bytes} bytes free for the spool")

    @property
    def has_space(self) -> bool:
        try:
            self.check_space()
        except SpoolFull:
            return False
        return True

    # --- jobs ------------------------------------------------------------------------

    async def put(self, jobs: Sequence[Job]) -> list[int]:
        """Store jobs durably (all or none). Raises :class:`SpoolFull` / :class:`SpoolError`."""
        self.check_space()
        now = time.time()
        rows = [(j.envelope_id, j.route, j.connector, j.envelope, j.options, j.policy, j.attempts,
                 j.created_at or now, j.next_at or now, j.last_error) for j in jobs]

        def op(db: sqlite3.Connection) -> list[int]:
            ids = []
            for row in rows:
                cur = db.execute(
                    "INSERT INTO jobs (envelope_id, route, connector, envelope, options, policy, attempts,"
                    " created_at, next_at, last_error) VALUES (?,?,?,?,?,?,?,?,?,?)", row)
                ids.append(int(cur.lastrowid or 0))
            return ids

        result: list[int] = await self._write(op)
        return result

    async def due(self, connector: str, limit: int, exclude: set[int], now: float | None = None) -> list[Job]:
        at = time.time() if now is None else now

        def q() -> list[Job]:
            cur = self._conn().execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE connector=? AND next_at<=? ORDER BY next_at, id LIMIT ?",
                (connector, at, limit + len(exclude)))
            return [_job(r) for r in cur.fetchall() if r[0] not in exclude][:limit]

        return await self._run(q)

    async def next_due_at(self, connector: str, exclude: set[int]) -> float | None:
        def q() -> float | None:
            cur = self._conn().execute(
                "SELECT id, next_at FROM jobs WHERE connector=? ORDER BY next_at LIMIT ?",
                (connector, len(exclude) + 1))
            for row in cur.fetchall():
                if row[0] not in exclude:
                    return float(row[1])
            return None

        return await self._run(q)

    async def done(self, job_id: int) -> None:
        await self._write(lambda db: db.execute("DELETE FROM jobs WHERE id=?", (job_id,)))

    async def reschedule(self, job_id: int, attempts: int, next_at: float, error: str) -> None:
        await self._write(lambda db: db.execute(
            "UPDATE jobs SET attempts=?, next_at=?, last_error=? WHERE id=?", (attempts, next_at, error, job_id)))

    async def connectors_with_jobs(self) -> list[str]:
        return await self._run(
            lambda: [r[0] for r in self._conn().execute("SELECT DISTINCT connector FROM jobs").fetchall()])

    async def depth(self) -> dict[str, tuple[int, float]]:
        """Per connector: (jobs waiting, created_at of the oldest)."""
        def q() -> dict[str, tuple[int, float]]:
            cur = self._conn().execute("SELECT connector, COUNT(*), MIN(created_at) FROM jobs GROUP BY connector")
            return {r[0]: (int(r[1]), float(r[2])) for r in cur.fetchall()}

        return await self._run(q)

    # --- dead letters ----------------------------------------------------------------

    async def dead_letter(self, job: Job, reason: str, error: str) -> int:
        """Move a job (stored or not) to the dead letters, durably, in one transaction."""
        now = time.time()

        def op(db: sqlite3.Connection) -> int:
            if job.id is not None:
                db.execute("DELETE FROM jobs WHERE id=?", (job.id,))
            cur = db.execute(
                "INSERT INTO dead_letters (envelope_id, route, connector, envelope, options, reason, last_error,"
                " attempts, first_at, dead_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job.envelope_id, job.route, job.connector, job.envelope, job.options, reason, error,
                 job.attempts, job.created_at or now, now))
            return int(cur.lastrowid or 0)

        result: int = await self._write(op)
        return result

    async def dead_letters(
        self, *, route: str | None = None, connector: str | None = None, reason: str | None = None,
        since: float | None = None, until: float | None = None, limit: int = 100,
    ) -> list[DeadLetter]:
        where, args = _dl_filter(route, connector, reason, since, until)

        def q() -> list[DeadLetter]:
            cur = self._conn().execute(
                f"SELECT {_DL_COLUMNS} FROM dead_letters {where} ORDER BY id DESC LIMIT ?", (*args, limit))
            return [DeadLetter(*r) for r in cur.fetchall()]

        return await self._run(q)

    async def dead_letter_by_id(self, dl_id: int) -> DeadLetter | None:
        def q() -> DeadLetter | None:
            row = self._conn().execute(f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id=?", (dl_id,)).fetchone()
            return DeadLetter(*row) if row else None

        return await self._run(q)

    async def replay(self, ids: Sequence[int], connector: str | None = None, policy: str | None = None) -> int:
        """Move dead letters back into the jobs (optionally to another connector). Returns how many."""
        now = time.time()

        def op(db: sqlite3.Connection) -> int:
            n = 0
            for dl_id in ids:
                row = db.execute(
                    "SELECT envelope_id, route, connector, envelope, options FROM dead_letters WHERE id=?",
                    (dl_id,)).fetchone()
                if row is None:
                    continue
                db.execute(
                    "INSERT INTO jobs (envelope_id, route, connector, envelope, options, policy, attempts,"
                    " created_at, next_at, last_error) VALUES (?,?,?,?,?,?,0,?,?,'')",
                    (row[0], row[1], connector or row[2], row[3], row[4] if connector is None else "{}",
                     policy or "{}", now, now))
                db.execute("DELETE FROM dead_letters WHERE id=?", (dl_id,))
                n += 1
            return n

        result: int = await self._write(op)
        return result

    async def purge(self, ids: Sequence[int] | None = None, **filters: Any) -> int:
        if ids is not None:
            id_list = list(ids)

            def op_ids(db: sqlite3.Connection) -> int:
                return sum(db.execute("DELETE FROM dead_letters WHERE id=?", (i,)).rowcount for i in id_list)

            result: int = await self._write(op_ids)
            return result
        where, args = _dl_filter(filters.get("route"), filters.get("connector"), filters.get("reason"),
                                 filters.get("since"), filters.get("until"))
        result = await self._write(lambda db: db.execute(f"DELETE FROM dead_letters {where}", args).rowcount)
        return result

    async def count_dead_letters(self) -> int:
        return await self._run(lambda: int(self._conn().execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]))


def _job(r: Sequence[Any]) -> Job:
    return Job(id=r[0], envelope_id=r[1], route=r[2], connector=r[3], envelope=r[4], options=r[5], policy=r[6],
               attempts=r[7], created_at=r[8], next_at=r[9], last_error=r[10])


def _dl_filter(
    route: str | None, connector: str | None, reason: str | None, since: float | None, until: float | None
) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    args: list[Any] = []
    for col, val in (("route", route), ("connector", connector), ("reason", reason)):
        if val is not None:
            clauses.append(f"{col}=?")
            args.append(val)
    if since is not None:
        clauses.append("dead_at>=?")
        args.append(since)
    if until is not None:
        clauses.append("dead_at<=?")
        args.append(until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)
