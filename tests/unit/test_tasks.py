"""Ending background tasks within a bound (gateway.tasks), with tasks that ignore cancellation."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from gateway.tasks import cancel_and_wait, within
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
