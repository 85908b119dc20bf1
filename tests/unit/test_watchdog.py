"""The loop watchdog: a held loop is measured and the function that holds it is named."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram

from gateway.watchdog import LoopWatchdog


def hold_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # stands for any callback that computes instead of awaiting


def _sum_and_count(h: Histogram) -> tuple[float, float]:
    samples = {s.name: s.value for s in h.collect()[0].samples}
    return samples["lag_seconds_sum"], samples["lag_seconds_count"]


async def test_a_held_loop_is_recorded_and_the_holder_named(caplog: pytest.LogCaptureFixture) -> None:
    h = Histogram("lag_seconds", "", registry=CollectorRegistry())
    dog = LoopWatchdog(h, logging.getLogger("test.loop"), warn_after=0.1, interval=0.05)
    caplog.set_level(logging.WARNING, "test.loop")
    dog.start()
    try:
        await asyncio.sleep(0.2)
        assert dog.worst < 0.1  # an idle loop runs its timers on time
        hold_the_loop_for(0.6)
        await asyncio.sleep(0.2)
    finally:
        await dog.stop()
    assert dog.worst >= 0.5
    total, count = _sum_and_count(h)
    assert count >= 4 and total >= 0.5
    blocked = [r for r in caplog.records if r.getMessage() == "loop.blocked"]
    assert blocked, "no loop.blocked warning while the loop was held"
    where = blocked[0].fields["where"]  # type: ignore[attr-defined]
    assert "hold_the_loop_for" in where and "test_watchdog.py" in where
    lag = [r for r in caplog.records if r.getMessage() == "loop.lag"]
    assert lag and lag[0].fields["lag_ms"] >= 500  # type: ignore[attr-defined]
    assert "hold_the_loop_for" in lag[0].fields["where"]  # type: ignore[attr-defined]


async def test_one_warning_per_stall() -> None:
    h = Histogram("lag_seconds", "", registry=CollectorRegistry())
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("test.loop.once")
    log.addHandler(Keep())
    dog = LoopWatchdog(h, log, warn_after=0.1, interval=0.05)
    dog.start()
    try:
        await asyncio.sleep(0.1)
        hold_the_loop_for(0.8)
        await asyncio.sleep(0.2)
    finally:
        await dog.stop()
    assert [r.getMessage() for r in records].count("loop.blocked") == 1
