"""IMAP in, POP3 in and XMPP out: what the at-least-once bookkeeping costs, against a baseline
doing the same transfer without it, in the same run on the same real servers.

    .venv/bin/python -m bench.bench_mailbox [--messages 300]

* IMAP in: the connector (per message: FETCH size+flags, FETCH BODY.PEEK, the outcome, STORE
  \\Seen, an fsync'd checkpoint) vs. a bare aioimaplib loop that does one UID FETCH + one STORE
  per message and keeps no state. The mailbox is filled first; the clock runs from the
  connector's start (login, select, backfill) until the last message was handed over (the router
  is replaced by a function that answers ACCEPTED at once).
* POP3 in: the connector (UIDL bookkeeping, fsync per message, DELE) vs. a bare poplib
  RETR + DELE loop.
* XMPP out: ``send`` one at a time (each waits for the server's XEP-0198 ack) and 16 at once,
  vs. slixmpp writing all stanzas without waiting; until the receiver has them all.

Dovecot and Prosody are the test peers (tests/peers), unprivileged on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import poplib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aioimaplib  # noqa: E402
import slixmpp  # noqa: E402

from connectors.imap import ImapConnector  # noqa: E402
from connectors.pop3 import Pop3Connector  # noqa: E402
from connectors.xmpp import XmppConnector  # noqa: E402
from gateway.config.yamlsrc import FromEnv  # noqa: E402
from gateway.contract import Connector, ConnectorContext, Outcome, Status, Target  # noqa: E402
from gateway.envelope import Envelope  # noqa: E402
from gateway.http import HttpHub  # noqa: E402
from tests.peers.dovecot import Mailbox, start_dovecot  # noqa: E402
from tests.peers.prosody import XmppUser, start_prosody  # noqa: E402


def mail(i: int) -> bytes:
    return (f"From: sensor@example.test\r\nTo: alerts@example.test\r\nSubject: reading {i}\r\n\r\n"
            f"{'temperature 93.5 at site north; ' * 30}\r\n").encode()


def context(name: str, state: str) -> ConnectorContext:
    return ConnectorContext(name, logging.getLogger(f"bench.{name}"), HttpHub(logging.getLogger("bench.http")), state)


async def seed(box: Mailbox, n: int) -> None:
    def run() -> None:
        with box.imap() as c:
            for i in range(n):
                c.append("INBOX", None, None, mail(i))
    await asyncio.to_thread(run)


async def through_connector(c: Connector, box: Mailbox, n: int) -> float:
    got = 0
    done = asyncio.Event()

    async def deliver(env: Envelope) -> Outcome:
        nonlocal got
        got += 1
        if got == n:
            done.set()
        return Outcome(Status.ACCEPTED, env.id)

    await seed(box, n)
    start = time.perf_counter()
    await c.open()
    await c.listen(deliver)  # first start with backfill = n: takes what was seeded
    await asyncio.wait_for(done.wait(), timeout=300)
    took = time.perf_counter() - start
    await c.stop_listening(5)
    await c.close()
    return n / took


async def imap_baseline(box: Mailbox, n: int) -> float:
    await seed(box, n)
    start = time.perf_counter()
    client = aioimaplib.IMAP4_SSL("127.0.0.1", box.server.imaps_port, ssl_context=box.server.client_ssl())
    await client.wait_hello_from_server()
    await client.login(box.user, box.password)
    await client.select("INBOX")
    for uid in range(1, n + 1):
        await client.uid("fetch", str(uid), "(BODY.PEEK[])")
        await client.uid("store", str(uid), "+FLAGS.SILENT", "(\\Seen)")
    took = time.perf_counter() - start
    await client.logout()
    return n / took


async def pop3_baseline(box: Mailbox, n: int) -> float:
    await seed(box, n)
    start = time.perf_counter()

    def run() -> None:
        p = poplib.POP3_SSL("127.0.0.1", box.server.pop3s_port, context=box.server.client_ssl())
        p.user(box.user)
        p.pass_(box.password)
        for i in range(1, n + 1):
            p.retr(i)
            p.dele(i)
        p.quit()

    await asyncio.to_thread(run)
    return n / (time.perf_counter() - start)


async def xmpp(n: int) -> dict[str, float]:
    server = start_prosody()
    out: dict[str, float] = {}
    try:
        async with XmppUser(server, "alice") as alice:
            async def receiver_has(count: int) -> None:
                while len(alice.messages) < count:
                    await asyncio.sleep(0.005)

            cfg = XmppConnector.Config.model_validate({
                "type": "xmpp", "jid": "gateway@localhost", "password": FromEnv(server.users["gateway"]),
                "host": "127.0.0.1", "port": server.port, "ca_file": str(server.ca_file)})
            c = XmppConnector(cfg, context("chat", tempfile.mkdtemp()))
            await c.open()
            target = Target(route="bench", connector="chat", options=XmppConnector.Options(to="alice@localhost"))
            envs = [Envelope(source="b", protocol="b", subject="s", body=f"alert {i}".encode()) for i in range(n)]
            start = time.perf_counter()
            for env in envs:
                await c.send(env, target)
            await receiver_has(n)
            out["connector, one at a time (acked)"] = n / (time.perf_counter() - start)
            alice.messages.clear()
            sem = asyncio.Semaphore(16)

            async def one(env: Envelope) -> None:
                async with sem:
                    await c.send(env, target)

            start = time.perf_counter()
            await asyncio.gather(*(one(e) for e in envs))
            await receiver_has(n)
            out["connector, 16 at once (acked)"] = n / (time.perf_counter() - start)
            await c.close()
            alice.messages.clear()
            raw = slixmpp.ClientXMPP("bob@localhost", server.users["bob"])
            raw.enable_direct_tls = False
            raw.ssl_context.load_verify_locations(str(server.ca_file))
            up = asyncio.Event()
            raw.add_event_handler("session_start", lambda _: up.set())
            raw.connect("127.0.0.1", server.port)
            await asyncio.wait_for(up.wait(), 10)
            start = time.perf_counter()
            for i in range(n):
                raw.send_message(mto="alice@localhost", mbody=f"alert {i}", mtype="chat")
            await receiver_has(n)
            out["baseline: slixmpp, no ack"] = n / (time.perf_counter() - start)
            raw.disconnect()
            await asyncio.sleep(0.1)
            if raw._run_out_filters is not None:
                raw._run_out_filters.cancel()
    finally:
        server.stop()
    return out


async def mailboxes(n: int) -> list[tuple[str, str, float]]:
    dovecot = start_dovecot()
    try:
        def imap_connector() -> ImapConnector:
            box = dovecot.add_user()
            cfg = ImapConnector.Config.model_validate({
                "type": "imap", "host": "127.0.0.1", "port": dovecot.imaps_port, "ca_file": str(dovecot.ca_file),
                "username": box.user, "password": FromEnv(box.password), "backfill": n})
            c = ImapConnector(cfg, context("imap", tempfile.mkdtemp()))
            c.bench_box = box  # type: ignore[attr-defined]
            return c

        def pop3_connector() -> Pop3Connector:
            box = dovecot.add_user()
            cfg = Pop3Connector.Config.model_validate({
                "type": "pop3", "host": "127.0.0.1", "port": dovecot.pop3s_port, "ca_file": str(dovecot.ca_file),
                "username": box.user, "password": FromEnv(box.password), "backfill": n})
            c = Pop3Connector(cfg, context("pop3", tempfile.mkdtemp()))
            c.bench_box = box  # type: ignore[attr-defined]
            return c

        async def connector_rate(make: Any) -> float:
            c = make()
            return await through_connector(c, c.bench_box, n)

        return [
            ("IMAP in", "connector (PEEK, outcome, \\Seen, fsync'd checkpoint)",
             await best(lambda: connector_rate(imap_connector))),
            ("IMAP in", "baseline: aioimaplib FETCH + STORE, no state",
             await best(lambda: imap_baseline(dovecot.add_user(), n))),
            ("POP3 in", "connector (UIDL state fsync'd, DELE)", await best(lambda: connector_rate(pop3_connector))),
            ("POP3 in", "baseline: poplib RETR + DELE, no state",
             await best(lambda: pop3_baseline(dovecot.add_user(), n))),
        ]
    finally:
        dovecot.stop()


REPEAT = 3


async def best(run: Any) -> float:
    """The best of REPEAT runs: this machine is shared, the best run is the least disturbed one."""
    return max([await run() for _ in range(REPEAT)])


async def main() -> None:
    global REPEAT
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, REPEAT = args.messages, args.repeat
    logging.basicConfig(level=logging.WARNING)
    rows = await mailboxes(n)
    xmpp_rates: dict[str, float] = {}
    for _ in range(REPEAT):
        for key, rate in (await xmpp(n)).items():
            xmpp_rates[key] = max(rate, xmpp_rates.get(key, 0.0))
    rows += [("XMPP out", k, v) for k, v in xmpp_rates.items()]
    print(f"\n{n} messages each, best of {REPEAT} (mail seeded before the clock starts; "
          f"connectors start cold with backfill={n})\n")
    print(f"{'':9} {'what':58} {'msg/s':>8}")
    for kind, what, rate in rows:
        print(f"{kind:9} {what:58} {rate:8.0f}")


if __name__ == "__main__":
    asyncio.run(main())
