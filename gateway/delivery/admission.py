"""Admission: new spooled messages are taken in at the rate their delivery sustains.

Intake is cheaper than delivery (a spooled message is parsed and written once; delivering it is
a second trip through the loop, the sink and the spool), so without a gate a steady load fills
the spool until ``max_pending`` and then everything is refused: a cliff, with the spool at its
largest and delivery at its slowest. The gate acts before that. While a target connector has
``admit_depth`` jobs waiting — or, when ``admit_age`` is set, its oldest job is that old — a new
message for it waits, in arrival order, for a job of that connector to settle (delivered or
dead-lettered): each settled job admits one waiting message. Intake then follows delivery, the
backlog stays near ``admit_depth``, and a sender that waits for its answer (HTTP, SMTP, an MQTT
or AMQP consumer) is slowed rather than refused. A message that finds no room within
``admit_wait`` — the peer is down, or far more arrives than goes out — is refused with
retry-later (reason ``backlog`` or ``age``), as is one beyond ``max_inflight`` waiting messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from gateway.delivery.options import DeliveryOptions


class Admission:
    """The gate of every target connector. ``pending`` is the dispatcher's count of jobs waiting
    per connector (shared, updated in place)."""

    def __init__(self, options: Callable[[], DeliveryOptions], pending: dict[str, int]):
        self._options = options
        self._pending = pending
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        #: Per connector: created_at (epoch seconds) of the oldest job waiting, as last measured.
        self.oldest: dict[str, float] = {}

    def blocked(self, connector: str) -> str | None:
        """Why a new message for ``connector`` cannot go straight in (``backlog``, ``age``), or None."""
        opts = self._options()
        if self._pending.get(connector, 0) >= opts.admit_depth or self._waiting.get(connector):
            return "backlog"  # the backlog is at its bound, or others wait already (their turn first)
        return "age" if self._too_old(connector, opts) else None

    def _too_old(self, connector: str, opts: DeliveryOptions) -> bool:
        oldest = self.oldest.get(connector)
        return opts.admit_age > 0 and oldest is not None and time.time() - oldest >= opts.admit_age

    def waiting(self, connector: str) -> int:
        return len(self._waiting.get(connector, ()))

    async def admit(self, connector: str) -> str | None:
        """None once a new message for ``connector`` may be stored; else why it is refused."""
        why = self.blocked(connector)
        if why is None:
            return None
        opts = self._options()
        queue = self._waiting.setdefault(connector, deque())
        if opts.admit_wait <= 0 or len(queue) >= opts.max_inflight:
            return why
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            async with asyncio.timeout(opts.admit_wait):
                await turn
        except TimeoutError:
            pass
        finally:
            if not (turn.done() and not turn.cancelled()):  # not let in (timed out, cancelled)
                turn.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(turn)
        return None if turn.done() and not turn.cancelled() else why

    def room(self, connector: str, count: int = 1) -> None:
        """``count`` jobs of ``connector`` settled: admit as many waiting messages, while the
        backlog is below ``admit_depth`` (above it, after an outage, it drains first)."""
        queue = self._waiting.get(connector)
        if not queue or self._pending.get(connector, 0) >= self._options().admit_depth:
            return
        while queue and count > 0:
            turn = queue.popleft()
            if not turn.done():
                turn.set_result(None)
                count -= 1

    def measured(self, connector: str, count: int, oldest: float | None) -> None:
        """The spool's depth was read: the oldest job's age, and room for as many as the backlog
        is now below ``admit_depth`` (jobs may have gone without settling here: the CLI, a purge)."""
        if oldest is None:
            self.oldest.pop(connector, None)
        else:
            self.oldest[connector] = oldest
        opts = self._options()
        free = opts.admit_depth - count
        if free > 0 and not self._too_old(connector, opts):  # by age, they still go in one per settled job
            self.room(connector, free)
