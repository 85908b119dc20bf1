"""gateway.tasks: ending background tasks within a bound (with tasks that ignore cancellation),
counting work in flight, backing off."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import time

import pytest

from gateway.tasks import Backoff, InFlight, cancel_and_wait, within
from tests.stubborn import ignoring_cancellation


async def test_cancel_and_wait_ends_what_it_can_and_returns_what_ignored_it() -> None:
    release = asyncio.Event()
    polite = asyncio.create_task(asyncio.sleep(3600))
    stuck = asyncio.create_task(ignoring_cancellation(release))
    await asyncio.sleep(0)
    try:
        left = await asyncio.wait_for(cancel_and_wait([polite, stuck], 0.2), 10)
        assert left == {stuck} and polite.cancelled()
    finally:
        release.set()
        await stuck
    assert await cancel_and_wait([], 0.2) == set()


async def test_within_gives_up_without_waiting_for_a_task_that_ignores_its_cancellation() -> None:
    release = asyncio.Event()
    try:
        assert await asyncio.wait_for(within(ignoring_cancellation(release), 0.2), 10) is False
    finally:
        release.set()
    assert await within(asyncio.sleep(0), 1) is True


async def test_exceptions_of_abandoned_work_are_not_reported_as_never_retrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise ConnectionResetError("the peer went away")

    async def fails_late() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            raise ConnectionResetError("while closing")  # what a library may do

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert await within(fails(), 1) is True  # finished in time, with an error: dropped
        task = asyncio.create_task(fails_late())
        await asyncio.sleep(0)
        assert await cancel_and_wait([task], 1) == set()
        del task
        gc.collect()
        await asyncio.sleep(0)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_drained_returns_when_the_last_work_ends_not_at_the_timeout() -> None:
    inflight = InFlight()
    assert await inflight.drained(0)

    async def work(seconds: float) -> None:
        with inflight:
            await asyncio.sleep(seconds)

    tasks = [asyncio.create_task(work(s)) for s in (0.05, 0.1)]
    await asyncio.sleep(0)
    assert inflight.count == 2
    started = time.monotonic()
    assert await inflight.drained(10)
    assert time.monotonic() - started < 1 and inflight.count == 0
    await asyncio.gather(*tasks)


async def test_drained_gives_up_after_its_timeout_and_reports_work_left() -> None:
    inflight = InFlight()
    inflight.add()
    assert not await inflight.drained(0.05)
    assert not await inflight.drained(-1)
    inflight.done()
    assert await inflight.drained(0)
    with pytest.raises(RuntimeError):
        inflight.done()


def test_backoff_doubles_up_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(7))
    bounds = []
    for _ in range(6):
        bound = backoff.bound
        wait = backoff.next()
        assert bound / 2 <= wait <= bound
        bounds.append(bound)
    assert bounds == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.bound == 1.0


def test_backoff_honours_a_longer_wait_the_peer_asked_for_but_not_past_the_cap() -> None:
    backoff = Backoff(0.25, 30.0, rng=random.Random(1))
    assert 5.0 <= backoff.next(at_least=10.0) <= 10.0
    assert backoff.bound == 0.5  # the peer's wait does not move the doubling
    assert 15.0 <= backoff.next(at_least=3600.0) <= 30.0
    with pytest.raises(ValueError):
        Backoff(0, 1)
