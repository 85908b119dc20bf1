"""Watching the config file: reload when its contents change on disk, however they change.

"The config" is routes.yaml and the files its templates read (``body: {file: …}`` and their
includes: :attr:`~gateway.config.loader.LoadedConfig.files`); a change to any of them is a new
version. The files are read and hashed in a thread and parsed and validated in the reloader's
config worker, so however large or hostile the new contents, the event loop only waits. An invalid
file is logged once (``config.invalid``, with its issues) and the running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from gateway.config.loader import config_version, files_on_disk
from gateway.config.yamlsrc import ConfigError
from gateway.logs import event
from gateway.reload.reloader import Reloader, ReloadFailed, _read


async def watch(reloader: Reloader, path: str, *, debounce_ms: int = 300, poll_seconds: float = 5.0,
                force_polling: bool | None = None) -> None:
    """Reload when the config's contents change, however they change.

    Watches the directory of the file and of each file it reads (non-recursively): that sees an
    in-place write, an editor's write-and-rename, and a Kubernetes ConfigMap update, where
    ``routes.yaml`` (and each of the ConfigMap's other files) is a symlink into ``..data``, itself a
    symlink to a timestamped directory that is swapped by renaming a new ``..data`` over the old
    one. When a file is a symlink, its target's directory is watched too (and follows the link when
    it changes). Whatever the event, the files are re-read and acted on only when the version they
    make changed; a slow periodic check catches what the OS did not report (a full inotify queue,
    a network file system, a replaced directory).
    """
    from watchfiles import awatch

    while True:
        watched = _watched(reloader, path)
        directories, files = watched
        try:
            async for _changes in awatch(*directories, watch_filter=_concerns(*files), debounce=debounce_ms,
                                         recursive=False,
                                         rust_timeout=int(poll_seconds * 1000), yield_on_timeout=True,
                                         force_polling=force_polling, ignore_permission_denied=True):
                await check_file(reloader, path)
                if _watched(reloader, path) != watched:
                    break  # a symlink points elsewhere now, or the config reads other files: watch those
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the directory vanished, inotify limits...: poll until it is back
            event(reloader.log, "config.watch_failed", logging.WARNING, path=path, error=str(exc))
            await asyncio.sleep(poll_seconds)
            with contextlib.suppress(Exception):
                await check_file(reloader, path)


def _version_on_disk(path: str, base_dir: str, files: Iterable[str]) -> str:
    """The version routes.yaml and the running config's ``files`` make now; a routes.yaml that is
    not UTF-8 gets one of its bytes, so it is acted on (and reported invalid) once like any other
    change. A file routes.yaml starts or stops reading changes routes.yaml itself."""
    read = files_on_disk(base_dir, files)
    try:
        return config_version(_read(path), read)
    except UnicodeDecodeError:
        with open(path, "rb") as fh:
            return "bytes-" + hashlib.sha256(fh.read()).hexdigest()[:12]


def _concerns(*paths: str) -> Callable[[Any, str], bool]:
    """Which changes in the watched directories can be the config's: its files' names, their
    symlink targets', and Kubernetes' ``..data`` / ``..<timestamp>`` entries. Anything else there
    (a spool or an output file kept beside the config, written for every message) does not make
    the gateway re-read and hash the files; the periodic check still looks whatever happened."""
    names = {os.path.basename(p) for path in paths for p in (path, os.path.realpath(path))}

    def concerns(_change: Any, changed: str) -> bool:
        name = os.path.basename(changed)
        return name in names or name.startswith("..")

    return concerns


def _watched(reloader: Reloader, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The directories to watch and the files that matter in them: routes.yaml and the files the
    running config reads; each file's own directory and its symlink target's."""
    config = reloader.host.config
    paths = (path, *(os.path.join(config.base_dir, name) for name in sorted(config.files)))
    directories: dict[str, None] = {}
    for i, file in enumerate(paths):
        target = os.path.realpath(file)
        own = os.path.dirname(os.path.abspath(file))
        if i == 0 or os.path.isdir(own):  # a template's missing directory: the periodic check looks
            directories[own] = None
        if os.path.isdir(os.path.dirname(target)):
            directories[os.path.dirname(target)] = None
    return tuple(directories), paths


async def check_file(reloader: Reloader, path: str) -> dict[str, Any] | None:
    """Reload if routes.yaml or a file it reads differs from what was last acted on."""
    config = reloader.host.config
    try:
        version = await asyncio.to_thread(_version_on_disk, path, config.base_dir, list(config.files))
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

