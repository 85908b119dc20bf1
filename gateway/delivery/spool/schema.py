"""The spool file's schema and its rows: migrations, SQL, and rows to and from jobs and dead letters."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from gateway.delivery.store import DeadLetterFilter, Job

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
def _storage_failure(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _STORAGE_ERRORS
    return isinstance(exc, sqlite3.OperationalError)


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
