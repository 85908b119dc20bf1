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
durable too. That saves one fsync per delivered message. The two kinds go through two
connections (one FULL, one NORMAL) as two group commits: the acknowledged writes first, answered
as soon as they are on disk, then the bookkeeping. A group that is one statement (only new jobs,
or only deletes) runs without BEGIN/COMMIT: every statement is a moment the spool thread must
win the GIL back from a busy event loop.

A job written while its connector's worker has nothing older to do from the disk is also handed
to that worker in memory (leased at once, with the envelope and options it was made from), so
the common path never reads back and parses what it has just written. A worker still queries
the file whenever something may be waiting there (a retry, a replay, more jobs than the memory
queue holds, another process's writes: checked at least once a second).

All SQLite work runs on one dedicated thread; the asyncio loop never blocks on disk. The file
is inspectable with ``sqlite3`` and carries its schema version in ``PRAGMA user_version``;
older files are migrated on open, newer ones refused.

After a failed write the spool reports itself unhealthy and probes the disk with a tiny write
every ``probe_interval`` seconds, so readiness comes back on its own when space returns.

A full disk is survived, not just refused:

* The write-ahead log is bounded. SQLite checkpoints it only past 1,000 pages (4 MiB) and then
  reuses the file at its largest size; on a small or nearly full disk it would grow into every
  byte freed. So the log is truncated back (``wal_checkpoint(TRUNCATE)``) whenever it outgrows a
  share of the free space, when the spool is idle, and by the health probe; and
  ``journal_size_limit`` caps what an automatic checkpoint leaves behind.
* A delivered job whose removal cannot be written is never sent again: the outcome is kept in
  memory (the job stays leased) and the removal is retried until it lands. Only a crash before
  then sends it again (a duplicate, as after any crash).
* The free-space guard accounts for what it lets in: every accepted job is charged its expected
  cost on disk (its log pages now and the removal later) against the last measured free space,
  and the disk is measured again whenever that estimate nears ``min_free_bytes`` (not only once
  a second), so a burst cannot spend the last megabyte between two measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from gateway.delivery.spool.schema import (
    _DL_COLUMNS,
    _INSERT_DL,
    _INSERT_JOB,
    _JOB_COLUMNS,
    _MIGRATIONS,
    SCHEMA_VERSION,
    _dl_row,
    _dl_select,
    _dl_where,
    _job,
    _job_row,
    _storage_failure,
)
from gateway.delivery.spool.writes import _Delete, _Insert, _one_statement, _run_merged
from gateway.delivery.store import (
    DeadLetter,
    DeadLetterFilter,
    Job,
    Remembered,
    SpoolBackend,
    SpoolError,
    SpoolFull,
)
from gateway.groupthread import Closed, GroupThread

__all__ = ["SCHEMA_VERSION", "DeadLetter", "DeadLetterFilter", "Job", "Remembered", "Spool", "SpoolBackend",
           "SpoolError", "SpoolFull"]

T = TypeVar("T")

#: How long a job whose update could not be written stays leased (not re-sent at once).
_HOLD_AFTER_FAILED_WRITE = 5.0
#: Jobs per connector handed to its worker in memory at most; beyond, they wait on disk.
_MEMORY_QUEUE = 1024
#: Jobs read from the file at once (the ones beyond the claim wait in memory, leased).
_PREFETCH = 64
#: A worker that takes jobs from memory still looks at the file this often (seconds), for jobs
#: other processes wrote (``gateway dead-letters replay``).
_RECHECK = 1.0
#: What one stored job is expected to cost on disk beyond its own bytes, counted twice (written,
#: then removed): the log pages of its table row, index entry and sequence (4 KiB each).
_PAGES_PER_JOB_WRITE = 4 * 4096
#: The write-ahead log is truncated once it is larger than this share of the free space...
_WAL_SHARE_OF_FREE = 8
#: ... or than this, whichever is smaller; and after this long without a write.
_WAL_MAX = 16 * 1024 * 1024
_IDLE_CHECKPOINT = 2.0
#: How often a delivered job's removal that could not be written is tried again (seconds).
_RETRY_UNRECORDED = 0.5
#: ``?`` is a JSON array of leased job ids the query must skip.
_UNLEASED = "id NOT IN (SELECT value FROM json_each(?))"


class _Request:
    """One read or write for the spool thread."""

    __slots__ = ("fsync", "op", "read")

    def __init__(self, op: Callable[[sqlite3.Connection], Any], *, read: bool = False, fsync: bool = True):
        self.op = op
        self.read = read
        self.fsync = fsync


class Spool(SpoolBackend):
    """The SQLite :class:`~gateway.delivery.store.SpoolBackend`. One process owns the file;
    the CLI may open it alongside (WAL readers and a short-lived writer)."""

    shared = False

    def __init__(self, path: str, *, min_free_bytes: int = 64 * 1024 * 1024, probe_interval: float = 1.0):
        self.path = path
        self.min_free_bytes = min_free_bytes
        self.probe_interval = probe_interval
        #: Two connections to the file, both used only by the spool thread: ``_db`` commits with
        #: ``synchronous=FULL`` (what an acknowledgement depends on) and serves reads, ``_book``
        #: with ``synchronous=NORMAL`` (bookkeeping after a send). No PRAGMA switching between them.
        self._db: sqlite3.Connection | None = None
        self._book: sqlite3.Connection | None = None
        #: The one thread that uses the connection: reads one by one, writes as group commits.
        self._thread: GroupThread[_Request, Any] = GroupThread(
            "spool", self._serve, idle=self._idle_after, on_idle=self._on_idle)
        self._stopping = False
        self._free_checked_at = 0.0
        #: Free bytes as last measured, less the expected cost of every job accepted since.
        self._free_estimate = float("inf")
        #: Expected cost of jobs accepted but not yet committed (not in a measurement yet).
        self._unwritten_cost = 0
        #: Whether the log may hold frames a checkpoint could truncate (spool thread only).
        self._wal_dirty = False
        #: Delivered jobs whose removal is not on disk yet, by id: never handed out again.
        self._unrecorded: dict[int, Job] = {}
        self._recording: asyncio.Task[None] | None = None
        self._healthy = True
        self._leased: dict[str, set[int]] = {}
        #: Per connector: jobs written and leased, waiting for the worker's next claim.
        self._memory: dict[str, deque[Job]] = {}
        #: Per connector: False once a claim found no unleased job in the file (so new ones
        #: may go by memory); True again whenever one may be there. Absent = True.
        self._on_disk: dict[str, bool] = {}
        #: Per connector: bumped whenever ``_on_disk`` is set, so a claim that read the file
        #: before that does not clear it.
        self._disk_gen: dict[str, int] = {}
        self._read_at: dict[str, float] = {}
        #: Group commits done, how many of them fsync'd, and writes they carried (tests, bench).
        self.commits = 0
        self.fsyncs = 0
        self.writes = 0

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._open_sync)
        except (sqlite3.Error, OSError) as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from exc
        self._stopping = False
        self._thread.start()

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
            db.execute(f"PRAGMA journal_size_limit={_WAL_MAX}")
            book = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            book.execute("PRAGMA synchronous=NORMAL")
            book.execute("PRAGMA busy_timeout=5000")
            book.execute(f"PRAGMA journal_size_limit={_WAL_MAX}")
        except BaseException:
            db.close()
            raise
        self._db, self._book = db, book

    async def close(self) -> None:
        """Finish every read and write already asked for (and try once more to record the
        delivered jobs whose removal failed), then close the file."""
        if self._recording is not None:
            self._recording.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recording
            self._recording = None
        if self._unrecorded and not self._stopping:
            with contextlib.suppress(SpoolError):
                await self._write(_Delete(*self._unrecorded), fsync=False)
                self._unrecorded.clear()
        self._stopping = True
        await self._thread.stop()
        for db in (self._db, self._book):
            if db is not None:
                db.close()
        self._db = self._book = None

    # --- health ----------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def unrecorded(self) -> int:
        """Delivered jobs whose removal is not written yet (kept in memory, retried)."""
        return len(self._unrecorded)

    def check_space(self, cost: int = 0) -> None:
        """Raise :class:`SpoolFull` when ``cost`` more bytes would leave less than
        ``min_free_bytes`` free. Measured at least once a second, and again whenever the
        estimate (the last measurement less what was accepted since) nears the minimum."""
        now = time.monotonic()
        if now - self._free_checked_at > 1.0 or self._free_estimate - cost < 2 * self.min_free_bytes:
            self._free_checked_at = now
            try:
                free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
                self._free_estimate = free - self._unwritten_cost
            except OSError:
                self._free_estimate = -1
        if self._free_estimate - cost < self.min_free_bytes:
            raise SpoolFull(f"less than {self.min_free_bytes} bytes free for the spool")

    def _free_share(self) -> float:
        return self._free_estimate / _WAL_SHARE_OF_FREE

    # --- plumbing --------------------------------------------------------------------

    def _ask(self, request: _Request) -> asyncio.Future[Any]:
        if self._stopping:
            raise SpoolError("spool is closed")
        try:
            return self._thread.submit(request)
        except Closed as exc:
            raise SpoolError("spool is closed") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return cast(T, await self._ask(_Request(fn, read=True)))

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    def _bookkeeping(self) -> sqlite3.Connection:
        if self._book is None:
            raise SpoolError("spool is not open")
        return self._book

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, fsync: bool = True) -> T:
        """Queue ``op`` for the next group commit and wait until it is committed — and on disk
        when ``fsync`` (what an acknowledgement depends on)."""
        return cast(T, await self._ask(_Request(op, fsync=fsync)))

    def _serve(self, requests: list[_Request]) -> list[Any]:
        """On the spool thread: the reads one by one; then what acknowledgements wait for, as one
        fsync'd group commit, answered at once; then the bookkeeping, as another (not fsync'd)."""
        answers: list[Any] = [None] * len(requests)
        acked: list[int] = []
        book: list[int] = []
        for i, r in enumerate(requests):
            if not r.read:
                (acked if r.fsync else book).append(i)
                continue
            try:
                answers[i] = r.op(self._conn())
            except sqlite3.Error as exc:
                answers[i] = SpoolError(f"spool read failed: {exc}")
            except Exception as exc:
                answers[i] = exc
        if acked:
            self._group(requests, acked, answers, fsync=True)
            self._thread.answer_now({i: answers[i] for i in acked})
        if book:
            self._group(requests, book, answers, fsync=False)
        if acked or book:
            self._wal_dirty = True
            self._bound_wal()
        return answers

    def _bound_wal(self) -> None:
        """Truncate the write-ahead log when it outgrows its share of the free space (SQLite's
        own checkpoint waits for 4 MiB of log and then keeps the file at its largest)."""
        try:
            size = os.path.getsize(self.path + "-wal")
        except OSError:
            return
        if size > min(_WAL_MAX, self._free_share()):
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the log into the file and truncate it (a no-op for frames a reader still needs)."""
        try:
            busy = self._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except (sqlite3.Error, SpoolError):
            return
        self._wal_dirty = bool(busy)

    def _idle_after(self) -> float | None:
        if not self._healthy:
            return self.probe_interval
        return _IDLE_CHECKPOINT if self._wal_dirty else None

    def _on_idle(self) -> None:
        if self._healthy:
            self._checkpoint()
        else:
            self._probe()

    def _group(self, requests: list[_Request], which: list[int], answers: list[Any], *, fsync: bool) -> None:
        try:
            results = self._commit_batch([requests[i].op for i in which], fsync)
        except Exception as exc:
            self._healthy = False
            err = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc}")
            results = [err] * len(which)
        else:
            self._healthy = True
            self.commits += 1
            self.fsyncs += fsync
            self.writes += len(which)
        for i, result in zip(which, results, strict=True):
            answers[i] = result

    def _probe(self) -> None:
        """After a failed write: try a tiny one, so health comes back on its own with the disk."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', ?)", (str(time.time()),))

        # The log may have grown into the space that just came back: give it back first.
        self._checkpoint()
        self._commit_batch([op], True)
        self._healthy = True
        self._wal_dirty = True

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]], fsync: bool = True) -> list[Any]:
        db = self._conn() if fsync else self._bookkeeping()
        try:
            if _one_statement(ops):
                # One statement is its own transaction: no BEGIN and COMMIT around it (each
                # statement is a moment the spool thread must win the GIL back from the loop).
                return _run_merged(db, ops)
            db.execute("BEGIN IMMEDIATE")
            # Usually every write succeeds: run them together, without savepoints.
            results = _run_merged(db, ops)
            db.execute("COMMIT")
            return results
        except BaseException as exc:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if not isinstance(exc, Exception) or (isinstance(exc, sqlite3.Error) and _storage_failure(exc)):
                raise
        # One of them is wrong: again, each in a savepoint, so only that one fails.
        db.execute("BEGIN IMMEDIATE")
        results = []
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

    def _unlease(self, job: Job, *, failed: bool = False, gone: bool = False) -> None:
        """The job is no longer taken; unless the write removed it, it waits on disk again."""
        if job.id is None:
            return
        if failed or not gone:
            self._mark_on_disk(job.connector)
        leased = self._lease(job.connector)
        if failed:
            # The update did not reach the disk: keep the job off the wire for a moment
            # instead of re-sending it in a tight loop while the disk is failing.
            asyncio.get_running_loop().call_later(_HOLD_AFTER_FAILED_WRITE, self._release_held, job.connector, job.id)
        else:
            leased.discard(job.id)

    async def _job_write(self, job: Job, op: Callable[[sqlite3.Connection], T], *, gone: bool = False) -> T:
        try:
            result = await self._write(op, fsync=False)
        except SpoolError:
            self._unlease(job, failed=True)
            raise
        self._unlease(job, gone=gone)
        return result

    def _release_held(self, connector: str, job_id: int) -> None:
        self._lease(connector).discard(job_id)
        self._mark_on_disk(connector)

    def _mark_on_disk(self, connector: str) -> None:
        self._on_disk[connector] = True
        self._disk_gen[connector] = self._disk_gen.get(connector, 0) + 1

    def _hand_over(self, job: Job, now: float) -> None:
        """Queue a job just written for its worker in memory, unless it must wait its turn on disk."""
        assert job.id is not None
        c = job.connector
        leased = self._lease(c)
        if job.id in leased:
            return  # a claim read it from the file first
        memory = self._memory.setdefault(c, deque())
        if self._on_disk.get(c, True) or job.next_at > now or len(memory) >= _MEMORY_QUEUE:
            self._mark_on_disk(c)
            return
        leased.add(job.id)
        memory.append(job)

    # --- jobs ------------------------------------------------------------------------

    async def put(
        self, jobs: Sequence[Job], *, dead: Sequence[tuple[Job, str, str]] = (), remember: Remembered | None = None,
    ) -> None:
        """As :meth:`SpoolBackend.put`; the jobs also get their ids and times as stored, and may
        be handed to their worker in memory."""
        now = time.time()
        rows = [_job_row(j, now) for j in jobs]
        dl_rows = [_dl_row(j, reason, error, now) for j, reason, error in dead]
        cost = _cost(rows) + _cost(dl_rows) // 2
        self.check_space(cost)
        # Charged before the write: messages arriving meanwhile see the room as already spent.
        self._free_estimate -= cost
        self._unwritten_cost += cost

        def extras(db: sqlite3.Connection) -> None:
            if dl_rows:
                db.executemany(_INSERT_DL, dl_rows)
            if remember is not None:
                db.execute("INSERT OR REPLACE INTO idempotency (source, key, envelope_id, status, at)"
                           " VALUES (?,?,?,?,?)",
                           (remember.source, remember.key, remember.envelope_id, remember.status,
                            remember.at or now))

        try:
            ids: list[int] = await self._write(_Insert(rows, extras if dl_rows or remember else None))
        finally:
            self._unwritten_cost -= cost
        for j, job_id, row in zip(jobs, ids, rows, strict=True):
            j.id, j.created_at, j.next_at = job_id, row[7], row[8]  # as stored
            self._hand_over(j, now)

    async def attach(self, connector: str, wake: Callable[[], None], prefetch: int) -> None:
        return None  # the engine wakes its workers on put and polls due times itself

    async def claim(self, connector: str, limit: int) -> list[Job]:
        """Due jobs in order: from memory, read from the file when jobs may wait there (more than
        asked for at once, so a busy worker does not query for every job)."""
        if limit <= 0:
            return []
        leased = self._lease(connector)
        memory = self._memory.setdefault(connector, deque())
        now = time.time()
        if (self._on_disk.get(connector, True) and not memory) or now - self._read_at.get(connector, 0.0) >= _RECHECK:
            gen = self._disk_gen.get(connector, 0)
            exclude = json.dumps(list(leased))
            want = max(limit, min(_PREFETCH, _MEMORY_QUEUE - len(memory)))

            def q(db: sqlite3.Connection) -> tuple[list[Job], bool]:
                cur = db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE connector=? AND next_at<=? AND {_UNLEASED}"
                                 " ORDER BY next_at, id LIMIT ?", (connector, now, exclude, want + 1))
                due = [_job(r) for r in cur.fetchall()]
                if len(due) > want:
                    return due[:want], False
                later = db.execute(f"SELECT 1 FROM jobs WHERE connector=? AND next_at>? AND {_UNLEASED} LIMIT 1",
                                   (connector, now, exclude)).fetchone()
                return due, later is None

            due, drained = await self._read(q)
            self._read_at[connector] = now
            due = [j for j in due if j.id not in leased]  # not handed over in memory meanwhile
            leased.update(j.id for j in due if j.id is not None)
            memory.extendleft(reversed(due))  # due before anything handed over since
            if drained and self._disk_gen.get(connector, 0) == gen:
                self._on_disk[connector] = False
        jobs: list[Job] = []
        while memory and len(jobs) < limit:
            jobs.append(memory.popleft())
        return jobs

    async def next_due_at(self, connector: str) -> float | None:
        if self._memory.get(connector):
            return time.time()
        if not self._on_disk.get(connector, True):
            return None  # nothing on disk that is not taken (claims still look once a second)
        exclude = json.dumps(list(self._lease(connector)))

        def q(db: sqlite3.Connection) -> float | None:
            row = db.execute(f"SELECT MIN(next_at) FROM jobs WHERE connector=? AND {_UNLEASED}",
                             (connector, exclude)).fetchone()
            return float(row[0]) if row and row[0] is not None else None

        return await self._read(q)

    async def done(self, job: Job) -> None:
        await self.done_many([job])

    async def done_many(self, jobs: Sequence[Job]) -> None:
        """Several delivered jobs removed with one write. When that write fails the jobs are
        still done: they stay leased (never sent again by this process) and their removal is
        retried until it lands; the spool reports itself unhealthy meanwhile."""
        stored = [j for j in jobs if j.id is not None]
        try:
            await self._write(_Delete(*(j.id for j in stored if j.id is not None)), fsync=False)
        except SpoolError:
            for job in stored:
                assert job.id is not None
                self._unrecorded[job.id] = job
            if self._recording is None or self._recording.done():
                self._recording = asyncio.get_running_loop().create_task(self._record_delivered(),
                                                                         name="spool-record-delivered")
            return
        for job in stored:
            self._unlease(job, gone=True)

    async def _record_delivered(self) -> None:
        """Write the removals of delivered jobs that failed before, until none is left."""
        while self._unrecorded and not self._stopping:
            await asyncio.sleep(_RETRY_UNRECORDED)
            jobs = list(self._unrecorded.values())
            try:
                await self._write(_Delete(*(j.id for j in jobs if j.id is not None)), fsync=False)
            except SpoolError:
                continue
            for job in jobs:
                assert job.id is not None
                self._unrecorded.pop(job.id, None)
                self._unlease(job, gone=True)

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

        return await self._job_write(job, op, gone=True)

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
        for name in set(result):
            self._mark_on_disk(name)
        return result

    async def purge(self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None) -> int:
        where, args = _dl_select(ids, flt)
        result: int = await self._write(lambda db: db.execute(f"DELETE FROM dead_letters {where}", args).rowcount)
        return result


def _cost(rows: Sequence[tuple[Any, ...]]) -> int:
    """Expected bytes on disk for storing ``rows`` and later removing them (see ``_PAGES_PER_JOB_WRITE``)."""
    return sum(2 * (_PAGES_PER_JOB_WRITE + _size(r[3]) + _size(r[4])) for r in rows)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes) else 0

