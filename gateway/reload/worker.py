"""The config worker: one thread beside the event loop for the CPU-heavy config work.

Parsing and validating a candidate routes.yaml (a reload, an edit, a validation or a dry run
from the admin API), diffing two versions and round-tripping an edit all run here, never on
the event loop that every protocol shares. Jobs run one at a time, in the order they came.

Admission: a job of the admin API (``wait=False``) is refused with :class:`WorkerBusy` (answered
``503`` + ``Retry-After``) while ``queue`` jobs already wait behind the running one. A job of
the file watcher or SIGHUP (``wait=True``) always takes its turn: a change on disk is never
dropped. A job whose caller gave up (a client that disconnected) still runs to its end and keeps
its place while it does, so the thread never holds more than one job's work at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

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

    async def run(self, job: Callable[[], T], *, wait: bool = False) -> T:
        """The result of ``job()`` run in the worker thread (its exception if it raised).

        ``wait=False`` raises :class:`WorkerBusy` instead of queueing behind ``queue`` others.
        """
        if not wait and self.pending > self.queue:
            raise WorkerBusy()
        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
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
