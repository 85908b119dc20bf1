"""Deadlines for the per-message path: ``asyncio.timeout``, checked by one timer.

``asyncio.timeout`` starts and cancels an event-loop timer on every use: about 5 µs with uvloop,
as much as the work it guards on a message's way through the gateway (a body read, a send). A
:class:`Deadlines` keeps its open deadlines in a set and one timer looks at them every ``tick``
seconds while any is open, so opening and closing one costs a few attribute writes and a
deadline fires at most one tick late.

    deadlines = Deadlines()                 # one per owner (a connector, the delivery engine)
    with deadlines.after(10.0):             # like ``async with asyncio.timeout(10.0)``:
        body = await read()                 # the task is cancelled when overdue and the block
                                            # raises TimeoutError
"""

from __future__ import annotations

import asyncio
from types import TracebackType

#: How often open deadlines are checked (seconds): how late one may fire.
TICK = 0.05


class Deadline:
    """One open deadline of the current task (a context manager; use :meth:`Deadlines.after`)."""

    __slots__ = ("_at", "_cancelling", "_fired", "_owner", "_seconds", "_task")

    def __init__(self, owner: Deadlines, seconds: float):
        self._owner = owner
        self._seconds = seconds
        self._fired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        owner = self._owner
        loop = task.get_loop()
        self._at = loop.time() + self._seconds
        owner._open.add(self)
        if owner._timer is None:
            owner._timer = loop.call_later(owner.tick, owner._sweep, loop)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._owner._open.discard(self)
        # As asyncio.timeout: our cancellation becomes TimeoutError unless another one came too.
        if self._fired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()


class Deadlines:
    """The open deadlines of one owner and the timer that checks them."""

    def __init__(self, tick: float = TICK):
        self.tick = tick
        self._open: set[Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None

    def after(self, seconds: float) -> Deadline:
        """A deadline ``seconds`` from when the ``with`` block is entered."""
        return Deadline(self, seconds)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for deadline in [d for d in self._open if d._at <= now and not d._fired]:
            deadline._fire()
        if self._open:
            self._timer = loop.call_later(self.tick, self._sweep, loop)
