"""The config worker: one thread beside the event loop for the CPU-heavy config work.

Parsing and validating a candidate routes.yaml (a reload, an edit, a validation or a dry run
from the admin API), diffing two versions and round-tripping an edit all run here, never on
the event loop that every protocol shares. Jobs run one at a time, in the order they came.

Admission: a job of the admin API (``wait=False``) is refused with :class:`WorkerBusy` (answered
``503`` + ``Retry-After``) while ``queue`` jobs already wait behind the running one. A job of
the file watcher or SIGHUP (``wait=True``) always takes its turn: a change on disk is never
dropped. A job whose caller gave up (a client that disconnected) still runs to its end and keeps
its place while it does, so the thread never holds more than one job's work at a time.

No full collection runs while a job runs. A job builds hundreds of thousands of objects (a
10,000-route config), and a collection that walks them holds the GIL, in this thread as on the
loop, for a second or more. A job whose result is kept (``keep=True``: a config to apply) ends with
``gc.freeze()``, so no later collection walks the config either; what it holds is freed by reference
counting alone once :func:`dismantle` has broken its few cycles.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from gateway.config.loader import LoadedConfig

T = TypeVar("T")

#: Jobs that may wait behind the running one before the admin API is told to come back later.
QUEUE = 2
#: The Retry-After of a refusal, in seconds.
RETRY_AFTER = 2


class WorkerBusy(Exception):
    """The admin API's job was refused: the worker has a full queue. Answer 503 + Retry-After."""

    def __init__(self, retry_after: int = RETRY_AFTER):
        super().__init__(f"the config worker is busy with other validations; retry in {retry_after} s")
        self.retry_after = retry_after


class ConfigWorker:
    """Runs config jobs in one thread, one at a time, with a bounded queue for the admin API."""

    def __init__(self, *, queue: int = QUEUE):
        self.queue = queue
        self.pending = 0  # the running job and those waiting, touched on the event loop only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="config-worker")

    async def run(self, job: Callable[[], T], *, wait: bool = False, keep: bool = False) -> T:
        """The result of ``job()`` run in the worker thread (its exception if it raised).

        ``wait=False`` raises :class:`WorkerBusy` instead of queueing behind ``queue`` others.
        ``keep=True``: the result lives on (a config to apply): frozen out of the collector's sight.
        """
        if not wait and self.pending > self.queue:
            raise WorkerBusy()
        future = asyncio.get_running_loop().run_in_executor(self._executor, _uncollected, job, keep)
        self.pending += 1
        future.add_done_callback(self._finished)
        return await asyncio.shield(future)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if not future.cancelled():
            future.exception()  # retrieved: a caller that gave up does not make it "never retrieved"

    def close(self) -> None:
        """Drop the waiting jobs; the running one finishes in its thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)


#: The GIL switch interval while a job runs (Python's default is 5 ms). The loop gives the GIL up at
#: every system call, and a thread that takes it keeps it until the interval runs out: with a
#: second of config work beside it, each of the loop's turns waited 5 ms per system call.
SWITCH_INTERVAL = 0.0005


def _uncollected(job: Callable[[], T], keep: bool) -> T:
    """``job()`` with no full collection and a short GIL switch interval; with ``keep``, what it made
    is frozen (``gc.freeze``).

    The young generations are still collected meanwhile: the loop goes on making garbage, and what
    of it is left when the config is frozen stays for good (pausing the collector for a whole build
    under load froze, and leaked, ~75 MiB of the loop's garbage per reload). Everything else is
    collected first, a cheap walk when all the rest is frozen."""
    thresholds = gc.get_threshold()
    interval = sys.getswitchinterval()
    if keep:
        gc.collect()
    gc.set_threshold(thresholds[0], thresholds[1], 1 << 30)
    sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
    try:
        result = job()
        if keep:
            gc.collect(0)
            gc.freeze()
        return result
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*thresholds)


def dismantle(graves: list[LoadedConfig]) -> list[LoadedConfig]:
    """Take apart, in the worker thread and a piece at a time, each config of ``graves`` that nothing
    else holds any more (no message in flight on its routes); the others are returned, to try again
    later. ``graves`` is emptied."""
    waiting = []
    while graves:
        config = graves.pop()
        # Held only by this name, its parts only by ``config`` (each count has the call's argument too).
        if (sys.getrefcount(config) > 2 or sys.getrefcount(config.router) > 2 or sys.getrefcount(config.source) > 2
                or sys.getrefcount(config.model) > 2):
            waiting.append(config)
            continue
        config.router.dismantle()
        routes = config.model.routes
        while routes:
            routes.pop()
        data = config.source.data
        raw = data.get("routes") if isinstance(data, dict) else None
        while isinstance(raw, list) and raw:
            raw.pop()
        lines = config.source.lines
        while lines:
            lines.popitem()
        del config
    return waiting
