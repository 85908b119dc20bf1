"""A large message in a mailbox the gateway polls: parsing it must not hold the event loop.

Python's e-mail parser takes about 20 ms a megabyte and a mailbox may hold tens of megabytes;
IMAP and POP3 parse a large message in a worker thread (the parser is pure Python, so the loop
keeps running beside it), and the parsed view is the envelope's ``data``, never parsed again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.integration.test_imap import secret_file
from tests.peers.dovecot import Dovecot, dovecot

__all__ = ["dovecot"]


def big_mail(subject: str, parts: int = 150) -> bytes:
    """About 16 MB in many MIME parts: the costliest shape for the parser per byte."""
    part = b"--B\r\nContent-Type: text/plain\r\n\r\n" + b"line of a long report\r\n" * 4_500
    return (f"From: Sensor <sensor@example.test>\r\nTo: reports@example.test\r\nSubject: {subject}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n").encode() \
        + part * parts + b"--B--\r\n"


async def test_a_large_message_is_fetched_and_routed_without_holding_the_loop(
        tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    out = tmp_path / "mail.jsonl"
    routes = f"""
        connectors:
          inbox: {{type: pop3, host: 127.0.0.1, port: {dovecot.pop3s_port}, ca_file: "{dovecot.ca_file}",
                   username: {box.user}, password: {{file: "{secret_file(tmp_path, box.password)}"}},
                   address: reports@example.test, poll_interval: 0.5, max_size: 32MiB}}
          sink: {{type: file, path: "{out}"}}
        routes:
          - name: reports
            from: inbox
            match: {{when: 'data.subject == "monthly report"'}}
            to: [{{connector: sink}}]
        """
    raw = big_mail("monthly report")
    assert len(raw) > 15_000_000
    async with HostileGateway(tmp_path, routes) as gw:
        with LoopProbe(gw.admin) as probe:
            await asyncio.to_thread(box.append, raw)
            await asyncio.to_thread(box.append, raw)
            await wait_for(lambda: len(jsonl(out)) == 2, timeout=120, what="both large messages delivered")
        probe.assert_responsive()
        assert gw.loop_lag_worst() <= 0.25
        await gw.alive()
    assert all(rec["attributes"]["email"]["subject"] == "monthly report" for rec in jsonl(out))
