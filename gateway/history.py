"""Config history: the last N applied versions of routes.yaml, who applied them and when.

Each applied version's full text is kept (content-addressed by its version), so any two can be
diffed and any one rolled back to, comments and layout included. The history lives on disk
under the gateway's state directory and survives a restart; when that directory cannot be
written it is kept in memory only (logged once). Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from gateway.logs import event

#: How many applied versions are kept.
KEEP = 20


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old file or the new one, never half.

    Writes a temporary file beside it, fsyncs it, renames it over ``path`` and fsyncs the
    directory. A symlink at ``path`` is followed (its target is replaced, the link stays). The
    file keeps its permission bits. Raises :class:`OSError` (read-only file system, permissions).
    """
    target = os.path.realpath(path)
    directory = os.path.dirname(target) or "."
    try:
        mode: int | None = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        mode = None
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


#: Changed lines (between the lines the two texts start and end with in common) past which the
#: diff is one line saying which lines differ: difflib's time grows with the lines times the
#: changed places, and a change to each of 10,000 routes took it minutes of the config worker.
MAX_DIFF_LINES = 5000


def unified_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    """A unified diff of two config texts ('' when equal)."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    same = min(len(a), len(b))
    head = 0
    while head < same and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < same - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    changed = max(len(a), len(b)) - head - tail
    if changed > MAX_DIFF_LINES:
        return (f"--- {old_name}\n+++ {new_name}\n@@ -{head + 1},{len(a) - head - tail} +{head + 1},"
                f"{len(b) - head - tail} @@ {changed} lines differ: too many to list line by line\n")
    lines = difflib.unified_diff(a, b, fromfile=old_name, tofile=new_name)
    out = []
    for line in lines:
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


@dataclass(frozen=True)
class Entry:
    """One applied version."""

    version: str
    applied_at: float
    #: Who applied it: ``startup``, ``file``, ``sighup``, or the admin token's name.
    by: str
    #: Short note, e.g. ``rollback to 1a2b3c4d5e6f``.
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class History:
    """Applied versions, newest last, at most ``keep`` of them."""

    def __init__(self, directory: str | None, *, keep: int = KEEP, log: logging.Logger | None = None):
        self.directory = directory
        self.keep = keep
        self.log = log or logging.getLogger("gateway.history")
        self._entries: list[Entry] = []
        self._texts: dict[str, str] = {}
        self._disk = directory is not None
        if directory is not None:
            self._load(directory)

    # --- reading ---------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Newest first."""
        return list(reversed(self._entries))

    def latest(self) -> Entry | None:
        return self._entries[-1] if self._entries else None

    def text(self, version: str) -> str | None:
        if version in self._texts:
            return self._texts[version]
        if self._disk and self.directory and _is_version(version) and any(e.version == version for e in self._entries):
            try:
                with open(os.path.join(self.directory, f"{version}.yaml"), encoding="utf-8") as fh:
                    return fh.read()
            except OSError:
                return None
        return None

    # --- writing ---------------------------------------------------------------------------

    def record(self, version: str, text: str, by: str, note: str = "", at: float | None = None) -> Entry:
        """Add an applied version (blocking file IO: call it in a thread from async code)."""
        entry = Entry(version, at if at is not None else time.time(), by, note)
        self._entries.append(entry)
        dropped = self._entries[:-self.keep]
        del self._entries[:-self.keep]
        kept = {e.version for e in self._entries}
        self._texts[version] = text
        for e in dropped:
            if e.version not in kept:
                self._texts.pop(e.version, None)
        if self._disk and self.directory:
            try:
                os.makedirs(self.directory, exist_ok=True)
                path = os.path.join(self.directory, f"{version}.yaml")
                if not os.path.exists(path):
                    atomic_write(path, text)
                atomic_write(os.path.join(self.directory, "index.json"),
                             json.dumps([e.as_dict() for e in self._entries], indent=1))
                for e in dropped:
                    if e.version not in kept:
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(self.directory, f"{e.version}.yaml"))
                # Texts are on disk now; memory keeps only the newest.
                self._texts = {version: text}
            except OSError as exc:
                self._disk = False
                event(self.log, "history.memory_only", logging.WARNING, directory=self.directory,
                      error=exc.strerror or str(exc))
        return entry

    def _load(self, directory: str) -> None:
        index = os.path.join(directory, "index.json")
        try:
            with open(index, encoding="utf-8") as fh:
                raw = json.load(fh)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            event(self.log, "history.unreadable", logging.WARNING, path=index, error=str(exc))
            return
        if not isinstance(raw, list):
            return
        for item in raw[-self.keep:]:
            try:
                entry = Entry(str(item["version"]), float(item["applied_at"]), str(item["by"]),
                              str(item.get("note", "")))
            except (KeyError, TypeError, ValueError):
                continue
            if _is_version(entry.version):
                self._entries.append(entry)


def _is_version(version: str) -> bool:
    """Versions are hex content hashes; anything else never becomes a file name."""
    return 0 < len(version) <= 64 and all(c in "0123456789abcdef" for c in version)
