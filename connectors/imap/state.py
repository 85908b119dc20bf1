"""Durable checkpoints of the mailbox connectors (IMAP and POP3), in the connector's state directory.

One SQLite file (WAL, ``synchronous=FULL``: every commit is on disk before it returns), so a
restart — even after ``kill -9`` — neither delivers again what was acknowledged nor skips what
was not. IMAP keeps, per folder, the UIDVALIDITY and the highest UID handled in order; POP3
keeps the UIDL of every message on the server it has dealt with (rows for messages that left
the server are pruned, so the table stays as small as the maildrop).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS imap_folder (
  folder TEXT PRIMARY KEY, uidvalidity INTEGER NOT NULL, last_uid INTEGER NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pop3_uidl (
  uidl TEXT PRIMARY KEY, state TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

#: POP3 row states: ``done`` (accepted; deleted from the server unless left there),
#: ``rejected`` (refused, left on the server), ``old`` (already there at the first start, not taken).
POP3_STATES = ("done", "rejected", "old")


@dataclass(frozen=True)
class FolderCheckpoint:
    uidvalidity: int
    last_uid: int


class StateError(Exception):
    """The state file cannot be read or written (the connector stops taking mail)."""


class CheckpointStore:
    """Blocking SQLite calls run in a worker thread, one at a time."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "checkpoints.db")
        self._directory = directory
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        def run() -> T:
            with self._lock:
                try:
                    return fn(self._conn(), *args)
                except (sqlite3.Error, OSError) as exc:
                    raise StateError(f"checkpoint store {self.path}: {exc}") from exc

        return await asyncio.to_thread(run)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- IMAP ------------------------------------------------------------------------------

    async def folder(self, folder: str) -> FolderCheckpoint | None:
        def get(db: sqlite3.Connection, name: str) -> FolderCheckpoint | None:
            row = db.execute("SELECT uidvalidity, last_uid FROM imap_folder WHERE folder = ?", (name,)).fetchone()
            return FolderCheckpoint(int(row[0]), int(row[1])) if row else None

        return await self._call(get, folder)

    async def set_folder(self, folder: str, cp: FolderCheckpoint) -> None:
        def put(db: sqlite3.Connection, name: str, c: FolderCheckpoint) -> None:
            db.execute("INSERT INTO imap_folder(folder, uidvalidity, last_uid, updated) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(folder) DO UPDATE SET uidvalidity = excluded.uidvalidity, "
                       "last_uid = excluded.last_uid, updated = excluded.updated",
                       (name, c.uidvalidity, c.last_uid, time.time()))

        await self._call(put, folder, cp)

    # --- POP3 ------------------------------------------------------------------------------

    async def pop3_known(self) -> dict[str, str] | None:
        """UIDL → state, or None before the first successful start."""

        def get(db: sqlite3.Connection) -> dict[str, str] | None:
            if db.execute("SELECT 1 FROM meta WHERE key = 'pop3_started'").fetchone() is None:
                return None
            return {str(u): str(s) for u, s in db.execute("SELECT uidl, state FROM pop3_uidl")}

        return await self._call(get)

    async def pop3_start(self, old: Iterable[str]) -> None:
        """First start: remember the messages already there (not taken) in one commit."""

        def put(db: sqlite3.Connection, uidls: list[str]) -> None:
            now = time.time()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO pop3_uidl(uidl, state, updated) VALUES (?, 'old', ?)",
                               [(u, now) for u in uidls])
                db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('pop3_started', ?)", (str(now),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._call(put, list(old))

    async def pop3_mark(self, uidl: str, state: str) -> None:
        assert state in POP3_STATES

        def put(db: sqlite3.Connection, u: str, s: str) -> None:
            db.execute("INSERT OR REPLACE INTO pop3_uidl(uidl, state, updated) VALUES (?, ?, ?)", (u, s, time.time()))

        await self._call(put, uidl, state)

    async def pop3_prune(self, on_server: Iterable[str]) -> int:
        """Forget UIDLs no longer on the server; returns how many rows went."""

        def prune(db: sqlite3.Connection, present: list[str]) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TEMP TABLE IF NOT EXISTS present(uidl TEXT PRIMARY KEY)")
                db.execute("DELETE FROM present")
                db.executemany("INSERT OR IGNORE INTO present(uidl) VALUES (?)", [(u,) for u in present])
                gone = db.execute("DELETE FROM pop3_uidl WHERE uidl NOT IN (SELECT uidl FROM present)").rowcount
                db.execute("COMMIT")
                return int(gone)
            except BaseException:
                db.execute("ROLLBACK")
                raise

        return await self._call(prune, list(on_server))
