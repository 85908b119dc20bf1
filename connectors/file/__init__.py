"""file — append each message as one JSON line to a local file, rotated by size.

Features: outbound only; one line per envelope (``format: envelope``, the default: id, source,
subject, headers, attributes, time, body as UTF-8 or base64) or the raw body alone
(``format: body``); rotation at ``max_bytes`` keeping ``keep`` old files (``x.jsonl.1`` …).
Delivery guarantee: ``send`` returns only after the line is written and fsync'd; concurrent
sends share one fsync (group commit), and a spooled backlog comes as batches of up to
``gateway.spool.batch`` lines, one append and one fsync each (``send_batch``): every job of a
batch is acknowledged only after that fsync, and a failed one leaves them all in the spool. Half
a line left by a crash mid-append is ended with a newline before the next append. Address
form: ``path: var/out/messages.jsonl``.

Parts: ``config.py`` holds the options; the writing is in this module. Outbound only, so no
``inbound.py``; small enough for no ``outbound.py``; the line is the envelope's JSON or its
body, so no ``mapping.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from connectors.file.config import FileConfig, FileTarget
from gateway.sdk import (
    Closed,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Envelope,
    GroupThread,
    Health,
    Reply,
    Target,
    TransientError,
)

__all__ = ["FileConfig", "FileConnector", "FileTarget"]


def _line(env: Envelope, target: Target) -> bytes:
    opts = target.options
    assert isinstance(opts, FileTarget)
    if opts.format == "body":
        return env.body.rstrip(b"\n") + b"\n"
    return env.to_json().encode("utf-8") + b"\n"


class FileConnector(Connector):
    kind = "file"
    Config = FileConfig
    Options = FileTarget
    supports_outbound = True
    batches = True

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, FileConfig)
        self.cfg = config
        #: Appends the lines waiting, with one fsync for all of them (group commit).
        self._writer: GroupThread[bytes, None] | None = None
        self._error = ""
        #: The open file and its (device, inode), used only by the writer's thread.
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    async def open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.cfg.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise TransientError(f"cannot create {directory}: {exc.strerror}") from exc
        if self._writer is None:
            self._writer = GroupThread(f"file-{self.name}", self._append)
            self._writer.start()

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        await self._append_lines(_line(env, target))
        return None

    async def send_batch(self, items: Sequence[tuple[Envelope, Target]]) -> Sequence[Reply | BaseException | None]:
        """Every line in one write and one fsync; all are delivered or none."""
        await self._append_lines(b"".join(_line(env, target) for env, target in items))
        return [None] * len(items)

    async def _append_lines(self, data: bytes) -> None:
        if self._writer is None:
            await self.open()
        assert self._writer is not None
        try:
            await self._writer.submit(data)
        except OSError as exc:
            raise TransientError(f"cannot write {self.cfg.path}: {exc.strerror}") from exc
        except Closed as exc:
            raise TransientError(f"{self.name} is closing") from exc

    def _append(self, lines: list[bytes]) -> list[None]:
        """On the writer's thread: one write and one fsync for every line waiting."""
        try:
            self._write(b"".join(lines))
        except OSError as exc:
            self._error = f"write failed: {exc.strerror}"
            raise
        self._error = ""
        return [None] * len(lines)

    def _write(self, data: bytes) -> None:
        """Append and fsync in the writer's thread. The file stays open between batches (each
        system call is a moment this thread must win the GIL back from the event loop); a stat
        of the path tells when it was rotated, moved or removed, and it is opened again."""
        path = self.cfg.path
        try:
            st: os.stat_result | None = os.stat(path)
        except FileNotFoundError:
            st = None
        if self._fd is not None and (st is None or (st.st_dev, st.st_ino) != self._identity):
            self._close_file()
        if st is not None and st.st_size and st.st_size + len(data) > self.cfg.max_bytes:
            self._close_file()
            self._rotate()
        if self._fd is None:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            opened = os.fstat(fd)
            self._fd, self._identity = fd, (opened.st_dev, opened.st_ino)
            if opened.st_size and os.pread(fd, 1, opened.st_size - 1) != b"\n":
                # A batch cut short by a crash (kill -9, power) left half a line, never fsync'd nor
                # acknowledged (its jobs are sent again). End it, so the next line stays whole.
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if self.cfg.fsync:
                os.fsync(self._fd)
        except OSError:
            self._close_file()  # start afresh with the next batch
            raise

    def _close_file(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._identity = self._fd, None, None
            os.close(fd)

    def _rotate(self) -> None:
        path, keep = self.cfg.path, self.cfg.keep
        if keep <= 0:
            os.remove(path)
            return
        for i in range(keep - 1, 0, -1):
            if os.path.exists(f"{path}.{i}"):
                os.replace(f"{path}.{i}", f"{path}.{i + 1}")
        os.replace(path, f"{path}.1")

    async def close(self) -> None:
        if self._writer is not None:
            # Let the writer finish what was asked (and its thread let go of the file) first.
            writer, self._writer = self._writer, None
            await writer.stop()
        self._close_file()

    def health(self) -> Health:
        return Health(not self._error, self._error)
