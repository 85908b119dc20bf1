"""What every spool backend stores and the interface the delivery engine drives.

A *job* is one envelope for one target connector. The engine writes jobs (and, in the same
durable write, any dead letters and the idempotency record of the message) before the inbound
side acknowledges; it then *claims* due jobs per connector, and each claimed job ends in
exactly one of :meth:`SpoolBackend.done`, :meth:`SpoolBackend.reschedule`,
:meth:`SpoolBackend.dead_letter` or :meth:`SpoolBackend.release`. A claimed job is not handed
out again until then (by this process; after a crash everything unfinished is due again).

Two backends implement :class:`SpoolBackend`: the embedded SQLite file
(:class:`gateway.delivery.spool.Spool`, the default) and RabbitMQ quorum queues shared by
several replicas (:class:`gateway.delivery.rabbit.RabbitSpool`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.contract import TargetOptions
from gateway.envelope import Envelope


class SpoolError(Exception):
    """The spool could not store or update something (disk error, broker down, corrupt file)."""


class SpoolFull(SpoolError):
    """Free space on the spool's filesystem is below the configured minimum."""


@dataclass
class Job:
    envelope_id: str
    route: str
    connector: str
    envelope: str  # Envelope.to_json()
    options: str  # JSON of the rendered target options
    policy: str  # JSON of the route's retry policy ("{}" = defaults)
    attempts: int = 0
    created_at: float = 0.0
    next_at: float = 0.0
    last_error: str = ""
    #: Seconds one send attempt may take (the route's timeout).
    timeout: float = 30.0
    id: int | None = None
    #: Not stored: the envelope and target options this job was made from, when the job is
    #: handed from memory to its worker (they equal what ``envelope`` and ``options`` parse to).
    loaded: tuple[Envelope, TargetOptions] | None = field(default=None, repr=False, compare=False)


@dataclass
class DeadLetter:
    id: int
    envelope_id: str
    route: str
    connector: str
    envelope: str
    options: str
    reason: str
    last_error: str
    attempts: int
    first_at: float
    dead_at: float
    policy: str = "{}"
    timeout: float = 30.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "envelope_id": self.envelope_id, "route": self.route, "connector": self.connector,
            "reason": self.reason, "last_error": self.last_error, "attempts": self.attempts,
            "first_at": self.first_at, "dead_at": self.dead_at,
            "envelope": _loads(self.envelope), "options": _loads(self.options),
        }


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a corrupt row is still shown, as stored


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a list, replay or purge applies to. Empty: all of them."""

    route: str | None = None
    connector: str | None = None
    reason: str | None = None
    envelope_id: str | None = None
    since: float | None = None
    until: float | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.route, self.connector, self.reason, self.envelope_id, self.since,
                                       self.until))


@dataclass(frozen=True)
class Remembered:
    """The answer given to a message that carried an idempotency key."""

    source: str
    key: str
    envelope_id: str
    status: str  # a contract.Status value
    at: float = 0.0


class SpoolBackend(Protocol):
    """The durable store behind spooled routes. All methods raise only :class:`SpoolError`."""

    @property
    def healthy(self) -> bool:
        """False after a failed write until a write (or the periodic probe) succeeds again."""

    @property
    def has_space(self) -> bool:
        """False while the store is (nearly) full: new messages are refused, readiness is false.
        (:meth:`check_space` answered as a flag; backends inherit this.)"""
        try:
            self.check_space()
        except SpoolFull:
            return False
        return True

    @property
    def shared(self) -> bool:
        """True when several gateway processes share this store (the depth seen is everyone's)."""

    def check_space(self) -> None:
        """Raise :class:`SpoolFull` when there is no room for new messages (cheap; cached)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    async def put(
        self, jobs: Sequence[Job], *, dead: Sequence[tuple[Job, str, str]] = (), remember: Remembered | None = None,
    ) -> None:
        """Store jobs, dead letters ``(job, reason, error)`` and the idempotency record durably,
        all or nothing. Raises :class:`SpoolFull` when there is no room."""

    async def attach(self, connector: str, wake: Callable[[], None], prefetch: int) -> None:
        """The engine delivers ``connector``'s jobs from now on: call ``wake`` when new ones may
        be due (a pushing backend); take at most ``prefetch`` ahead of the claims."""

    async def claim(self, connector: str, limit: int) -> list[Job]:
        """Up to ``limit`` jobs for ``connector`` that are due now, leased to the caller."""

    async def next_due_at(self, connector: str) -> float | None:
        """When the next unleased job of ``connector`` is due (epoch seconds), or None."""

    async def done(self, job: Job) -> None: ...

    async def done_many(self, jobs: Sequence[Job]) -> None:
        """:meth:`done` for several jobs at once."""

    async def reschedule(self, job: Job, next_at: float, error: str) -> None:
        """Keep the job for another attempt at ``next_at``; ``job.attempts`` is already counted."""

    async def release(self, job: Job, delay: float = 0.0) -> None:
        """Give a claimed job back unchanged (not attempted), due again after ``delay`` seconds."""

    async def dead_letter(self, job: Job, reason: str, error: str) -> int:
        """Move a job (claimed or never stored) to the dead letters durably."""

    async def connectors_with_jobs(self) -> list[str]: ...

    async def depth(self) -> dict[str, tuple[int, float]]:
        """Per connector: (jobs waiting, created_at of the oldest)."""

    async def recall(self, source: str, key: str, since: float) -> Remembered | None:
        """The answer remembered for ``(source, key)`` if it was given after ``since``."""

    async def forget_before(self, before: float) -> int:
        """Drop idempotency records older than ``before``; returns how many."""

    async def dead_letters(self, flt: DeadLetterFilter | None = None, limit: int = 100) -> list[DeadLetter]: ...
    async def dead_letter_by_id(self, dl_id: int) -> DeadLetter | None: ...
    async def count_dead_letters(self, flt: DeadLetterFilter | None = None) -> int: ...

    async def replay(
        self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None, *, connector: str | None = None,
    ) -> list[str]:
        """Move dead letters back to the jobs (to ``connector`` instead of the original target when
        given, with that connector's default options). Returns the connectors that got jobs."""

    async def purge(self, ids: Sequence[int] | None = None, flt: DeadLetterFilter | None = None) -> int: ...
