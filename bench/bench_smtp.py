"""SMTP inbound messages/s: the gateway beside a bare aiosmtpd server that only counts.

    .venv/bin/python -m bench.bench_smtp [--messages 8000] [--connections 8]

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

from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GATEWAY = str(Path(sys.executable).parent / "gateway")
QUEUE = "bench-smtp"
LOAD_QUEUE = "bench-smtp-load"
TICK = os.sysconf("SC_CLK_TCK")

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


LOAD_PUBLISHER = textwrap.dedent("""
    import asyncio, signal, sys, time
    import aiormq

    async def main(rate, queue):
        conn = await aiormq.connect("amqp://guest:guest@127.0.0.1:5672/")
        channel = await conn.channel(publisher_confirms=True)
        await channel.queue_declare(queue, durable=True)
        await channel.queue_purge(queue)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        props = aiormq.spec.Basic.Properties(delivery_mode=2, content_type="message/rfc822")
        body = b"x" * 1049
        pending, sent, started = set(), 0, time.perf_counter()
        print("ready", flush=True)
        while not stop.is_set():
            task = asyncio.ensure_future(channel.basic_publish(body, routing_key=queue, properties=props))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
            delay = started + sent / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await asyncio.gather(*pending)
        print(f"{sent / (time.perf_counter() - started):.0f}", flush=True)
        await channel.queue_purge(queue)
        await conn.close()

    asyncio.run(main(float(sys.argv[1]), sys.argv[2]))
""")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 when it is unknown)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rabbitmq_pid() -> int | None:
    found = subprocess.run(["pgrep", "-f", "beam.smp"], check=False, capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


class Row:
    """One measured row: messages/s, and CPU per message of the server and of RabbitMQ (per
    message RabbitMQ took)."""

    def __init__(self, rate: float, server_us: float, rabbit_us: float | None = None, check: str = ""):
        self.rate, self.server_us, self.rabbit_us, self.check = rate, server_us, rabbit_us, check
        self.load = 0.0  # messages/s another client published into RabbitMQ meanwhile

    def show(self, label: str, bare: float | None) -> str:
        share = "100 %" if bare is None else f"{self.rate / bare:4.0%}"
        cpu = f"{self.server_us:4.0f} µs" + ("" if self.rabbit_us is None else f" + RabbitMQ {self.rabbit_us:3.0f} µs")
        return f"  {label:37s}{self.rate:6.0f} msg/s  {share:>5s}   CPU/msg {cpu:27s} {self.check}"


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
    data = work / "var"  # spool and outputs beside the config, in a directory of their own
    data.mkdir(exist_ok=True)
    smtp = {"type": "smtp", "listen": f"127.0.0.1:{port}", "recipients": ["example.com"],
            "max_commands_per_session": 1_000_000}
    if sink in ("file", "file-direct"):
        target = "[{connector: sink}]"
        connector = f'{{type: file, path: "{data / f"out-{sink}.jsonl"}"}}'
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
          spool: {{path: "{data / f'spool-{sink}.db'}"}}
          state_dir: "{data / 'state'}"
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


def warm_up(args: argparse.Namespace) -> int:
    """Messages sent before each measured load (not counted in the rate)."""
    return min(400, args.messages)


def measured(pid: int, port: int, args: argparse.Namespace,
             rabbit: int | None = None) -> tuple[float, int, float, float]:
    """Load the server on ``port`` (after a warm-up): (seconds, messages accepted, server CPU
    seconds, RabbitMQ CPU seconds)."""
    load(port, warm_up(args), args.connections)
    cpu0, rabbit0 = cpu_seconds(pid), cpu_seconds(rabbit)
    elapsed, ok = load(port, args.messages, args.connections)
    return elapsed, ok, cpu_seconds(pid) - cpu0, cpu_seconds(rabbit) - rabbit0


def run_bare(work: Path, args: argparse.Namespace, rabbit_load: float = 0.0) -> Row:
    """The bare server; with ``rabbit_load``, while another client publishes that many persistent
    messages a second into RabbitMQ (the row's ``load`` says how many it achieved, and its
    RabbitMQ CPU is per message RabbitMQ took)."""
    port = free_port()
    script = work / "bare.py"
    script.write_text(BARE_SERVER)
    publisher = None
    if rabbit_load:
        (work / "load.py").write_text(LOAD_PUBLISHER)
        publisher = subprocess.Popen([PYTHON, str(work / "load.py"), str(rabbit_load), LOAD_QUEUE],
                                     stdout=subprocess.PIPE, cwd=ROOT, text=True)
        assert publisher.stdout is not None
        if publisher.stdout.readline().strip() != "ready":
            raise SystemExit("the RabbitMQ load publisher did not start")
    proc = subprocess.Popen([PYTHON, str(script), str(port)], stdout=subprocess.DEVNULL, cwd=ROOT)
    achieved = 0.0
    try:
        wait_port(port, proc)
        rabbit = rabbitmq_pid() if rabbit_load else None
        elapsed, ok, cpu, rabbit_cpu = measured(proc.pid, port, args, rabbit)
    finally:
        stop(proc)
        if publisher is not None:
            publisher.send_signal(signal.SIGTERM)
            out, _ = publisher.communicate(timeout=60)
            achieved = float(out.strip() or 0)
    row = Row(ok / elapsed, cpu / ok * 1e6)
    if rabbit_load:
        row.load = achieved
        row.rabbit_us = rabbit_cpu / max(1.0, achieved * elapsed) * 1e6
    return row


def run_gateway(work: Path, args: argparse.Namespace, sink: str) -> Row:
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
        rabbit = rabbitmq_pid() if sink.startswith("amqp") else None
        elapsed, ok, cpu, rabbit_cpu = measured(proc.pid, port, args, rabbit)
        expected = warm_up(args) + args.messages
        if sink == "log":
            arrived, have = ok == args.messages, ok + warm_up(args)
        elif sink.startswith("file"):
            out = work / "var" / f"out-{sink}.jsonl"
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
    return Row(ok / elapsed, cpu / ok * 1e6, rabbit_cpu / ok * 1e6 if rabbit is not None else None, check)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=8000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--skip-amqp", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-smtp-"))
    size = len(MESSAGE.format(n=0, date=formatdate(localtime=True)))
    print(f"SMTP inbound, {args.connections} connections, {args.messages} messages of "
          f"{size} bytes each (after {warm_up(args)} warm-up); CPU = the server process's"
          f" user + system time per message")
    bare = run_bare(work, args)
    print(bare.show("bare aiosmtpd (counts only)", None))
    for sink, label in (("log", "gateway → log (nothing stored)"),
                        ("file-direct", "gateway → file (250 = in the file)"),
                        ("file", "gateway → file (250 = spooled)")):
        print(run_gateway(work, args, sink).show(label, bare.rate), flush=True)
    if args.skip_amqp:
        return
    try:
        amqp_queue("reset")
    except Exception as exc:
        print(f"  gateway → amqp: skipped, RabbitMQ on 127.0.0.1:5672 not usable ({type(exc).__name__})")
        return
    confirmed = run_gateway(work, args, "amqp")
    print(confirmed.show("gateway → amqp (250 = confirmed)", bare.rate), flush=True)
    spooled = run_gateway(work, args, "amqp-spooled")
    print(spooled.show("gateway → amqp (250 = spooled)", bare.rate), flush=True)
    for row, label in ((confirmed, "confirmed"), (spooled, "spooled")):
        busy = run_bare(work, args, rabbit_load=row.rate)
        print(busy.show(f"bare, RabbitMQ busy ({busy.load:.0f} msg/s)", bare.rate))
        print(f"    → gateway → amqp ({label}) against it: {row.rate / busy.rate:.0%}", flush=True)
    # The ceiling for any SMTP → AMQP server on this machine: a server that only counts, beside
    # RabbitMQ doing the work of the target rate (60 % of bare) for another client.
    ceiling = run_bare(work, args, rabbit_load=0.6 * bare.rate)
    print(ceiling.show(f"bare, RabbitMQ busy ({ceiling.load:.0f} msg/s)", bare.rate))
    print(f"    → where RabbitMQ confirms 60 % of the bare rate, a server that stores nothing reaches "
          f"{ceiling.rate / bare.rate:.0%} of it", flush=True)

if __name__ == "__main__":
    main()
