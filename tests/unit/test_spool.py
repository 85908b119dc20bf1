"""The SQLite spool: group commit, leases, dead letters, idempotency records, migrations, health."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery.spool import _MIGRATIONS, SCHEMA_VERSION, Spool
from gateway.delivery.store import DeadLetterFilter, Job, Remembered, SpoolError, SpoolFull


def job(n: int = 0, connector: str = "out", route: str = "r", **kw: Any) -> Job:
    return Job(envelope_id=f"env-{n}", route=route, connector=connector, envelope=json.dumps({"id": f"env-{n}"}),
               options=json.dumps({"tag": str(n)}), policy='{"attempts": 3}', **kw)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(str(tmp_path / "spool.db"), min_free_bytes=0)
    await s.open()
    yield s
    await s.close()


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


# --- schema -----------------------------------------------------------------------------


async def test_new_file_has_current_schema_and_wal(tmp_path: Path, spool: Spool) -> None:
    assert rows(tmp_path / "spool.db", "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(tmp_path / "spool.db", "PRAGMA journal_mode") == [("wal",)]


async def test_v1_file_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for stmt in _MIGRATIONS[1]:
            db.execute(stmt)
        db.execute("INSERT INTO jobs (envelope_id, route, connector, envelope, options, policy, attempts,"
                   " created_at, next_at) VALUES ('e1', 'r', 'out', '{}', '{}', '{}', 2, 1, 1)")
        db.execute("PRAGMA user_version=1")
    s = Spool(str(path), min_free_bytes=0)
    await s.open()
    try:
        [j] = await s.claim("out", 10)
        assert (j.envelope_id, j.attempts, j.timeout) == ("e1", 2, 30.0)
        await s.put([], remember=Remembered("api", "k", "e1", "accepted"))  # the v2 table exists
    finally:
        await s.close()
    assert rows(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    s = Spool(str(path))
    with pytest.raises(SpoolError, match="newer than this gateway"):
        await s.open()


async def test_jobs_survive_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    s = Spool(path, min_free_bytes=0)
    await s.open()
    await s.put([job(1), job(2, connector="other")])
    await s.close()
    s2 = Spool(path, min_free_bytes=0)
    await s2.open()
    try:
        assert sorted(await s2.connectors_with_jobs()) == ["other", "out"]
        assert [j.envelope_id for j in await s2.claim("out", 10)] == ["env-1"]
    finally:
        await s2.close()


# --- group commit ---------------------------------------------------------------------------


async def test_concurrent_puts_share_commits_and_all_land(spool: Spool) -> None:
    await asyncio.gather(*(spool.put([job(i)]) for i in range(200)))
    assert (await spool.depth())["out"][0] == 200
    assert spool.writes == 200
    assert spool.commits < 200 / 4, f"{spool.commits} commits for 200 writes: no grouping"
    claimed = await spool.claim("out", 500)
    assert len({j.id for j in claimed}) == 200


async def test_only_what_an_acknowledgement_depends_on_is_fsynced(spool: Spool) -> None:
    await spool.put([job(1), job(2)])
    assert (spool.commits, spool.fsyncs) == (1, 1)
    a, b = await spool.claim("out", 2)
    await spool.done(a)  # bookkeeping after a send: a power cut could only bring it back
    b.attempts = 1
    await spool.reschedule(b, time.time() + 60, "x")
    assert (spool.commits, spool.fsyncs) == (3, 1)
    # the two connections: FULL (2) for what acknowledgements wait for, NORMAL (1) for bookkeeping
    assert await synchronous(spool) == 2
    assert await spool._read(lambda _: spool._bookkeeping().execute("PRAGMA synchronous").fetchone()[0]) == 1
    await asyncio.gather(spool.put([job(3)]), spool.done(b))  # one group: two commits, one fsync'd
    assert (spool.commits, spool.fsyncs) == (5, 2)
    assert [j.envelope_id for j in await spool.claim("out", 10)] == ["env-3"]


async def synchronous(spool: Spool) -> int:
    return int(await spool._read(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]))


async def test_one_bad_write_does_not_fail_its_group(spool: Spool) -> None:
    bad = job(99)
    bad.envelope = None  # type: ignore[assignment]  # NOT NULL violation: this write alone fails
    results = await asyncio.gather(spool.put([job(1)]), spool.put([job(2), bad]), spool.put([job(3)]),
                                   return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], SpoolError)
    # the failed write left nothing behind, not even its valid first job
    assert sorted(j.envelope_id for j in await spool.claim("out", 10)) == ["env-1", "env-3"]
    assert spool.healthy


class FlakySpool(Spool):
    """Fails every commit while ``broken`` is set, the way SQLite does on a full disk."""

    broken = False
    attempts = 0

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]], fsync: bool = True) -> list[Any]:
        self.attempts += 1
        if self.broken:
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13
            raise exc
        return super()._commit_batch(ops, fsync)


async def test_storage_failure_fails_the_group_then_the_probe_recovers(tmp_path: Path) -> None:
    s = FlakySpool(str(tmp_path / "spool.db"), min_free_bytes=0, probe_interval=0.02)
    await s.open()
    try:
        s.broken = True
        results = await asyncio.gather(*(s.put([job(i)]) for i in range(5)), return_exceptions=True)
        assert all(isinstance(r, SpoolError) for r in results)
        assert not s.healthy
        before = s.attempts
        s.broken = False
        deadline = time.monotonic() + 2
        while not s.healthy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert s.healthy, "the probe should bring the spool back without any message arriving"
        assert s.attempts > before
        assert await s.depth() == {}
        await s.put([job(1)])
        assert (await s.depth())["out"][0] == 1
    finally:
        await s.close()


async def test_no_room_refuses_before_writing(tmp_path: Path) -> None:
    s = Spool(str(tmp_path / "spool.db"), min_free_bytes=2**62)
    await s.open()
    try:
        assert not s.has_space
        with pytest.raises(SpoolFull):
            await s.put([job(1)])
        assert await s.depth() == {}
    finally:
        await s.close()


async def test_close_finishes_writes_already_asked_for(tmp_path: Path) -> None:
    s = Spool(str(tmp_path / "spool.db"), min_free_bytes=0)
    await s.open()
    puts = [asyncio.ensure_future(s.put([job(i)])) for i in range(50)]
    await asyncio.sleep(0)
    await s.close()
    assert all(p.done() and p.exception() is None for p in puts)
    assert rows(tmp_path / "spool.db", "SELECT COUNT(*) FROM jobs") == [(50,)]
    with pytest.raises(SpoolError):
        await s.put([job(51)])


# --- claims ----------------------------------------------------------------------------------


async def test_claim_leases_due_jobs_in_order(spool: Spool) -> None:
    now = time.time()
    await spool.put([job(1, next_at=now - 2), job(2, next_at=now - 1), job(3, next_at=now + 60),
                     job(4, connector="other")])
    first = await spool.claim("out", 1)
    assert [j.envelope_id for j in first] == ["env-1"]
    assert [j.envelope_id for j in await spool.claim("out", 10)] == ["env-2"]  # 1 is leased, 3 not due
    assert await spool.claim("out", 10) == []
    assert await spool.next_due_at("out") == pytest.approx(now + 60)
    await spool.release(first[0])
    assert [j.envelope_id for j in await spool.claim("out", 10)] == ["env-1"]


async def test_done_reschedule_and_release_with_delay(spool: Spool) -> None:
    await spool.put([job(1), job(2), job(3)])
    a, b, c = await spool.claim("out", 3)
    await spool.done(a)
    b.attempts = 1
    await spool.reschedule(b, time.time() + 0.2, "HTTP 503")
    await spool.release(c, delay=0.2)
    assert await spool.claim("out", 10) == []
    await asyncio.sleep(0.25)
    again = await spool.claim("out", 10)
    assert sorted(j.envelope_id for j in again) == ["env-2", "env-3"]
    rescheduled = next(j for j in again if j.envelope_id == "env-2")
    assert (rescheduled.attempts, rescheduled.last_error) == (1, "HTTP 503")
    assert (await spool.depth())["out"][0] == 2


async def test_depth_reports_count_and_oldest(spool: Spool) -> None:
    await spool.put([job(1, created_at=100.0), job(2, created_at=50.0), job(3, connector="x", created_at=7.0)])
    assert await spool.depth() == {"out": (2, 50.0), "x": (1, 7.0)}


# --- dead letters ----------------------------------------------------------------------------


async def test_dead_letter_moves_the_job_with_its_history(spool: Spool) -> None:
    await spool.put([job(1, created_at=123.0)])
    [j] = await spool.claim("out", 1)
    j.attempts = 3
    dl_id = await spool.dead_letter(j, "attempts", "HTTP 503")
    assert await spool.depth() == {}
    d = await spool.dead_letter_by_id(dl_id)
    assert d is not None
    assert (d.envelope_id, d.reason, d.last_error, d.attempts) == ("env-1", "attempts", "HTTP 503", 3)
    assert d.first_at == 123.0
    assert d.as_dict()["options"] == {"tag": "1"}
    assert d.policy == '{"attempts": 3}'


async def test_dead_letters_are_filtered(spool: Spool) -> None:
    await spool.put([], dead=[(job(1, route="a"), "permanent", "x"), (job(2, route="b"), "template", "y"),
                              (job(3, route="a", connector="c2"), "permanent", "z")])
    ids = lambda items: sorted(d.envelope_id for d in items)  # noqa: E731
    assert ids(await spool.dead_letters()) == ["env-1", "env-2", "env-3"]
    assert ids(await spool.dead_letters(DeadLetterFilter(route="a"))) == ["env-1", "env-3"]
    assert ids(await spool.dead_letters(DeadLetterFilter(route="a", connector="c2"))) == ["env-3"]
    assert ids(await spool.dead_letters(DeadLetterFilter(reason="template"))) == ["env-2"]
    assert ids(await spool.dead_letters(DeadLetterFilter(envelope_id="env-2"))) == ["env-2"]
    assert ids(await spool.dead_letters(DeadLetterFilter(since=time.time() + 60))) == []
    assert ids(await spool.dead_letters(DeadLetterFilter(until=time.time() + 60))) == ["env-1", "env-2", "env-3"]
    assert await spool.count_dead_letters(DeadLetterFilter(reason="permanent")) == 2
    assert [d.envelope_id for d in await spool.dead_letters(limit=1)] == ["env-3"]  # newest first


async def test_replay_to_the_original_target_keeps_id_options_and_policy(spool: Spool) -> None:
    await spool.put([], dead=[(job(1, timeout=7.0), "attempts", "x"), (job(2), "permanent", "y")])
    [d1, _] = sorted(await spool.dead_letters(), key=lambda d: d.envelope_id)
    assert await spool.replay([d1.id]) == ["out"]
    [j] = await spool.claim("out", 10)
    assert (j.envelope_id, j.options, j.policy, j.timeout, j.attempts) == ("env-1", '{"tag": "1"}',
                                                                            '{"attempts": 3}', 7.0, 0)
    assert [d.envelope_id for d in await spool.dead_letters()] == ["env-2"]


async def test_replay_to_another_connector_uses_its_default_options(spool: Spool) -> None:
    await spool.put([], dead=[(job(1), "permanent", "x"), (job(2, connector=""), "unmatched", "no route")])
    # a filter selects both; the unmatched one has no target of its own and stays put
    assert await spool.replay(None, DeadLetterFilter(reason="permanent")) == ["out"]
    assert await spool.replay(None, DeadLetterFilter(reason="unmatched")) == []
    assert await spool.replay(None, DeadLetterFilter(reason="unmatched"), connector="archive") == ["archive"]
    [j] = await spool.claim("archive", 10)
    assert (j.envelope_id, j.options) == ("env-2", "{}")


async def test_purge_needs_ids_or_a_filter(spool: Spool) -> None:
    await spool.put([], dead=[(job(i, route="a" if i % 2 else "b"), "permanent", "x") for i in range(6)])
    assert await spool.purge() == 0  # neither ids nor filter: nothing, never everything
    assert await spool.purge([]) == 0
    newest = (await spool.dead_letters(limit=1))[0]
    assert newest.route == "a"
    assert await spool.purge([newest.id, 999_999]) == 1
    assert await spool.purge(None, DeadLetterFilter(route="a")) == 2
    assert await spool.count_dead_letters() == 3
    assert await spool.purge(None, DeadLetterFilter()) == 3  # the explicit "all"


# --- idempotency and atomic puts -----------------------------------------------------------


async def test_recall_within_the_window_and_forget(spool: Spool) -> None:
    await spool.put([job(1)], remember=Remembered("api", "key-1", "env-1", "accepted", at=1000.0))
    r = await spool.recall("api", "key-1", since=900.0)
    assert r is not None and (r.envelope_id, r.status) == ("env-1", "accepted")
    assert await spool.recall("api", "key-1", since=1001.0) is None  # outside the window
    assert await spool.recall("other-source", "key-1", since=0) is None
    assert await spool.forget_before(1000.5) == 1
    assert await spool.recall("api", "key-1", since=0) is None


async def test_put_is_all_or_nothing_across_jobs_dead_letters_and_record(spool: Spool) -> None:
    bad = job(3)
    bad.route = None  # type: ignore[assignment]
    with pytest.raises(SpoolError):
        await spool.put([job(1)], dead=[(bad, "template", "x")], remember=Remembered("api", "k", "env-1", "accepted"))
    assert await spool.depth() == {}
    assert await spool.count_dead_letters() == 0
    assert await spool.recall("api", "k", since=0) is None
