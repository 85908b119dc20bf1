"""SMTP inbound messages/s: the gateway beside a bare aiosmtpd server that only counts.

    .venv/bin/python bench/bench_smtp.py [--messages 8000] [--connections 8]

Every server runs in its own process (uvloop when installed, as `gateway run` uses it) and is
loaded in the same run by the same client: 8 parallel SMTP sessions over real sockets, each
sending its share of ~1 KB messages one after another (MAIL, RCPT, DATA; no pipelining), each
dated when it is sent.

* bare        aiosmtpd with a handler that counts and answers 250: the ceiling.
* gw → file   the gateway's smtp inbound into the file sink, two ways: a direct route, where
              every 250 means "appended to the file and fsync'd" (delivered), and a spooled
              route (the default mode), where it means "fsync'd in the spool"; the sink then
              appends and fsyncs the lines (retried, dead-lettered if the file keeps failing).
* gw → amqp   the same inbound, a direct route into RabbitMQ (127.0.0.1:5672, guest): every
              250 means "RabbitMQ confirmed the persistent message" (publisher confirm); and a
              spooled route (the default mode): 250 = fsync'd in the spool, published after.
* gw → log    for comparison only: a direct route into the log sink, nothing stored. What the
              SMTP side, parsing and routing cost without durability.

After each gateway run the bench checks that every message arrived (file lines, queue depth).
Target: the gateway reaches at least 60 % of the bare server's messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GATEWAY = str(Path(sys.executable).parent / "gateway")
QUEUE = "bench-smtp"

MESSAGE = (
    "From: Boiler Seven <sensor@plant.example>\r\n"
    "To: ops@example.com\r\n"
    "Subject: Boiler 7 above 90 C\r\n"
    "Date: {date}\r\n"
    "Message-ID: <bench-{n}@plant.example>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "X-Plant-Site: 7\r\n"
    "\r\n" + "Temperature 93.5 C at 09:11:58, pressure normal, valve 3 open, pump 2 running.\r\n" * 10
)

BARE_SERVER = textwrap.dedent("""
    import asyncio, sys
    from aiosmtpd.smtp import SMTP

    class Count:
        n = 0
        async def handle_DATA(self, server, session, envelope):
            Count.n += 1
            return "250 OK"

    async def main(port):
        loop = asyncio.get_running_loop()
        handler = Count()
        server = await loop.create_server(lambda: SMTP(handler, hostname="bare", ident="bare", loop=loop),
                                          "127.0.0.1", port)
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop
        uvloop.run(main(int(sys.argv[1])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1])))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server on {port} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the client ------------------------------------------------------------------------


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def _session(port: int, first: int, count: int, failures: list[bytes]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench.client\r\n")
    await _reply(reader)
    for n in range(first, first + count):
        writer.write(b"MAIL FROM:<bench@client.test>\r\n")
        r1 = await _reply(reader)
        writer.write(b"RCPT TO:<ops@example.com>\r\n")
        r2 = await _reply(reader)
        writer.write(b"DATA\r\n")
        r3 = await _reply(reader)
        if not (r1.startswith(b"250") and r2.startswith(b"250") and r3.startswith(b"354")):
            failures.append(r1 + r2 + r3)
            writer.write(b"RSET\r\n")
            await _reply(reader)
            continue
        # Dated when sent, as a real sender does (many messages of a busy second share it).
        writer.write(MESSAGE.format(n=n, date=formatdate(localtime=True)).encode() + b".\r\n")
        r4 = await _reply(reader)
        if not r4.startswith(b"250"):
            failures.append(r4)
    writer.write(b"QUIT\r\n")
    await _reply(reader)
    writer.close()


async def _load(port: int, messages: int, connections: int) -> tuple[float, int]:
    failures: list[bytes] = []
    share = messages // connections
    started = time.perf_counter()
    await asyncio.gather(*(_session(port, i * share, share, failures) for i in range(connections)))
    elapsed = time.perf_counter() - started
    if failures:
        print(f"    {len(failures)} refused, first: {failures[0][:120]!r}")
    return elapsed, share * connections - len(failures)


def load(port: int, messages: int, connections: int) -> tuple[float, int]:
    try:
        import uvloop
        return uvloop.run(_load(port, messages, connections))
    except ImportError:
        return asyncio.run(_load(port, messages, connections))


# --- the servers -----------------------------------------------------------------------


def gateway_config(work: Path, port: int, sink: str) -> Path:
    smtp = {"type": "smtp", "listen": f"127.0.0.1:{port}", "recipients": ["example.com"],
            "max_commands_per_session": 1_000_000}
    if sink in ("file", "file-direct"):
        target = "[{connector: sink}]"
        connector = f'{{type: file, path: "{work / f"out-{sink}.jsonl"}"}}'
        mode = "direct" if sink == "file-direct" else "spooled"
    elif sink == "log":
        target = "[{connector: sink}]"
        connector = "{type: log, level: debug}"
        mode = "direct"
    else:  # amqp: direct (250 = confirmed) or amqp-spooled (250 = spooled, published after)
        target = f"[{{connector: sink, routing_key: {QUEUE}}}]"
        connector = '{type: amqp, url: "amqp://127.0.0.1:5672/", username: guest, password: "${BENCH_AMQP_PW}"}'
        mode = "spooled" if sink == "amqp-spooled" else "direct"
    path = work / f"routes-{sink}.yaml"
    path.write_text(textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:{free_port()}"}}
          spool: {{path: "{work / f'spool-{sink}.db'}"}}
          state_dir: "{work / 'state'}"
          log: {{level: warning}}
        connectors:
          mail-in: {json.dumps(smtp)}
          sink: {connector}
        routes:
          - name: mail
            from: mail-in
            mode: {mode}
            to: {target}
        """))
    return path


def amqp_queue(action: str) -> int:
    """Declare and purge the bench queue, or count what is in it."""
    import aio_pika

    async def go() -> int:
        conn = await aio_pika.connect_robust("amqp://guest:guest@127.0.0.1:5672/", timeout=5)
        async with conn:
            channel = await conn.channel()
            queue = await channel.declare_queue(QUEUE, durable=True)
            if action == "reset":
                await queue.purge()
                return 0
            return int(queue.declaration_result.message_count or 0)

    return asyncio.run(go())


def wait_until(predicate: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def run_bare(work: Path, args: argparse.Namespace) -> float:
    port = free_port()
    script = work / "bare.py"
    script.write_text(BARE_SERVER)
    proc = subprocess.Popen([PYTHON, str(script), str(port)], stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_port(port, proc)
        load(port, min(400, args.messages), args.connections)  # warm-up
        elapsed, ok = load(port, args.messages, args.connections)
    finally:
        stop(proc)
    return ok / elapsed


def run_gateway(work: Path, args: argparse.Namespace, sink: str) -> tuple[float, str]:
    port = free_port()
    config = gateway_config(work, port, sink)
    env = {**os.environ, "BENCH_AMQP_PW": "guest"}
    if sink.startswith("amqp"):
        amqp_queue("reset")
    with open(work / f"gateway-{sink}.log", "wb") as log:
        proc = subprocess.Popen([GATEWAY, "run", "--config", str(config)], cwd=work, env=env,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_port(port, proc)
        warm = min(400, args.messages)
        load(port, warm, args.connections)
        elapsed, ok = load(port, args.messages, args.connections)
        expected = warm + args.messages
        if sink == "log":
            arrived, have = ok == args.messages, ok + warm
        elif sink.startswith("file"):
            out = work / f"out-{sink}.jsonl"
            arrived = wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= expected, 120)
            have = out.read_bytes().count(b"\n") if out.exists() else 0
        else:
            arrived = wait_until(lambda: amqp_queue("count") >= expected, 60)
            have = amqp_queue("count")
        check = f"{have}/{expected} arrived" + ("" if arrived else " (MISSING)")
    finally:
        stop(proc)
    if sink.startswith("amqp"):
        amqp_queue("reset")
    return ok / elapsed, check


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--skip-amqp", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    size = len(MESSAGE.format(n=0, date=formatdate(localtime=True)))
    print(f"SMTP inbound, {args.connections} connections, {args.messages} messages of "
          f"{size} bytes each (after {min(400, args.messages)} warm-up)")
    bare = run_bare(work, args)
    print(f"  bare aiosmtpd (counts only)          {bare:8.0f} msg/s   100 %")
    rate, check = run_gateway(work, args, "log")
    print(f"  gateway → log (nothing stored)       {rate:8.0f} msg/s   {rate / bare:4.0%}   {check}")
    rate, check = run_gateway(work, args, "file-direct")
    print(f"  gateway → file (250 = in the file)   {rate:8.0f} msg/s   {rate / bare:4.0%}   {check}")
    rate, check = run_gateway(work, args, "file")
    print(f"  gateway → file (250 = spooled)       {rate:8.0f} msg/s   {rate / bare:4.0%}   {check}")
    if args.skip_amqp:
        return
    try:
        amqp_queue("reset")
    except Exception as exc:
        print(f"  gateway → amqp: skipped, RabbitMQ on 127.0.0.1:5672 not usable ({type(exc).__name__})")
        return
    rate, check = run_gateway(work, args, "amqp")
    print(f"  gateway → amqp (250 = confirmed)     {rate:8.0f} msg/s   {rate / bare:4.0%}   {check}")
    rate, check = run_gateway(work, args, "amqp-spooled")
    print(f"  gateway → amqp (250 = spooled)       {rate:8.0f} msg/s   {rate / bare:4.0%}   {check}")


if __name__ == "__main__":
    main()
