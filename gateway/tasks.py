"""Bounded background work: ending tasks within a bound, counting work in flight, backing off.

Ending tasks (:func:`cancel_and_wait`, :func:`within`, :func:`retrieve`):

``asyncio.gather`` after ``cancel()``, and ``asyncio.wait_for`` on Python 3.11 when its timeout
fires, both wait until the cancelled task has really ended. A task stuck in a protocol library
that swallows its cancellation (seen once: aioimaplib after a refused IDLE ``DONE``) then holds a
connector's close, and the gateway's shutdown, for ever. These helpers wait at most a given time
and leave behind what did not end, for the caller to log; the connection under it is closed by
the caller anyway.

Counting work in flight (:class:`InFlight`): what a connector's ``stop_listening(drain)`` waits
for, without polling. Backing off (:class:`Backoff`): the capped, jittered, resettable waits of
every reconnect and retry loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Iterable
from typing import Any


def retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen (a done callback): asyncio would otherwise
    log "exception was never retrieved" for a task nobody awaits any more."""
    if not fut.cancelled():
        fut.exception()


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], timeout: float) -> set[asyncio.Future[Any]]:  # noqa: ASYNC109
    """Cancel ``tasks`` and wait up to ``timeout`` seconds for them to end; the ones still
    running then (they ignored the cancellation)."""
    tasks = set(tasks)
    if not tasks:
        return set()
    for task in tasks:
        task.cancel()
        task.add_done_callback(retrieve)
    _, stuck = await asyncio.wait(tasks, timeout=timeout)
    return stuck


async def within(work: Awaitable[Any], timeout: float) -> bool:  # noqa: ASYNC109
    """Run ``work`` for up to ``timeout`` seconds, then cancel it without waiting for it to end.
    True when it finished in time; its result and any exception are dropped (best effort work,
    such as a polite LOGOUT before closing)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(retrieve)
    await asyncio.wait({task}, timeout=timeout)
    if task.done():
        return True
    task.cancel()
    return False


class InFlight:
    """How many messages a connector is handling now, and a wait until it handles none.

    ``with inflight:`` around the work (or :meth:`add` and :meth:`done` when it starts and ends in
    different places). ``await inflight.drained(timeout)`` returns as soon as the count is zero
    (the last :meth:`done` wakes it: no polling) or after ``timeout`` seconds, and says which.
    """

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return self._count

    def add(self) -> None:
        self._count += 1
        self._idle.clear()

    def done(self) -> None:
        if self._count <= 0:
            raise RuntimeError("InFlight.done() without a matching add()")
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    def __enter__(self) -> InFlight:
        self.add()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()

    async def drained(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for the count to reach zero; True when it did."""
        if self._count == 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=max(0.0, timeout))
        return self._count == 0


class Backoff:
    """The waits between attempts at something that failed (a reconnect, a resubscribe, a retry).

    The bound starts at ``first`` and doubles after every :meth:`next` up to ``cap``; each wait is
    drawn from 50–100 % of the bound ("equal jitter", so replicas that failed together do not
    retry in step). :meth:`reset` after a success starts again at ``first``.
    """

    def __init__(self, first: float, cap: float, *, rng: random.Random | None = None) -> None:
        if not 0 < first <= cap:
            raise ValueError(f"Backoff needs 0 < first <= cap (got first={first}, cap={cap})")
        self.first = first
        self.cap = cap
        self._bound = first
        self._rng = rng or random.Random()

    @property
    def bound(self) -> float:
        """The longest the next wait can be (before ``at_least``)."""
        return self._bound

    def next(self, at_least: float = 0.0) -> float:
        """The next wait in seconds. ``at_least`` (a peer's Retry-After) raises the bound for this
        wait, never above ``cap``."""
        bound = min(self.cap, max(self._bound, at_least))
        self._bound = min(self.cap, self._bound * 2)
        return bound * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self._bound = self.first
