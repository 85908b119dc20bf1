"""DATA reading: the block reader gives exactly what a plain line-by-line reader gives.

The reference below is the obvious implementation (one ``readuntil(b"\\n")`` per line, the
rules of RFC 5321 applied to each line). The block reader must agree with it on the message,
the problem reply and where the stream is left, for every input: random mixes of CRLF, bare
LF, bare CR, dot-stuffed and over-long lines, arriving in random pieces through a real
``asyncio.StreamReader`` with a small buffer limit, so blocks overrun it.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from connectors.smtp.data import R_BARE_NEWLINE, R_LINE_TOO_LONG, R_TOO_BIG, DataReader, read_data


async def reference(reader: asyncio.StreamReader, limit: int, max_line: int) -> tuple[bytes, str | None]:
    chunks: list[bytes] = []
    size, problem, at_start, split_cr = 0, None, True, False
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            discarded = await reader.readexactly(exc.consumed)
            if problem is None:
                problem, chunks = R_LINE_TOO_LONG, []
            at_start, split_cr = False, discarded.endswith(b"\r")
            continue
        if at_start and line == b".\r\n":
            return b"".join(chunks), problem
        crlf = line.endswith(b"\r\n") or (split_cr and line == b"\n")
        split_cr = False
        if problem is None:
            if not crlf or b"\r" in line[:-2]:
                problem, chunks = R_BARE_NEWLINE, []
            elif len(line) > max_line:
                problem, chunks = R_LINE_TOO_LONG, []
            else:
                if at_start and line[:1] == b".":
                    line = line[1:]
                size += len(line)
                if size > limit:
                    problem, chunks = R_TOO_BIG, []
                else:
                    chunks.append(line)
        at_start = crlf


async def feed(data: bytes, pieces: list[int], limit: int) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    at = 0
    for n in pieces:
        reader.feed_data(data[at:at + n])
        at += n
    reader.feed_data(data[at:])
    reader.feed_eof()
    return reader


def random_message(rng: random.Random, max_line: int) -> bytes:
    words = [b"hello", b".", b"..", b".x", b"\r", b"\n", b"\r\n", b"z" * rng.choice([10, max_line, 3 * max_line]),
             b"\r\n.", b"\n.", b"\r\n.\r", b".\r\n"]
    weights = [20, 3, 2, 2, 1, 1, 25, 2, 2, 1, 1, 1]
    body = b"".join(rng.choices(words, weights, k=rng.randint(0, 60)))
    if rng.random() < 0.3:  # many clean lines, the common case
        body = b"".join(rng.choice([b"line of text", b".dotted", b""]) + b"\r\n" for _ in range(rng.randint(1, 40)))
    return body


@pytest.mark.parametrize("seed", range(400))
async def test_block_reader_agrees_with_the_line_reader(seed: int) -> None:
    rng = random.Random(seed)
    max_line = rng.choice([20, 60, 1001])
    limit = rng.choice([50, 400, 10_000])
    buffer_limit = rng.choice([max_line + 2, 2 * max_line + 7, 64 * 1024])  # never below a line (session.py)
    body = random_message(rng, max_line)
    terminator = b".\r\n" if (body.endswith(b"\r\n") or not body) else b"\r\n.\r\n"
    stream = body + terminator + b"NEXT COMMAND\r\n"
    pieces = [rng.randint(1, 40) for _ in range(rng.randint(0, 30))]

    ref_reader = await feed(stream, pieces, buffer_limit)
    want = await reference(ref_reader, limit, max_line)
    want_rest = await ref_reader.read()

    reader = await feed(stream, pieces, buffer_limit)
    data = DataReader(limit, max_line)
    await read_data(reader, data, lambda: None)
    longest = max(len(line) for line in stream.split(b"\n"))
    if longest + 1 > max_line and want[1] is not None:
        # A line both too long and broken (a bare CR or LF) is refused either way; which of the
        # two replies comes first depends on how much of it one read sees, in both readers.
        assert data.problem is not None and data.message == b""
    else:
        assert (data.message, data.problem) == want
    assert await reader.read() == want_rest  # in step with the client: the next command is next


async def test_common_message_is_unstuffed_in_one_block() -> None:
    reader = await feed(b"Subject: x\r\n\r\n..leading dot\r\nplain\r\n.\r\nQUIT\r\n", [], 64 * 1024)
    data = DataReader(10_000, 1001)
    await read_data(reader, data, lambda: None)
    assert (data.message, data.problem) == (b"Subject: x\r\n\r\n.leading dot\r\nplain\r\n", None)
    assert await reader.readline() == b"QUIT\r\n"


@pytest.mark.parametrize("smuggled", [b"\n.\r\n", b"\r.\r\n", b"\n.\n", b"\r\n.\n"], ids=repr)
async def test_a_smuggled_terminator_is_not_one(smuggled: bytes) -> None:
    stream = b"Subject: a\r\n\r\nhi" + smuggled + b"MAIL FROM:<evil@x>\r\n" + b"\r\n.\r\n"
    reader = await feed(stream, [], 64 * 1024)
    data = DataReader(10_000, 1001)
    await read_data(reader, data, lambda: None)
    assert data.problem == R_BARE_NEWLINE
    assert data.message == b""
    assert await reader.read() == b""  # everything up to the real terminator was one DATA
