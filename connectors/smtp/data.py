"""Reading the DATA section: un-dot-stuffing, limits and the one true terminator.

The terminator is ``CRLF . CRLF`` and nothing else: a bare LF or CR anywhere makes the message
refused (``550 5.5.2``, SMTP smuggling), never split into two. :class:`DataReader` is the state
machine, fed either one line at a time or a block of complete lines; a block without anything
unusual in it (the common case) is checked and un-stuffed with a few whole-block byte
operations instead of line by line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

R_BARE_NEWLINE = "550 5.5.2 Bare CR or LF in message data is not allowed (RFC 5321 2.3.8)"
R_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"


class DataReader:
    """The DATA state: what was read so far and the first problem with it.

    ``max_line`` counts a line with its CRLF and one dot of stuffing; ``limit`` is the largest
    message (after un-stuffing). Once there is a problem, the rest is read and thrown away, so
    memory stays bounded and the session stays in step with the client.
    """

    __slots__ = ("at_start", "chunks", "limit", "max_line", "problem", "size", "split_cr")

    def __init__(self, limit: int, max_line: int):
        self.limit = limit
        self.max_line = max_line
        self.chunks: list[bytes] = []
        self.size = 0
        self.problem: str | None = None
        self.at_start = True  # the previous line ended with CRLF (or DATA just began)
        self.split_cr = False  # an over-long line was cut between its CR and its LF

    @property
    def message(self) -> bytes:
        return b"".join(self.chunks)

    def _fail(self, problem: str) -> None:
        if self.problem is None:
            self.problem, self.chunks = problem, []

    def line(self, line: bytes) -> bool:
        """Take one line (ending in LF); True when it was the terminator."""
        if self.at_start and line == b".\r\n":
            return True
        crlf = line.endswith(b"\r\n") or (self.split_cr and line == b"\n")
        self.split_cr = False
        if self.problem is None:
            if not crlf or line.find(b"\r", 0, len(line) - 2) != -1:
                self._fail(R_BARE_NEWLINE)
            elif len(line) > self.max_line:
                self._fail(R_LINE_TOO_LONG)
            else:
                if self.at_start and line[:1] == b".":
                    line = line[1:]
                self._add(line)
        self.at_start = crlf
        return False

    def discarded(self, part: bytes) -> None:
        """Part of a line too long to keep was thrown away."""
        self._fail(R_LINE_TOO_LONG)
        self.at_start, self.split_cr = False, part.endswith(b"\r")

    def block(self, block: bytes) -> bool:
        """Take complete lines (``block`` ends in LF; only its last line can be ``. CR LF``);
        True when that last line was the terminator."""
        if (self.problem is None and self.at_start and not self.split_cr
                and block.count(b"\n") == block.count(b"\r\n") == block.count(b"\r")
                and (len(block) <= self.max_line or max(map(len, block.split(b"\r\n"))) + 2 <= self.max_line)):
            # CRLF line ends only and no line too long: whole-block operations give what the
            # line-by-line path would.
            final = block == b".\r\n" or block.endswith(b"\r\n.\r\n")
            content = block[:-3] if final else block
            if content[:1] == b".":
                content = content[1:]
            self._add(content.replace(b"\r\n.", b"\r\n"))
            return final
        start = 0
        while start < len(block):
            end = block.index(b"\n", start) + 1
            if self.line(block[start:end]):
                return True
            start = end
        return False

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._fail(R_TOO_BIG)
        elif self.problem is None:
            self.chunks.append(data)


async def read_data(reader: asyncio.StreamReader, data: DataReader, flowing: Callable[[], None]) -> None:
    """Read DATA from ``reader`` into ``data`` up to and with the terminator, nothing after it.

    Only lines that begin with a dot need a closer look (the terminator, or dot-stuffing), so
    the lines between them are read as one block, up to the next ``LF .``; the dot's line is
    then read alone. Where a line begins whose LF was read already (when DATA begins, after a
    dot's line) its first byte is read alone to see whether it is a dot. A block that reaches
    the reader's limit first is taken up to its last complete line (the reader keeps the last
    byte of a would-be ``LF .``, so none is cut in two). ``flowing`` is called after every
    block (the caller's idle timer).
    """
    carry = b""  # the start of a line that the previous block did not finish
    exposed = True  # the next byte begins a line and nothing of it was read yet
    while True:
        if exposed:
            exposed = False
            first = await reader.readexactly(1)
            if first == b".":
                if await _dot_line(reader, data):
                    return
                exposed = True
                continue
            if first == b"\n":  # a line of its own (a bare LF): the next one begins right after
                data.line(first)
                exposed = True
                continue
            carry = first
        try:
            block = carry + await reader.readuntil(b"\n.")
            carry = b""
        except asyncio.LimitOverrunError as exc:
            part = carry + await reader.readexactly(exc.consumed)
            cut = part.rfind(b"\n") + 1
            block, carry = part[:cut], part[cut:]
            if cut and data.block(block):
                return
            if len(carry) > data.max_line:  # memory stays bounded
                data.discarded(carry)
                carry = b""
            exposed = cut == len(part)
            flowing()
            continue
        if data.block(block[:-1]) or await _dot_line(reader, data):
            return
        exposed = True
        flowing()


async def _dot_line(reader: asyncio.StreamReader, data: DataReader) -> bool:
    """The rest of a line whose first byte, a dot, was read; True if it was the terminator."""
    try:
        rest = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as exc:
        data.discarded(b"." + await reader.readexactly(exc.consumed))  # memory stays bounded
        return False
    return data.line(b"." + rest)
