"""Work that ignores cancellation, as a protocol library stuck on its own state may: for tests of
code that must end within a bound anyway (gateway.tasks and the connectors that use it)."""

from __future__ import annotations

import asyncio


async def ignoring_cancellation(release: asyncio.Event) -> None:
    """Wait for ``release``, swallowing every cancellation meanwhile."""
    while not release.is_set():
        try:
            await release.wait()
        except asyncio.CancelledError:
            continue
