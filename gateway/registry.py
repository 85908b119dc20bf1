"""Connector kinds, found by entry point (group ``gateway.connectors``) and loaded lazily.

A third party adds a kind by declaring an entry point in its own package; nothing in the core
changes. Tests build a :class:`Registry` with their own kinds instead of touching any global.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points

from gateway.contract import Connector
from gateway.envelope import register_parser

GROUP = "gateway.connectors"


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownKind(LookupError):
    pass


class Registry:
    def __init__(self, extra: Mapping[str, type[Connector]] | None = None, *, use_entry_points: bool = True):
        self._loaded: dict[str, type[Connector]] = dict(extra or {})
        self._eps = {ep.name: ep for ep in entry_points(group=GROUP)} if use_entry_points else {}
        for cls in self._loaded.values():
            _install_parsers(cls)

    def kinds(self) -> list[str]:
        return sorted(set(self._loaded) | set(self._eps))

    def get(self, kind: str) -> type[Connector]:
        if kind in self._loaded:
            return self._loaded[kind]
        ep = self._eps.get(kind)
        if ep is None:
            raise UnknownKind(f"unknown connector type {kind!r}{did_you_mean(kind, self.kinds())}")
        try:
            cls = ep.load()
        except ImportError as exc:
            raise UnknownKind(
                f"connector type {kind!r} needs a package that is not installed ({exc.name}); "
                f"install the matching extra, e.g. pip install 'gateway[all]'"
            ) from exc
        except AttributeError as exc:
            raise UnknownKind(f"connector type {kind!r}: entry point {ep.value!r} is broken ({exc})") from exc
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise UnknownKind(f"entry point {ep.value!r} for {kind!r} is not a Connector class")
        _install_parsers(cls)
        self._loaded[kind] = cls
        return cls


def _install_parsers(cls: type[Connector]) -> None:
    """The kind's envelope parsers (:attr:`Connector.parsers`) serve every envelope from now on."""
    for media, parse in cls.parsers.items():
        register_parser(media, parse)
