"""Ending background tasks within a bound, whatever the library code inside them does.

``asyncio.gather`` after ``cancel()``, and ``asyncio.wait_for`` on Python 3.11 when its timeout
fires, both wait until the cancelled task has really ended. A task stuck in a protocol library
that swallows its cancellation (seen once: aioimaplib after a refused IDLE ``DONE``) then holds a
connector's close, and the gateway's shutdown, for ever. These helpers wait at most a given time
and leave behind what did not end, for the caller to log; the connection under it is closed by
the caller anyway.
"""

from __future__ import annotations

import asyncio
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
