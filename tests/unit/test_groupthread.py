"""GroupThread: items submitted together are handled as one group, each answered on its own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from gateway.groupthread import Closed, GroupThread


async def test_waiting_items_form_one_group_and_each_gets_its_answer() -> None:
    groups: list[list[int]] = []
    gate = threading.Event()

    def handle(items: list[int]) -> list[int | BaseException]:
        gate.wait(5)  # the first group holds the thread while the others queue up
        groups.append(items)
        return [ValueError(i) if i == 13 else i * 2 for i in items]

    worker: GroupThread[int, int] = GroupThread("t", handle)
    worker.start()
    first = worker.submit(0)
    rest = [worker.submit(i) for i in range(1, 20)]
    gate.set()
    assert await first == 0
    answers = await asyncio.gather(*rest, return_exceptions=True)
    assert [a for a in answers if not isinstance(a, BaseException)] == [i * 2 for i in range(1, 20) if i != 13]
    assert isinstance(answers[12], ValueError)
    assert len(groups) <= 3 and sorted(i for g in groups for i in g) == list(range(20))
    await worker.stop()


async def test_a_failing_group_fails_each_of_its_items_and_the_thread_goes_on() -> None:
    calls = 0

    def handle(items: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk full")
        return items

    worker: GroupThread[str, str] = GroupThread("t", handle)
    worker.start()
    with pytest.raises(OSError, match="disk full"):
        await worker.submit("a")
    assert await worker.submit("b") == "b"
    await worker.stop()


async def test_stop_finishes_what_was_submitted_then_refuses() -> None:
    worker: GroupThread[int, int] = GroupThread("t", lambda items: items)
    worker.start()
    pending = [worker.submit(i) for i in range(5)]
    await worker.stop()
    assert [f.result() for f in pending] == list(range(5))
    with pytest.raises(Closed):
        worker.submit(6)


async def test_idle_hook_runs_when_nothing_comes() -> None:
    ran = threading.Event()
    worker: GroupThread[int, int] = GroupThread("t", lambda items: items, idle=lambda: 0.01, on_idle=ran.set)
    worker.start()
    assert await asyncio.to_thread(ran.wait, 5)
    await worker.stop()


async def test_a_handler_that_answers_the_wrong_number_fails_the_group_instead_of_hanging() -> None:
    worker: GroupThread[int, int] = GroupThread("t", lambda items: items[:-1])
    worker.start()
    with pytest.raises(RuntimeError, match="answers for"):
        await asyncio.wait_for(worker.submit(1), 5)
    await worker.stop()
