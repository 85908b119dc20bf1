"""The writes a group commit merges: new jobs in multi-row INSERTs, delivered ones in one DELETE.

Statements are what a busy gateway waits for: sqlite3 lets go of the GIL for each one and the
spool thread must then win it back from the event loop. So a group runs as few as it can, and
one that is a single statement runs without BEGIN/COMMIT.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, cast

from gateway.delivery.spool.schema import _INSERT_JOB


class _Insert:
    """A write that adds jobs (and maybe more: ``extras``); returns the new jobs' ids."""

    __slots__ = ("extras", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], extras: Callable[[sqlite3.Connection], None] | None):
        self.rows = rows
        self.extras = extras

    def __call__(self, db: sqlite3.Connection) -> list[int]:
        ids = _insert_rows(db, self.rows)
        if self.extras is not None:
            self.extras(db)
        return ids


class _Delete:
    """A write that removes delivered jobs."""

    __slots__ = ("job_ids",)

    def __init__(self, *job_ids: int):
        self.job_ids = job_ids

    def __call__(self, db: sqlite3.Connection) -> None:
        _delete_jobs(db, self.job_ids)


def _delete_jobs(db: sqlite3.Connection, ids: Sequence[int]) -> None:
    db.execute("DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))


#: Rows per multi-row INSERT: 11 parameters each, well under SQLite's 32,766 bound parameters.
_ROWS_PER_INSERT = 256
_JOB_VALUES = "(?,?,?,?,?,?,?,?,?,?,?)"
_INSERT_JOBS_HEAD = _INSERT_JOB.split(" VALUES ", maxsplit=1)[0] + " VALUES "


def _insert_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[int]:
    """Insert job rows with one statement per ``_ROWS_PER_INSERT`` (a multi-row ``VALUES``); their ids.

    One statement, not one per row: sqlite3 lets go of the GIL for each statement and the spool
    thread must then win it back from a busy event loop; and the values are bound as they are,
    not re-encoded (an envelope is kilobytes of JSON already)."""
    ids: list[int] = []
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start:start + _ROWS_PER_INSERT]
        sql = _INSERT_JOBS_HEAD + ",".join([_JOB_VALUES] * len(chunk))
        last = int(db.execute(sql, [v for row in chunk for v in row]).lastrowid or 0)
        # An AUTOINCREMENT table numbers the rows of one statement consecutively, in order.
        ids.extend(range(last - len(chunk) + 1, last + 1))
    return ids


def _one_statement(ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> bool:
    """Whether :func:`_run_merged` runs the group as a single statement (then it needs no
    BEGIN/COMMIT around it): only plain inserts, up to one INSERT's rows, or only deletes."""
    if all(type(op) is _Delete for op in ops):
        return True
    return (all(type(op) is _Insert and op.extras is None for op in ops)
            and 0 < sum(len(cast(_Insert, op).rows) for op in ops) <= _ROWS_PER_INSERT)


def _run_merged(db: sqlite3.Connection, ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
    """Run a group's writes with as few statements as possible: the job rows of all its inserts
    in one, its deletes in another (see :func:`_insert_rows` for why statements count)."""
    results: list[Any] = [None] * len(ops)
    inserts: list[tuple[int, _Insert]] = []
    deletes: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, _Insert):
            inserts.append((i, op))
        elif isinstance(op, _Delete):
            deletes.extend(op.job_ids)
        else:
            results[i] = op(db)
    if inserts:
        ids = iter(_insert_rows(db, [row for _, op in inserts for row in op.rows]))
        for i, op in inserts:
            results[i] = [next(ids) for _ in op.rows]
            if op.extras is not None:
                op.extras(db)
    if deletes:
        _delete_jobs(db, deletes)
    return results
