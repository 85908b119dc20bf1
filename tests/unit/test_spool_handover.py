"""The SQLite spool's fast path: jobs handed over in memory, merged writes, reads ahead.

Whatever path a job takes, it is in the file before ``put`` returns, it is handed out once until
it is settled, and what the file holds is what was put.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.delivery import spool as spool_module
from gateway.delivery.spool import Spool
from gateway.delivery.store import Job


def job(n: int = 0, connector: str = "out", **kw: Any) -> Job:
    return Job(envelope_id=f"env-{n}", route="r", connector=connector, envelope=json.dumps({"id": f"env-{n}"}),
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


class CountingReads:
    """Counts the spool's reads of the file."""

    def __init__(self, spool: Spool) -> None:
        self.count = 0
        original = spool._read

        async def counted(fn: Any) -> Any:
            self.count += 1
            return await original(fn)

        spool._read = counted  # type: ignore[method-assign]


async def test_grouped_puts_get_the_ids_the_file_gave_their_rows(tmp_path: Path, spool: Spool) -> None:
    batches = [[job(10 * i + k, connector=f"c{k % 2}", attempts=k, timeout=2.5 + k) for k in range(3)]
               for i in range(20)]
    await asyncio.gather(*(spool.put(b) for b in batches))
    assert spool.commits < 20
    stored = {r[0]: r[1:] for r in rows(tmp_path / "spool.db", "SELECT id, envelope_id, envelope, attempts,"
                                        " typeof(attempts), timeout, typeof(timeout), created_at FROM jobs")}
    for j in (j for b in batches for j in b):
        assert stored[j.id] == (j.envelope_id, j.envelope, j.attempts, "integer", j.timeout, "real", j.created_at)


async def test_a_nul_in_a_stored_text_survives(tmp_path: Path, spool: Spool) -> None:
    odd = job(1)
    odd.envelope_id = "a\x00b"
    await asyncio.gather(spool.put([odd]), spool.put([job(2)]))
    stored = dict(rows(tmp_path / "spool.db", "SELECT id, envelope_id FROM jobs"))
    assert stored[odd.id] == "a\x00b"


async def test_after_the_file_is_empty_new_jobs_come_from_memory(spool: Spool) -> None:
    assert await spool.claim("out", 10) == []  # finds the file empty for "out"
    reads = CountingReads(spool)
    fresh = job(1)
    fresh.loaded = ("the envelope", "the options")  # type: ignore[assignment]
    await spool.put([fresh])
    [claimed] = await spool.claim("out", 10)
    assert claimed is fresh and claimed.loaded is not None and reads.count == 0
    assert await spool.claim("out", 10) == []  # leased: not handed out twice
    await spool.done(claimed)
    assert (await spool.depth()).get("out") is None


async def test_a_rescheduled_job_sends_the_next_claims_to_the_file(spool: Spool) -> None:
    assert await spool.claim("out", 10) == []
    await spool.put([job(1)])
    [a] = await spool.claim("out", 1)
    a.attempts = 1
    await spool.reschedule(a, time.time() + 0.05, "x")
    await spool.put([job(2)])  # waits its turn on disk behind the retry
    [b] = await spool.claim("out", 10)
    assert b.envelope_id == "env-2" and b.loaded is None
    await asyncio.sleep(0.06)
    [again] = await spool.claim("out", 10)
    assert again.envelope_id == "env-1" and again.attempts == 1


async def test_jobs_another_process_wrote_are_found_within_the_recheck(tmp_path: Path, spool: Spool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "_RECHECK", 0.05)
    assert await spool.claim("out", 10) == []
    other = Spool(str(tmp_path / "spool.db"), min_free_bytes=0)  # the CLI replaying, say
    await other.open()
    try:
        await other.put([job(7)])
    finally:
        await other.close()
    assert await spool.claim("out", 10) == []  # not looked for yet
    await asyncio.sleep(0.06)
    assert [j.envelope_id for j in await spool.claim("out", 10)] == ["env-7"]


async def test_claims_read_ahead_and_keep_order(spool: Spool) -> None:
    await spool.put([job(i) for i in range(100)])
    reads = CountingReads(spool)
    got: list[str] = []
    while len(got) < 100:
        claimed = await spool.claim("out", 1)
        assert claimed
        got.extend(j.envelope_id for j in claimed)
    assert got == [f"env-{i}" for i in range(100)]
    assert reads.count <= 3
    assert await spool.claim("out", 1) == []


async def test_a_failed_group_hands_nothing_over(spool: Spool) -> None:
    assert await spool.claim("out", 10) == []
    bad = job(9)
    bad.envelope = None  # type: ignore[assignment]  # NOT NULL violation
    results = await asyncio.gather(spool.put([job(1)]), spool.put([bad]), return_exceptions=True)
    assert results[0] is None and isinstance(results[1], Exception)
    assert [j.envelope_id for j in await spool.claim("out", 10)] == ["env-1"]
    assert await spool.claim("out", 10) == []
