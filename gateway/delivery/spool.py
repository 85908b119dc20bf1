"""The embedded durable spool: one SQLite file in WAL mode (the default spool backend).

A delivery job is written — and fsync'd (``synchronous=FULL``) — before the inbound side
acknowledges; it is removed only once its target delivered it or it was moved to the dead
letters. Writes from many concurrent messages are grouped into one transaction (group commit),
so the fsync cost is shared instead of paid per message; each write still succeeds or fails on
its own (a savepoint per write), except when the disk fails, which fails the whole group.

Only what an acknowledgement depends on is fsync'd. Bookkeeping after a send (delete the
delivered job, count an attempt, move a job to the dead letters) commits with
``synchronous=NORMAL``: in WAL mode that is crash-safe and ordered, and a power cut can only
undo it — the job is then retried, a duplicate, never a loss; the next FULL commit makes it
durable too. That saves one fsync per delivered message.

All SQLite work runs on one dedicated thread; the asyncio loop never blocks on disk. The file
is inspectable with ``sqlite3`` and carries its schema version in ``PRAGMA user_version``;
older files are migrated on open, newer ones refused.

After a failed write the spool reports itself unhealthy and probes the disk with a tiny write
every ``probe_interval`` seconds, so readiness comes back on its own when space returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gateway.delivery.store import (
    DeadLetter,
    DeadLetterFilter,
    Job,
    Remembered,
    SpoolBackend,
    SpoolError,
    SpoolFull,
)

__all__ = ["SCHEMA_VERSION", "DeadLetter", "DeadLetterFilter", "Job", "Remembered", "Spool", "SpoolBackend",
           "SpoolError", "SpoolFull", "make_spool"]

T = TypeVar("T")

SCHEMA_VERSION = 2

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
    # v2: per-job send timeout; dead letters keep the retry policy so a replay keeps it too;
    # idempotency records; a scratch table the health probe writes to.
    2: [
        "ALTER TABLE jobs ADD COLUMN timeout REAL NOT NULL DEFAULT 30",
        "ALTER TABLE dead_letters ADD COLUMN policy TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE dead_letters ADD COLUMN timeout REAL NOT NULL DEFAULT 30",
        "CREATE INDEX dead_letters_connector ON dead_letters (connector, dead_at)",
        "CREATE INDEX dead_letters_dead_at ON dead_letters (dead_at)",
        """CREATE TABLE idempotency (
            source TEXT NOT NULL,
            key TEXT NOT NULL,
            envelope_id TEXT NOT NULL,
            status TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (source, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX idempotency_at ON idempotency (at)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
}

_DL_COLUMNS = ("id, envelope_id, route, connector, envelope, options, reason, last_error, attempts, "
               "first_at, dead_at, policy, timeout")
_JOB_COLUMNS = ("id, envelope_id, route, connector, envelope, options, policy, attempts, created_at, next_at, "
                "last_error, timeout")
_INSERT_JOB = ("INSERT INTO jobs (envelope_id, route, connector, envelope, options, policy, attempts, created_at,"
               " next_at, last_error, timeout) VALUES (?,?,?,?,?,?,?,?,?,?,?)")
_INSERT_DL = ("INSERT INTO dead_letters (envelope_id, route, connector, envelope, options, reason, last_error,"
              " attempts, first_at, dead_at, policy, timeout) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)")

#: SQLite primary result codes that mean the storage, not one statement, failed: the whole
#: group commit fails and the spool turns unhealthy.
_STORAGE_ERRORS = {
    5,  # SQLITE_BUSY (another process holds the file past busy_timeout)
    8,  # SQLITE_READONLY
    10,  # SQLITE_IOERR
    11,  # SQLITE_CORRUPT
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    26,  # SQLITE_NOTADB
}
#: How long a job whose update could not be written stays leased (not re-sent at once).
_HOLD_AFTER_FAILED_WRITE = 5.0


def _storage_failure(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _STORAGE_ERRORS
    return isinstance(exc, sqlite3.OperationalError)


class Spool:
    """The SQLite :class:`~gateway.delivery.store.SpoolBackend`. One process owns the file;
    the CLI may open it alongside (WAL readers and a short-lived writer)."""

    shared = False

    def __init__(self, path: str, *, min_free_bytes: int = 64 * 1024 * 1024, probe_interval: float = 1.0):
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.probe_interval = probe_interval
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], bool]] = []
        self._synchronous = "FULL"
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._stopping = False
        self._free_checked_at = 0.0
        self._free_ok = True
        self._healthy = True
        self._leased: dict[str, set[int]] = {}
        #: Group commits done, how many of them fsync'd, and writes they carried (tests, bench).
        self.commits = 0
        self.fsyncs = 0
        self.writes = 0

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self._run(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        self._stopping = False
        self._writer = asyncio.create_task(self._write_loop(), name="spool-writer")

    def _open_sync(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolError(f"spool {self.path} has schema {version}, newer than this gateway "
                                 f"({SCHEMA_VERSION})")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                db.execute("BEGIN IMMEDIATE")
                try:
                    for stmt in _MIGRATIONS[v]:
                        db.execute(stmt)
                    db.execute(f"PRAGMA user_version={v}")
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
        except BaseException:
            db.close()
            raise
        self._db = db

    async def close(self) -> None:
        """Finish every write already asked for, then close the file."""
        self._stopping = True
        self._wake.set()
        if self._writer is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)
        self._pool.shutdown(wait=True)

    # --- health ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

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

    # --- plumbing --------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except RuntimeError as exc:  # the executor was shut down
            raise SpoolError("spool is closed") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def go() -> T:
            return fn(self._conn())

        try:
            return await self._run(go)
        except sqlite3.Error as exc:
            raise SpoolError(f"spool read failed: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, fsync: bool = True) -> T:
        """Queue ``op`` for the next group commit and wait until it is committed — and on disk
        when ``fsync`` (what an acknowledgement depends on)."""
        if self._stopping or self._writer is None:
            raise SpoolError("spool is closed")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut, fsync))
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        while True:
            timeout = None if self._healthy else self.probe_interval
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                if not self._pending:
                    await self._probe()
                continue
            self._wake.clear()
            await self._flush()
            if self._stopping and not self._pending:
                return

    async def _probe(self) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(time.time()),))

        try:
            await self._run(self._commit_batch, [op], True)
        except Exception:
            return
        self._healthy = True

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        fsync = any(f for _, _, f in batch)
        try:
            results = await self._run(self._commit_batch, [op for op, _, _ in batch], fsync)
        except Exception as exc:
            self._healthy = False
            err = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc}")
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        self._healthy = True
        self.commits += 1
        self.fsyncs += fsync
        self.writes += len(batch)
        for (_, fut, _), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]], fsync: bool = True) -> list[Any]:
        db = self._conn()
        synchronous = "FULL" if fsync else "NORMAL"
        if synchronous != self._synchronous:  # only outside a transaction; cheap
            db.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        db.execute("BEGIN IMMEDIATE")
        results: list[Any] = []
        try:
            for op in ops:
                db.execute("SAVEPOINT op")
                try:
                    results.append(op(db))
                    db.execute("RELEASE op")
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and _storage_failure(exc):
                        raise
                    # This write alone is wrong (a constraint, a bug): undo it, keep the others.
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    results.append(SpoolError(f"spool write refused: {exc}"))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        return results

    def _lease(self, connector: str) -> set[int]:
        return self._leased.setdefault(connector, set())

    def _unlease(self, job: Job, *, failed: bool = False) -> None:
        if job.id is None:
            return
        leased = self._lease(job.connector)
        if failed:
            # The update did not reach the disk: keep the job off the wire for a moment
            # instead of re-sending it in a tight loop while the disk is failing.
            asyncio.get_running_loop().call_later(_HOLD_AFTER_FAILED_WRITE, leased.discard, job.id)
        else:
            leased.discard(job.id)

    async def _job_write(self, job: Job, op: Callable[[sqlite3.Connection], T]) -> T:
        try:
            result = await self._write(op, fsync=False)
        except SpoolError:
            self._unlease(job, failed=True)
            raise
        self._unlease(job)
        return result

    # --- jobs ------------------------------------------------------------------------

    async def put(
        self, jobs: Sequence[Job], *, dead: Sequence[tuple[Job, str, str]] = (), remember: Remembered | None = None,
    ) -> None:
        self.check_space()
        now = time.time()
        rows = [_job_row(j, now) for j in jobs]
        dl_rows = [_dl_row(j, reason, error, now) for j, reason, error in dead]

        def op(db: sqlite3.Connection) -> None:
            if rows:
                db.executemany(_INSERT_JOB, rows)
            if dl_rows:
                db.executemany(_INSERT_DL, dl_rows)
            if remember is not None:
                db.execute("INSERT OR REPLACE INTO idempotency (source, key, envelope_id, status, at)"
                           " VALUES (?,?,?,?,?)",
                           (remember.source, remember.key, remember.envelope_id, remember.status,
                            remember.at or now))

        await self._write(op)

    async def attach(self, connector: str, wake: Callable[[], None], prefetch: int) -> None:
        return None  # the engine wakes its workers on put and polls due times itself

    async def claim(self, connector: str, limit: int) -> list[Job]:
        if limit <= 0:
            return []
        leased = self._lease(connector)
        exclude = frozenset(leased)
        now = time.time()

        def q(db: sqlite3.Connection) -> list[Job]:
            cur = db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE connector=? AND next_at<=? ORDER BY next_at, id LIMIT ?",
                (connector, now, limit + len(exclude)))
            return [_job(r) for r in cur.fetchall() if r[0] not in exclude][:limit]

        jobs = await self._read(q)
        leased.update(j.id for j in jobs if j.id is not None)
        return jobs

    async def next_due_at(self, connector: str) -> float | None:
        exclude = frozenset(self._lease(connector))

        def q(db: sqlite3.Connection) -> float | None:
            cur = db.execute("SELECT id, next_at FROM jobs WHERE connector=? ORDER BY next_at LIMIT ?",
                             (connector, len(exclude) + 1))
            for row in cur.fetchall():
                if row[0] not in exclude:
                    return float(row[1])
            return None

        return await self._read(q)

    async def done(self, job: Job) -> None:
        await self._job_write(job, lambda db: db.execute("DELETE FROM jobs WHERE id=?", (job.id,)))

    async def reschedule(self, job: Job, next_at: float, error: str) -> None:
        await self._job_write(job, lambda db: db.execute(
            "UPDATE jobs SET attempts=?, next_at=?, last_error=? WHERE id=?",
            (job.attempts, next_at, error, job.id)))

    async def release(self, job: Job, delay: float = 0.0) -> None:
        if delay > 0 and job.id is not None:
            at = time.time() + delay
            await self._job_write(job, lambda db: db.execute("UPDATE jobs SET next_at=? WHERE id=?", (at, job.id)))
        else:
            self._unlease(job)

    async def connectors_with_jobs(self) -> list[str]:
        return await self._read(lambda db: [r[0] for r in db.execute("SELECT DISTINCT connector FROM jobs")])

    async def depth(self) -> dict[str, tuple[int, float]]:
        def q(db: sqlite3.Connection) -> dict[str, tuple[int, float]]:
            cur = db.execute("SELECT connector, COUNT(*), MIN(created_at) FROM jobs GROUP BY connector")
            return {r[0]: (int(r[1]), float(r[2])) for r in cur.fetchall()}

        return await self._read(q)

    # --- idempotency -----------------------------------------------------------------

    async def recall(self, source: str, key: str, since: float) -> Remembered | None:
        def q(db: sqlite3.Connection) -> Remembered | None:
            row = db.execute("SELECT envelope_id, status, at FROM idempotency WHERE source=? AND key=? AND at>=?",
                             (source, key, since)).fetchone()
            return Remembered(source, key, row[0], row[1], row[2]) if row else None

        return await self._read(q)

    async def forget_before(self, before: float) -> int:
        result: int = await self._write(lambda db: db.execute("DELETE FROM idempotency WHERE at<?",
                                                              (before,)).rowcount, fsync=False)
        return result

    # --- dead letters ----------------------------------------------------------------

    async def dead_letter(self, job: Job, reason: str, error: str) -> int:
        row = _dl_row(job, reason, error, time.time())

        def op(db: sqlite3.Connection) -> int:
            if job.id is not None:
                db.execute("DELETE FROM jobs WHERE id=?", (job.id,))
            return int(db.execute(_INSERT_DL, row).lastrowid or 0)

        return await self._job_write(job, op)

    async def dead_letters(self, flt: DeadLetterFilter | None = None, limit: int = 100) -> list[DeadLetter]:
        where, args = _dl_where(flt)
        return await self._read(lambda db: [DeadLetter(*r) for r in db.execute(
            f"SELECT {_DL_COLUMNS} FROM dead_letters {where} ORDER BY id DESC LIMIT ?", (*args, limit))])

    async def dead_letter_by_id(self, dl_id: int) -> DeadLetter | None:
        def q(db: sqlite3.Connection) -> DeadLetter | None:
            row = db.execute(f"SELECT {_DL_COLUMNS} FROM dead_letters WHERE id=?", (dl_id,)).fetchone()
            return DeadLetter(*row) if row else None

        return await self._read(q)

    async def count_dead_letters(self, flt: DeadLetterFilter | None = None) -> int:
        where, args = _dl_where(flt)
        return await self._read(
            lambda db: int(db.execute(f"SELECT COUNT(*) FROM dead_letters {where}", args).fetchone()[0]))

    async def replay(
        self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None, *, connector: str | None = None,
    ) -> list[str]:
        self.check_space()
        where, args = _dl_select(ids, flt)
        now = time.time()

        def op(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(f"SELECT id, envelope_id, route, connector, envelope, options, policy, timeout"
                              f" FROM dead_letters {where}", args).fetchall()
            out = []
            for dl_id, env_id, route, conn, env, options, policy, timeout in rows:
                target = connector or conn
                if not target:
                    continue  # an unmatched message has no target of its own: it needs a connector
                db.execute(_INSERT_JOB, (env_id, route, target, env, options if connector is None else "{}",
                                         policy, 0, now, now, "", timeout))
                db.execute("DELETE FROM dead_letters WHERE id=?", (dl_id,))
                out.append(target)
            return out

        result: list[str] = await self._write(op)
        return result

    async def purge(self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None) -> int:
        where, args = _dl_select(ids, flt)
        result: int = await self._write(lambda db: db.execute(f"DELETE FROM dead_letters {where}", args).rowcount)
        return result


def make_spool(settings: Any) -> SpoolBackend:
    """The spool ``gateway.spool`` asks for: SQLite (the default) or RabbitMQ (``type: rabbitmq``)."""
    kind = getattr(settings, "type", "sqlite")
    if kind == "rabbitmq":
        from gateway.delivery.rabbit import RabbitSpool

        return RabbitSpool.from_settings(settings)
    return Spool(settings.path, min_free_bytes=settings.min_free_bytes)


def _job_row(j: Job, now: float) -> tuple[Any, ...]:
    return (j.envelope_id, j.route, j.connector, j.envelope, j.options, j.policy, j.attempts, j.created_at or now,
            j.next_at or now, j.last_error, j.timeout)


def _dl_row(j: Job, reason: str, error: str, now: float) -> tuple[Any, ...]:
    return (j.envelope_id, j.route, j.connector, j.envelope, j.options, reason, error, j.attempts,
            j.created_at or now, now, j.policy, j.timeout)


def _job(r: Sequence[Any]) -> Job:
    return Job(id=r[0], envelope_id=r[1], route=r[2], connector=r[3], envelope=r[4], options=r[5], policy=r[6],
               attempts=r[7], created_at=r[8], next_at=r[9], last_error=r[10], timeout=r[11])


def _dl_where(flt: DeadLetterFilter | None) -> tuple[str, tuple[Any, ...]]:
    if flt is None:
        return "", ()
    clauses: list[str] = []
    args: list[Any] = []
    for col, val in (("route", flt.route), ("connector", flt.connector), ("reason", flt.reason),
                     ("envelope_id", flt.envelope_id)):
        if val is not None:
            clauses.append(f"{col}=?")
            args.append(val)
    if flt.since is not None:
        clauses.append("dead_at>=?")
        args.append(flt.since)
    if flt.until is not None:
        clauses.append("dead_at<=?")
        args.append(flt.until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", tuple(args)


def _dl_select(ids: Sequence[int] | None, flt: DeadLetterFilter | None) -> tuple[str, tuple[Any, ...]]:
    """Ids win over a filter; with neither, nothing is selected (never "all" by accident)."""
    if ids is not None:
        id_list = [int(i) for i in ids]
        if not id_list:
            return "WHERE 0", ()
        return f"WHERE id IN ({','.join('?' * len(id_list))})", tuple(id_list)
    if flt is None:
        return "WHERE 0", ()
    return _dl_where(flt)
