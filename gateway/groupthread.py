"""A thread that does blocking work for the event loop in groups (group commit).

The loop submits items and awaits their futures; the thread takes every item waiting, hands them
to ``handle`` at once (one fsync for all of them, say) and answers the whole group with a single
call back into the loop. Work starts as soon as the thread is free, without waiting for the
loop to schedule a task first: on a busy gateway that wait was most of a spool write's latency
(measured: SMTP → spool → 250 went from 3.9 to 2.8 ms at p50 with 8 clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

I = TypeVar("I")  # noqa: E741  (item)
R = TypeVar("R")

#: Items one group takes at most.
MAX_GROUP = 4096


class Closed(RuntimeError):
    """The thread was stopped (or never started): nothing more is taken."""


class GroupThread(Generic[I, R]):
    """Runs ``handle(items)`` on its own thread for every group of submitted items.

    ``handle`` returns one result per item (an exception instance fails that item alone) or
    raises (which fails every item of the group). ``idle`` may return a timeout after which
    ``on_idle`` runs on the thread when nothing was submitted (a health probe, for example).
    """

    def __init__(self, name: str, handle: Callable[[list[I]], Sequence[R | BaseException]], *,
                 idle: Callable[[], float | None] = lambda: None, on_idle: Callable[[], None] = lambda: None):
        self.name = name
        self._handle = handle
        self._idle = idle
        self._on_idle = on_idle
        self._queue: queue.SimpleQueue[tuple[I, asyncio.Future[R]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._group: list[asyncio.Future[R]] = []  # the futures of the group being handled

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._closed

    def start(self) -> None:
        """Start the thread; it answers on the running loop."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def submit(self, item: I) -> asyncio.Future[R]:
        if self._closed or self._loop is None:
            raise Closed(f"{self.name} is stopped")
        fut: asyncio.Future[R] = self._loop.create_future()
        self._queue.put((item, fut))
        return fut

    async def stop(self) -> None:
        """Take nothing more; finish what was submitted; wait for the thread to end."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join)

    def answer_now(self, answers: dict[int, R | BaseException]) -> None:
        """From inside ``handle``: answer these items of the group (by position) right away,
        before the rest of the group is done (what ``handle`` returns for them later is ignored)."""
        if answers and self._loop is not None:
            futures = [self._group[i] for i in answers]
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, futures, list(answers.values()))

    def _serve(self) -> None:
        q = self._queue
        while True:
            try:
                first = q.get(timeout=self._idle())
            except queue.Empty:
                with contextlib.suppress(Exception):
                    self._on_idle()
                continue
            group = [first]
            with contextlib.suppress(queue.Empty):
                while len(group) < MAX_GROUP:
                    group.append(q.get_nowait())
            work = [g for g in group if g is not None]
            if work:
                answers: Sequence[Any]
                self._group = [fut for _, fut in work]
                try:
                    answers = self._handle([item for item, _ in work])
                    if len(answers) != len(work):  # else some would wait for ever
                        raise RuntimeError(f"{self.name}: {len(answers)} answers for {len(work)} items")
                except BaseException as exc:  # every item of the group fails with it
                    answers = [exc] * len(work)
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    self._loop.call_soon_threadsafe(_settle, [fut for _, fut in work], answers)
            if len(work) < len(group):  # the stop mark: everything before it is done
                return


def _settle(futures: list[asyncio.Future[Any]], answers: Sequence[Any]) -> None:
    for fut, answer in zip(futures, answers, strict=True):
        if fut.done():
            continue
        if isinstance(answer, BaseException):
            fut.set_exception(answer)
        else:
            fut.set_result(answer)
