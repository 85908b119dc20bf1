"""Hostile SMTP clients: line floods, one address taking every session, slow trickles, oversized
DATA and recipient floods. Each gets its SMTP answer (``421``, ``452``, ``500``, ``552``), other
clients keep being served, nothing refused is stored, and ``/healthz`` stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from tests.gwtest import jsonl
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port


def _routes(port: int, out: Path, **smtp: str) -> str:
    extra = "".join(f"\n    {k}: {v}" for k, v in smtp.items())
    return f"""
connectors:
  mail:
    type: smtp
    listen: "127.0.0.1:{port}"
    hostname: gw.test
    recipients: [example.com]{extra}
  sink: {{type: file, path: "{out}"}}
routes:
  - {{name: mail, from: mail, to: [{{connector: sink}}]}}
"""


async def _connect(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), limit=1 << 20)
    return reader, writer, await reader.readline()


async def _until_closed(reader: asyncio.StreamReader, timeout: float = 30) -> tuple[list[bytes], float]:
    """Every reply line until the server closes, and how long that took."""
    t0 = time.monotonic()
    lines = []
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while line := await reader.readline():
                lines.append(line)
    return lines, time.monotonic() - t0


async def _send_message(port: int, source: str, rcpt: str = "ops@example.com") -> list[bytes]:
    reader, writer, greeting = await _connect(port, source)
    assert greeting.startswith(b"220")
    replies = []
    for command in (b"HELO client.test", b"MAIL FROM:<a@client.test>", f"RCPT TO:<{rcpt}>".encode(), b"DATA",
                    b"Subject: hi\r\n\r\nhello\r\n.", b"QUIT"):
        writer.write(command + b"\r\n")
        replies.append(await reader.readline())
    writer.close()
    return replies


async def test_a_line_flood_ends_the_session(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, _routes(port, out)) as gw:
        with LoopProbe(gw.admin) as probe:
            reader, writer, _ = await _connect(port)
            writer.write(b"\r\n" * 60_000)  # each one a "500 bad syntax", as fast as they come
            replies, _ = await _until_closed(reader)
            writer.close()
            reader, writer, _ = await _connect(port)
            writer.write(b"HELO " + b"x" * 5000 + b"\r\nNOOP\r\n")  # an over-long command
            assert await reader.readline() == b"500 5.5.2 Line too long\r\n"
            assert (await reader.readline()).startswith(b"250")  # the session goes on
            writer.close()
        assert len(replies) <= 30 and replies[-1].startswith(b"421 4.7.0"), replies[-3:]
        probe.assert_responsive()
        await gw.alive()
    assert jsonl(out) == []


async def test_one_address_cannot_take_every_session(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, _routes(port, out, idle_timeout="3s")) as gw:
        with LoopProbe(gw.admin) as probe:
            greetings, slow = [], []
            for _ in range(100):  # max_sessions: every session there is, from one address
                reader, writer, greeting = await _connect(port)
                greetings.append(greeting[:9])
                writer.write(b"EHL")  # a command that never ends
                slow.append((reader, writer))
            # Another client is served meanwhile.
            replies = await _send_message(port, "127.0.0.2")
            assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"221"], replies
            # The trickling sessions are closed by the idle timer.
            ended = await asyncio.gather(*(_until_closed(r) for r, _ in slow))
            for _, w in slow:
                w.close()
        assert greetings.count(b"220 gw.te") == 20 and greetings.count(b"421 4.7.0") == 80
        assert all(lines and lines[-1].startswith(b"421 4.4.2") for lines, _ in ended if lines)
        assert max(took for _, took in ended) < 20
        probe.assert_responsive()
        await gw.alive()
    assert len(jsonl(out)) == 1


async def test_oversized_data_and_recipient_floods_are_refused(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, _routes(port, out, max_message_size="1MiB")) as gw:
        assert gw.proc is not None
        with LoopProbe(gw.admin) as probe:
            reader, writer, _ = await _connect(port)
            writer.write(b"EHLO client.test\r\n")
            while not (await reader.readline()).startswith(b"250 "):
                pass
            writer.write(b"MAIL FROM:<a@client.test> SIZE=50000000\r\n")
            assert (await reader.readline()).startswith(b"552 5.3.4")
            # Without SIZE: 50 MB of DATA, refused once it ends, never held in memory.
            writer.write(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<ops@example.com>\r\nDATA\r\n")
            assert [(await reader.readline())[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            line = b"y" * 998 + b"\r\n"
            for _ in range(50):
                writer.write(line * 1000)
                await writer.drain()
            writer.write(b".\r\n")
            assert (await reader.readline()).startswith(b"552 5.3.4")
            # A thousand recipients (one RCPT was sent above): the hundred allowed, 452 4.5.3 for
            # the rest, and 421 for the 1001st RCPT of the session (max_commands_per_session).
            writer.write(b"MAIL FROM:<a@client.test>\r\n")
            assert (await reader.readline()).startswith(b"250")
            writer.write(b"".join(b"RCPT TO:<u%d@example.com>\r\n" % i for i in range(1000)))
            answers, _ = await _until_closed(reader)
            writer.close()
            assert [a[:9] for a in answers] == [b"250 2.1.5"] * 100 + [b"452 4.5.3"] * 899 + [b"421 4.7.0"]
        peak_kib = int(next(line.split()[1] for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines()
                            if line.startswith("VmHWM:")))
        assert peak_kib < 400 * 1024, f"the gateway's memory peaked at {peak_kib} KiB"
        probe.assert_responsive()
        await gw.alive()
    assert jsonl(out) == []
