"""The admin port: every read and action the admin API needs of the running gateway, and nothing else.

The admin package talks to the gateway only through :class:`AdminPort`; the runtime side
implements it (:class:`gateway.runtime.RuntimeAdmin`), and tests may implement it too. What it
hands out is plain data or the config and model types (:class:`~gateway.config.loader.LoadedConfig`,
dead letters, the metrics registry), never a connector, a slot or the runtime itself.

Errors are those of the parts behind it: the reload actions raise
:class:`~gateway.config.yamlsrc.ConfigError`, :class:`~gateway.reload.ReloadRefused`,
:class:`~gateway.reload.ReloadFailed` and :class:`~gateway.reload.worker.WorkerBusy`; the
dead-letter operations raise :class:`~gateway.delivery.store.SpoolError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.config.loader import LoadedConfig
from gateway.config.yamlsrc import ConfigError
from gateway.contract import Outcome
from gateway.delivery.options import RoutingState
from gateway.delivery.store import DeadLetter, DeadLetterFilter
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from gateway.registry import Registry

T = TypeVar("T")


@dataclass(frozen=True)
class ConnectorStatus:
    """One configured connector as the admin API shows it."""

    kind: str
    #: Started and its health check passes.
    up: bool
    detail: str
    #: ``starting``, ``up``, ``down`` or ``stopped`` (the lifecycle, not the health check).
    state: str
    #: A route's source (it listens).
    inbound: bool
    #: Its kind can send (a dead letter can be replayed to it).
    outbound: bool


class AdminPort(Protocol):
    """What the admin API reads from and asks of the running gateway."""

    # --- reads -----------------------------------------------------------------------------------

    @property
    def config(self) -> LoadedConfig:
        """The running config (replaced, never mutated, by a reload)."""

    @property
    def config_path(self) -> str | None:
        """The config file, or None for a gateway started without one."""

    @property
    def registry(self) -> Registry:
        """The connector kinds (to validate candidates and build the schema)."""

    @property
    def started_at(self) -> float:
        """When the gateway started (``time.time()``)."""

    @property
    def metrics(self) -> Metrics:
        """The gateway's metrics (``/metrics`` and the overview's counters)."""

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Can this pod accept work now, and why not (what ``/readyz`` shows)."""

    def connectors(self) -> dict[str, ConnectorStatus]:
        """Every configured connector by name."""

    def circuit(self, connector: str) -> str:
        """The delivery circuit of an outbound connector (``closed``, ``open``, ``half-open``)."""

    def observe(self, fn: Callable[[Envelope, RoutingState, Outcome], None]) -> None:
        """Call ``fn`` with every routed message, the routing state it took and its outcome."""

    # --- the config ------------------------------------------------------------------------------

    def last_reload(self) -> dict[str, Any]:
        """The last reload attempt: outcome, version, when, by whom, errors."""

    def history(self) -> list[dict[str, Any]]:
        """The versions applied, newest first."""

    def history_text(self, version: str) -> str | None:
        """The text of a version in the history, None if it is not there."""

    async def run_config_job(self, job: Callable[[], T]) -> T:
        """``job()`` in the config worker, off the event loop (WorkerBusy when its queue is full)."""

    async def reload_from_file(self, *, by: str) -> dict[str, Any]:
        """Re-read the config file and apply it if it changed."""

    async def save_and_apply(self, text: str, *, base: str, by: str, note: str = "") -> dict[str, Any]:
        """Check ``base`` is the running version, validate, save atomically and apply ``text``."""

    async def restore_running(self, seen: str, running: LoadedConfig) -> str:
        """Write the running text over the file on disk if it still holds ``seen``; the replaced version."""

    def record_refused(self, reason: str, *, by: str, base: str, status: int, version: str = "") -> None:
        """Log an edit refused before it was validated."""

    def record_invalid(self, exc: ConfigError, by: str, version: str = "") -> None:
        """Count and log a config refused as invalid."""

    # --- dead letters ----------------------------------------------------------------------------

    async def dead_letters(self, flt: DeadLetterFilter, limit: int) -> tuple[list[DeadLetter], int]:
        """Up to ``limit`` dead letters that match, and how many match in all."""

    async def dead_letter(self, dl_id: int) -> DeadLetter | None: ...

    async def replay_dead_letters(self, ids: Sequence[int] | None, flt: DeadLetterFilter | None, *,
                                  connector: str | None, by: str = "") -> int:
        """Spool the selected dead letters again (to ``connector`` instead of their own, if
        given) and wake their deliveries; how many. ``by`` (who asked) goes into their provenance."""

    async def purge_dead_letters(self, ids: Sequence[int] | None, flt: DeadLetterFilter | None) -> int:
        """Delete the selected dead letters; how many."""

    # --- provenance ------------------------------------------------------------------------------

    async def message_records(self, key: str) -> list[dict[str, Any]]:
        """The provenance records ``key`` names (an envelope id, a trace id, a Message-ID, a
        correlation id or an Idempotency-Key), in the order they arrived; empty when none (or
        provenance is off).
        See :func:`gateway.delivery.provenance.read`."""
