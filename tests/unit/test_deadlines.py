"""Deadlines checked by one timer: asyncio.timeout's behaviour, a tick late at most."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.deadlines import Deadlines


async def test_an_overdue_block_raises_timeout_error_about_a_tick_late() -> None:
    deadlines = Deadlines(tick=0.02)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        with deadlines.after(0.05):
            await asyncio.sleep(5)
    assert 0.05 <= time.monotonic() - started < 0.5
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_in_time_is_left_alone_and_the_timer_stops() -> None:
    deadlines = Deadlines(tick=0.01)
    with deadlines.after(1.0):
        await asyncio.sleep(0.03)
    assert not deadlines._open
    await asyncio.sleep(0.05)
    assert deadlines._timer is None


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(tick=0.01)

    async def waits() -> None:
        with deadlines.after(0.02):
            await asyncio.sleep(5)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_inner_of_two_deadlines_fires_first() -> None:
    deadlines = Deadlines(tick=0.01)
    outer_fired = False
    try:
        with deadlines.after(5):
            with pytest.raises(TimeoutError):
                with deadlines.after(0.02):
                    await asyncio.sleep(5)
            await asyncio.sleep(0.01)  # the outer one still runs
    except TimeoutError:
        outer_fired = True
    assert not outer_fired


def test_a_deadline_needs_a_task() -> None:
    with pytest.raises(RuntimeError):
        with Deadlines().after(1):
            pass
