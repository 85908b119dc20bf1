"""The admission gate on its own: who waits, who is let in (in arrival order, one per settled
job), who is refused and why."""

from __future__ import annotations

import asyncio
import time

from gateway.delivery.admission import Admission
from gateway.delivery.options import DeliveryOptions


def gate(pending: dict[str, int], **options: float) -> Admission:
    opts = DeliveryOptions(**options)  # type: ignore[arg-type]
    return Admission(lambda: opts, pending)


async def test_below_the_depth_a_message_goes_straight_in() -> None:
    g = gate({"out": 2}, admit_depth=3)
    assert g.blocked("out") is None
    assert await g.admit("out") is None


async def test_at_the_depth_messages_wait_and_settled_jobs_let_them_in_in_order() -> None:
    pending = {"out": 3}
    g = gate(pending, admit_depth=3, admit_wait=30)
    first = asyncio.ensure_future(g.admit("out"))
    second = asyncio.ensure_future(g.admit("out"))
    await asyncio.sleep(0)
    assert g.waiting("out") == 2 and not first.done()
    pending["out"] = 2
    g.room("out")  # one job delivered: one message in, the first to come
    await asyncio.sleep(0)
    assert first.done() and first.result() is None
    assert not second.done()
    assert g.blocked("out") == "backlog", "a newcomer queues behind the one still waiting"
    g.room("out")
    assert await second is None
    assert g.waiting("out") == 0


async def test_no_room_in_time_is_a_refusal_and_leaves_no_waiter_behind() -> None:
    g = gate({"out": 5}, admit_depth=3, admit_wait=0.01)
    assert await g.admit("out") == "backlog"
    assert g.waiting("out") == 0
    assert await gate({"out": 5}, admit_depth=3, admit_wait=0).admit("out") == "backlog"


async def test_above_the_depth_the_backlog_drains_before_anyone_is_let_in() -> None:
    pending = {"out": 50}
    g = gate(pending, admit_depth=3, admit_wait=30)
    waiter = asyncio.ensure_future(g.admit("out"))
    await asyncio.sleep(0)
    pending["out"] = 49
    g.room("out")
    await asyncio.sleep(0)
    assert not waiter.done()
    pending["out"] = 1
    g.measured("out", 1, time.time())  # the spool says the backlog is small again
    assert await waiter is None


async def test_an_old_backlog_gates_by_age_when_admit_age_is_set() -> None:
    g = gate({"out": 1}, admit_depth=1000, admit_age=30, admit_wait=0)
    g.measured("out", 1, time.time() - 60)
    assert g.blocked("out") == "age"
    assert await g.admit("out") == "age"
    g.measured("out", 0, None)
    assert g.blocked("out") is None
    assert gate({"out": 1}, admit_depth=1000).blocked("out") is None  # admit_age 0: off
