"""The event-loop watchdog: how late the loop runs, and what held it when it was late.

Every protocol of the gateway shares one asyncio loop, so one callback that runs for a second
delays every connector, ``/healthz`` and ``/metrics`` by a second. Two parts watch for that:

- a **tick task** on the loop sleeps ``interval`` seconds and records how much later than asked
  it woke (the loop lag) in ``gateway_event_loop_lag_seconds``; each tick is one timer, about
  ten a second, which costs nothing measurable;
- a **sentinel thread** wakes every ``interval / 2`` seconds and, when the tick task has not run
  for longer than ``warn_after``, reads the loop thread's stack (``sys._current_frames``) and logs
  ``loop.blocked`` (warning) with the innermost frames: the function that holds the loop, named
  while it still holds it. When the loop runs again the tick task logs ``loop.lag`` with the whole
  stall and the frames the sentinel saw.

Neither part can stop the work that holds the loop; they make it visible (metric, alert rule
``GatewayEventLoopBlocked``, log line) so the bound that was missed can be found and added.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

from gateway.logs import event

#: How many frames of the loop thread's stack the warning names (innermost last).
STACK_FRAMES = 8


class LoopWatchdog:
    """Started by the runtime on its loop; ``stop()`` ends both parts."""

    def __init__(self, histogram: Any, log: logging.Logger, *, warn_after: float = 0.1,
                 interval: float = 0.1):
        self.histogram = histogram
        self.log = log
        self.warn_after = warn_after
        self.interval = interval
        self.worst = 0.0  # the largest lag seen, for tests and the overview
        self._beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stall_stack: str = ""  # what the sentinel saw during the current stall

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stopped.clear()
        self._task = asyncio.create_task(self._tick(), name="loop-watchdog")
        self._thread = threading.Thread(target=self._sentinel, name="loop-sentinel", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None

    async def _tick(self) -> None:
        interval = self.interval
        while True:
            asked = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._beat = now
            lag = max(0.0, now - asked - interval)
            self.histogram.observe(lag)
            self.worst = max(self.worst, lag)
            if lag > self.warn_after:
                stack, self._stall_stack = self._stall_stack, ""
                event(self.log, "loop.lag", logging.WARNING, lag_ms=round(lag * 1000), where=stack or "(not seen)")

    def _sentinel(self) -> None:
        warned_for = 0.0  # the beat of the stall already warned about
        step = self.interval / 2
        while not self._stopped.wait(step):
            beat = self._beat
            held = time.monotonic() - beat - self.interval
            if held <= self.warn_after or beat == warned_for:
                continue
            warned_for = beat
            frame = sys._current_frames().get(self._loop_thread)
            if frame is None:
                continue
            stack = _describe(frame)
            self._stall_stack = stack
            event(self.log, "loop.blocked", logging.WARNING, held_ms=round(held * 1000), where=stack,
                  pid=os.getpid())


def _describe(frame: Any) -> str:
    """The innermost frames as ``file:line function`` joined by `` < `` (innermost first)."""
    frames = traceback.extract_stack(frame)[-STACK_FRAMES:]
    return " < ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/gateway/", "/connectors/"):
        i = path.rfind(marker)
        if i >= 0:
            return path[i + 1:] if marker != "/site-packages/" else path[i + len(marker):]
    return os.path.basename(path)
