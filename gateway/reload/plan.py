"""The plan of a reload (pure): what a change from one config to another does to the connectors.

Which connectors it restarts, adds or removes, which unchanged ones start or stop being a route's
source, and which changed gateway settings take effect only after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config.loader import LoadedConfig

#: Gateway settings a reload cannot change in a running process (they need a restart).
_RESTART_ONLY = (("admin", "listen"), ("spool",), ("state_dir",), ("log",), ("http",), ("tracing",), ("workers",),
                 ("provenance",))


@dataclass(frozen=True)
class Plan:
    """What a reload from ``old`` to ``new`` does to the connectors."""

    restart: frozenset[str]
    added: frozenset[str]
    removed: frozenset[str]
    #: Unchanged connectors that start or stop being a route's source (listen / stop listening).
    start_listening: frozenset[str]
    stop_listening: frozenset[str]
    #: Gateway settings that changed but only take effect after a restart.
    restart_required: tuple[str, ...] = ()

    @property
    def untouched(self) -> bool:
        return not (self.restart or self.added or self.removed or self.start_listening or self.stop_listening)


def inbound_names(config: LoadedConfig) -> set[str]:
    return {s for r in config.router.routes for s in r.sources}


def plan_reload(old: LoadedConfig, new: LoadedConfig) -> Plan:
    old_in, new_in = inbound_names(old), inbound_names(new)
    common = set(old.connectors) & set(new.connectors)
    restart = {n for n in common if new.connectors[n] != old.connectors[n] or new.kinds[n] is not old.kinds[n]}
    kept = common - restart
    needs_restart = []
    old_gw, new_gw = old.model.gateway.model_dump(), new.model.gateway.model_dump()
    for path in _RESTART_ONLY:
        a, b = _dig(old_gw, path), _dig(new_gw, path)
        if a != b:
            needs_restart.append("gateway." + ".".join(path))
    return Plan(
        restart=frozenset(restart),
        added=frozenset(set(new.connectors) - set(old.connectors)),
        removed=frozenset(set(old.connectors) - set(new.connectors)),
        start_listening=frozenset(n for n in kept if n in new_in and n not in old_in),
        stop_listening=frozenset(n for n in kept if n in old_in and n not in new_in),
        restart_required=tuple(needs_restart),
    )


def _dig(data: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = data
    for p in path:
        cur = cur.get(p) if isinstance(cur, Mapping) else None
    return cur
