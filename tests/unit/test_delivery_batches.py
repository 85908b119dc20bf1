"""Spooled delivery to a connector that sends in batches (``Connector.batches``): the jobs due
together go to ``send_batch`` at once, and each still ends on its own answer — delivered,
retried or dead-lettered — exactly as it would one by one."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.contract import PermanentError, Reply, Status, Target, TransientError
from gateway.delivery.spool import Spool
from gateway.envelope import Envelope
from tests.gwtest import wait_for
from tests.unit.test_delivery import FAST, Fake, Harness, route


class Batching(Fake):
    """Each item goes through the test's ``behavior``; the batch sizes are recorded."""

    batches = True

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.sizes: list[int] = []
        self.singles = 0  # jobs sent one by one (a job claimed alone is not a batch)
        self.whole: BaseException | None = None  # raised for a whole batch, once

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        self.singles += 1
        return await super().send(env, target)

    async def send_batch(self, items: Sequence[tuple[Envelope, Target]]) -> Sequence[Reply | BaseException | None]:
        self.sizes.append(len(items))
        if self.whole is not None:
            whole, self.whole = self.whole, None
            raise whole
        answers: list[Reply | BaseException | None] = []
        for env, target in items:
            try:
                answers.append(await Fake.send(self, env, target))
            except Exception as exc:
                answers.append(exc)
        return answers


async def _empty(h: Harness) -> bool:
    return await h.depth() == 0


def ns(h: Harness) -> list[int]:
    return sorted(int(env.data["n"]) for env in h.out().delivered)


async def test_jobs_due_together_go_in_one_batch_and_each_is_delivered_once(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(), connector_class=Batching, concurrency=64) as h:
        gate = asyncio.Event()

        async def held(env: Envelope, target: Target) -> Reply | None:
            await gate.wait()  # the first batch waits, so the rest pile up behind it
            return None

        h.out().behavior = held
        outcomes = await asyncio.gather(*(h.send({"n": i}) for i in range(50)))
        assert all(o.status is Status.ACCEPTED for o in outcomes)
        gate.set()
        await wait_for(lambda: len(h.out().delivered) == 50, what="all delivered")
        await wait_for(lambda: _empty(h), what="spool emptied")
        out = h.out()
        assert isinstance(out, Batching)
        assert ns(h) == list(range(50))
        # Most go in batches; a job claimed alone (the first one, on a slow machine) goes by itself.
        assert max(out.sizes) > 1 and sum(out.sizes) + out.singles == 50
        assert h.metric("gateway_messages_delivered_total", connector="out", route="r") == 50


async def test_each_job_of_a_batch_settles_on_its_own_answer(tmp_path: Path) -> None:
    failed_once: set[int] = set()

    async def mixed(env: Envelope, target: Target) -> Reply | None:
        n = int(env.data["n"])
        if n == 3:
            raise PermanentError("refused for good")
        if n == 5 and n not in failed_once:
            failed_once.add(n)
            raise TransientError("busy")
        return None

    async with Harness(tmp_path, route(), connector_class=Batching, concurrency=64) as h:
        h.out().behavior = mixed
        await asyncio.gather(*(h.send({"n": i}) for i in range(10)))
        await wait_for(lambda: len(h.out().delivered) == 9, what="all but the refused one delivered")
        await wait_for(lambda: _empty(h), what="spool emptied")
        assert ns(h) == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # once each: 5 after its retry
        dead = await h.spool.dead_letters()
        assert [(d.reason, d.last_error) for d in dead] == [("permanent", "refused for good")]
        assert h.metric("gateway_delivery_failures_total", connector="out", route="r", outcome="transient") == 1


async def test_a_batch_that_fails_as_a_whole_is_retried_as_a_whole(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(), connector_class=Batching, concurrency=64) as h:
        out = h.out()
        assert isinstance(out, Batching)
        out.whole = TransientError("disk full")
        await asyncio.gather(*(h.send({"n": i}) for i in range(5)))
        await wait_for(lambda: len(out.delivered) == 5, what="delivered after the retry")
        await wait_for(lambda: _empty(h), what="spool emptied")
        assert ns(h) == [0, 1, 2, 3, 4]
        assert await h.spool.dead_letters() == []


async def test_a_batch_that_hangs_times_out_and_every_job_in_it_is_retried(tmp_path: Path) -> None:
    hung: set[str] = set()

    async def first_hangs(env: Envelope, target: Target) -> Reply | None:
        if not hung:
            hung.add(env.id)
            await asyncio.sleep(30)
        return None

    extra = "timeout: 0.2s\n    " + FAST
    async with Harness(tmp_path, route(extra=extra), connector_class=Batching, concurrency=64) as h:
        h.out().behavior = first_hangs
        await asyncio.gather(*(h.send({"n": i}) for i in range(4)))
        await wait_for(lambda: len({e.id for e in h.out().delivered}) == 4, timeout=5, what="all delivered")
        await wait_for(lambda: _empty(h), what="spool emptied")
        assert h.metric("gateway_delivery_failures_total", connector="out", route="r", outcome="transient") >= 1


class FailingBookkeeping(Spool):
    """The first ``failures`` bookkeeping commits (deletes after a send) fail as a full disk would."""

    failures = 1

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]], fsync: bool = True) -> list[Any]:
        if not fsync and self.failures:
            self.failures -= 1
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13  # type: ignore[attr-defined]
            raise exc
        return super()._commit_batch(ops, fsync)


async def test_a_batch_whose_removal_fails_is_not_sent_again_and_is_removed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.delivery.spool._HOLD_AFTER_FAILED_WRITE", 0.1)
    spool = FailingBookkeeping(str(tmp_path / "spool.db"), min_free_bytes=0, probe_interval=0.02)
    async with Harness(tmp_path, route(), spool=spool, connector_class=Batching, concurrency=64) as h:
        gate = asyncio.Event()

        async def held(env: Envelope, target: Target) -> Reply | None:
            await gate.wait()
            return None

        h.out().behavior = held
        await asyncio.gather(*(h.send({"n": i}) for i in range(6)))
        gate.set()
        await wait_for(lambda: _empty(h), timeout=10, what="spool emptied once the disk recovered")
        # the outcome is kept in memory and its removal retried: each message went out once
        assert sorted(ns(h)) == list(range(6))
