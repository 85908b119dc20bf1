"""The live message log: the last messages per route and recent bodies as dry-run samples."""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from gateway.contract import Outcome
from gateway.envelope import Envelope
from gateway.logs import event

_log = logging.getLogger("gateway.admin")


class LiveLog:
    """The last messages per route (id, time, outcome, targets, config version), for the editor.

    It wraps the ``Deliver`` callable: the routing state is read right before the inner
    ``deliver`` takes its own snapshot (no await in between), so both see the same version. The
    hot path only appends to a bounded ring; which routes took each message is worked out when
    someone looks (``recent``), so an unwatched gateway pays almost nothing. Recent UTF-8
    bodies up to ``max_sample`` bytes are kept as dry-run samples, served to editors only.
    """

    def __init__(self, per_route: int = 50, samples: int = 50, max_sample: int = 64 * 1024, ring: int = 500):
        self.per_route = per_route
        self.max_sample = max_sample
        self._routes: dict[str, collections.deque[dict[str, Any]]] = {}
        self._samples: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._max_samples = samples
        # (envelope, routing state, selection if already known, outcome, time)
        self._ring: collections.deque[tuple[Envelope, Any, list[Any] | None, Outcome, float]] = \
            collections.deque(maxlen=ring)

    def observe(self, env: Envelope, state: Any, outcome: Outcome) -> None:
        """A :meth:`Delivery.add_observer` hook: ``state`` is what the message was routed under."""
        if self._ring and self._ring[-1][1] is not state:
            # The first message after a reload: the ring would keep the replaced routing state (a
            # whole config, 100+ MiB with 10,000 routes) alive until 500 more messages came.
            self._drain()
        if len(env.body) <= self.max_sample:
            self._ring.append((env, state, None, outcome, time.time()))
        else:  # do not hold large bodies: select now, keep the envelope without its body
            with contextlib.suppress(Exception):
                self._ring.append((env.evolve(body=b""), state, state.router.select(env), outcome, time.time()))

    def _drain(self) -> None:
        while self._ring:
            env, state, selected, outcome, at = self._ring.popleft()
            try:
                self.record(env, state.router.select(env) if selected is None else selected, state.version,
                            outcome, at)
            except Exception as exc:  # the live view must never fail a request
                event(_log, "live.record_failed", logging.DEBUG, envelope_id=env.id, error=str(exc))

    def record(self, env: Envelope, selected: list[Any], version: str, outcome: Outcome,
               at: float | None = None) -> None:
        when = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
        entry = {"id": env.id, "time": when.isoformat(timespec="milliseconds"), "source": env.source,
                 "subject": env.subject, "outcome": outcome.status.value, "reason": outcome.reason,
                 "version": version}
        for sel in selected or [None]:
            route = sel.route if sel is not None else None
            name = route.name if route is not None else ""
            targets = [t.connector for t in route.targets] if route is not None and not sel.error else []
            q = self._routes.get(name)
            if q is None:
                q = self._routes[name] = collections.deque(maxlen=self.per_route)
            q.append({**entry, "route": name, "targets": targets})
        if env.body and len(env.body) <= self.max_sample:
            try:
                body = env.body.decode("utf-8")
            except UnicodeDecodeError:
                return
            self._samples[env.id] = {"source": env.source, "subject": env.subject, "content_type": env.content_type,
                                     "headers": dict(env.headers), "body": body}
            while len(self._samples) > self._max_samples:
                self._samples.popitem(last=False)

    def recent(self, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
        """Newest first, per route ('' = no route matched)."""
        self._drain()
        return {name: list(q)[-limit:][::-1] for name, q in self._routes.items()}

    def sample(self, envelope_id: str) -> dict[str, Any] | None:
        self._drain()
        s = self._samples.get(envelope_id)
        return dict(s) if s is not None else None

