"""Shared HTTP paths across a restart: ``503`` + ``Retry-After`` while a connector is replaced, not ``404``."""

from __future__ import annotations

from typing import Any

from gateway.http import HttpHub, Receive, Scope, Send, send_problem


def _key(listen: str, prefix: str) -> tuple[str, str]:
    return listen, "/" + prefix.strip("/") if prefix.strip("/") else "/"


async def _reloading(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send_problem(send, 503, "Service Unavailable", "this endpoint is being reloaded; retry shortly",
                           [(b"retry-after", b"1")])


class Mounts:
    """Keeps a shared HTTP path answering ``503`` (retry) while its connector is replaced.

    Connectors made by a reload mount through :meth:`for_connector`. A connector being retired
    gets :meth:`retiring`: its ``unmount`` leaves a 503 placeholder, or does nothing when a newer
    connector already serves that path; the replacement's ``mount`` removes the placeholder.
    """

    def __init__(self, hub: HttpHub):
        self.hub = hub
        self._claims: dict[tuple[str, str], _ConnectorMounts] = {}
        self._placeholders: set[tuple[str, str]] = set()

    def for_connector(self) -> _ConnectorMounts:
        return _ConnectorMounts(self, retiring=False)

    def retiring(self) -> _ConnectorMounts:
        return _ConnectorMounts(self, retiring=True)

    def clear_placeholders(self) -> None:
        for key in self._placeholders:
            self.hub.unmount(*key)
        self._placeholders.clear()


class _ConnectorMounts:
    """The :class:`~gateway.contract.HttpMount` one connector sees."""

    def __init__(self, mounts: Mounts, *, retiring: bool):
        self._m = mounts
        self._retiring = retiring

    def mount(self, listen: str, prefix: str, app: Any, *, owner: str) -> None:
        key = _key(listen, prefix)
        if key in self._m._placeholders:
            self._m.hub.unmount(*key)
            self._m._placeholders.discard(key)
        self._m.hub.mount(listen, prefix, app, owner=owner)
        self._m._claims[key] = self

    def unmount(self, listen: str, prefix: str) -> None:
        key = _key(listen, prefix)
        holder = self._m._claims.get(key)
        if holder is not None and holder is not self:
            return  # a newer connector serves this path now
        self._m._claims.pop(key, None)
        self._m.hub.unmount(*key)
        if self._retiring:
            self._m.hub.mount(listen, prefix, _reloading, owner="reload")
            self._m._placeholders.add(key)
