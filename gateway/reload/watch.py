"""Watching the config file: reload when its contents change on disk, however they change.

The file is read and hashed in a thread and parsed and validated in the reloader's config
worker, so however large or hostile the new contents, the event loop only waits. An invalid
file is logged once (``config.invalid``, with its issues) and the running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any

from gateway.config.yamlsrc import ConfigError
from gateway.logs import event
from gateway.reload.reloader import Reloader, ReloadFailed, _read, version_of


async def watch(reloader: Reloader, path: str, *, debounce_ms: int = 300, poll_seconds: float = 5.0,
                force_polling: bool | None = None) -> None:
    """Reload when the config's contents change, however they change.

    Watches the file's directory (non-recursively): that sees an in-place write, an editor's
    write-and-rename, and a Kubernetes ConfigMap update, where ``routes.yaml`` is a symlink into
    ``..data``, itself a symlink to a timestamped directory that is swapped by renaming a new
    ``..data`` over the old one. When the file is a symlink, its target's directory is watched
    too (and follows the link when it changes). Whatever the event, the file is re-read
    and acted on only when its content hash changed; a slow periodic check catches what the OS
    did not report (a full inotify queue, a network file system, a replaced directory).
    """
    from watchfiles import awatch

    while True:
        directories = _watched_directories(path)
        try:
            async for _changes in awatch(*directories, watch_filter=_concerns(path), debounce=debounce_ms,
                                         recursive=False,
                                         rust_timeout=int(poll_seconds * 1000), yield_on_timeout=True,
                                         force_polling=force_polling, ignore_permission_denied=True):
                await check_file(reloader, path)
                if _watched_directories(path) != directories:
                    break  # the symlink points elsewhere now: watch there too
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the directory vanished, inotify limits...: poll until it is back
            event(reloader.log, "config.watch_failed", logging.WARNING, path=path, error=str(exc))
            await asyncio.sleep(poll_seconds)
            with contextlib.suppress(Exception):
                await check_file(reloader, path)


def _version_on_disk(path: str) -> str:
    """The file's version; a file that is not UTF-8 gets one of its bytes, so it is acted on (and
    reported invalid) once like any other change."""
    try:
        return version_of(_read(path))
    except UnicodeDecodeError:
        with open(path, "rb") as fh:
            return "bytes-" + hashlib.sha256(fh.read()).hexdigest()[:12]


def _concerns(path: str) -> Callable[[Any, str], bool]:
    """Which changes in the watched directories can be the config's: its own name, its symlink
    target's, and Kubernetes' ``..data`` / ``..<timestamp>`` entries. Anything else there (a spool
    or an output file kept beside the config, written for every message) does not make the
    gateway re-read and hash the file; the periodic check still looks whatever happened."""
    names = {os.path.basename(path), os.path.basename(os.path.realpath(path))}

    def concerns(_change: Any, changed: str) -> bool:
        name = os.path.basename(changed)
        return name in names or name.startswith("..")

    return concerns


def _watched_directories(path: str) -> tuple[str, ...]:
    """The file's own directory, and its symlink target's when that is elsewhere."""
    own = os.path.dirname(os.path.abspath(path))
    target = os.path.dirname(os.path.realpath(path))
    return (own,) if target == own or not os.path.isdir(target) else (own, target)


async def check_file(reloader: Reloader, path: str) -> dict[str, Any] | None:
    """Reload if the file's content differs from what was last acted on."""
    try:
        version = await asyncio.to_thread(_version_on_disk, path)
    except OSError:
        return None  # mid-swap or removed: the next event or poll looks again
    if version == reloader.seen_on_disk:
        return None
    reloader.seen_on_disk = version  # acted on once: a bad save is reported once, not every poll
    try:
        return await reloader.from_file(by="file")
    except ConfigError:
        return None  # logged and counted; the running routes stay
    except ReloadFailed:
        return None

