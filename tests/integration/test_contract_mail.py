"""The shared connector contract for the mail kinds: smtp out to an aiosmtpd relay and in from
smtplib, maildir out read back by the standard library's Maildir reader, pop3 in from Dovecot.
(imap runs it in test_imap.py.)"""

from __future__ import annotations

import asyncio
import email
import mailbox
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import pytest

from gateway.contract import Connector
from gateway.envelope import Envelope
from gateway.http import HttpHub
from tests.contract import InboundContract, OutboundContract
from tests.gwtest import free_port
from tests.integration.test_imap import mail, secret_file
from tests.integration.test_smtp_peers import Relay
from tests.peers.dovecot import Dovecot, Mailbox, dovecot

pytestmark = pytest.mark.integration
__all__ = ["dovecot"]

MAIL_OPTIONS = {"to": ["ops@example.com"], "sender": "gw@example.com"}


def text_of(raw: bytes) -> bytes:
    """The text part of a message, as its author wrote it."""
    msg = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(("plain",))
    assert part is not None, "no text part"
    return str(part.get_content()).rstrip("\r\n").encode()


class TestSmtpOutboundContract(OutboundContract):
    kind = "smtp"
    relay: Relay

    @pytest.fixture(autouse=True)
    def running_relay(self) -> Iterator[None]:
        with Relay() as relay:
            self.relay = relay
            yield

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": f"smtp://127.0.0.1:{self.relay.port}", "starttls": "off", "timeout": "5s"}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"url": f"smtp://127.0.0.1:{free_port()}", "starttls": "off", "timeout": "2s"}

    def options(self) -> dict[str, Any]:
        return dict(MAIL_OPTIONS)

    async def received(self, tmp_path: Path) -> list[bytes]:
        return [text_of(m.content) for m in self.relay.handler.messages]  # type: ignore[arg-type]


class TestSmtpInboundContract(InboundContract):
    """The sender is smtplib: the reply to DATA is the answer (250, 4xx or 5xx)."""

    kind = "smtp"

    @pytest.fixture(autouse=True)
    def port(self) -> None:
        self.listen_port = free_port()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"listen": f"127.0.0.1:{self.listen_port}", "recipients": ["example.com"]}

    def body_of(self, env: Envelope) -> bytes:
        return text_of(env.body)

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        def send() -> str:
            with smtplib.SMTP("127.0.0.1", self.listen_port, timeout=10) as client:
                try:
                    client.sendmail("sensor@client.test", ["ops@example.com"], mail("contract", body.decode()))
                except smtplib.SMTPResponseException as exc:
                    return "temporary" if 400 <= exc.smtp_code < 500 else f"permanent {exc.smtp_code}"
                except smtplib.SMTPRecipientsRefused as exc:
                    return f"recipient refused: {exc.recipients}"
            return "ack"

        answer = await asyncio.to_thread(send)
        return "permanent" if answer.startswith("permanent 5") else answer


class TestMaildirContract(OutboundContract):
    """The peer is the Maildir on disk, read with the standard library's :class:`mailbox.Maildir`.
    A Maildir "down" is one that cannot be created (a file where its directory should be)."""

    kind = "maildir"

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "Maildir"), "sender": "gw@example.com"}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where a directory should be")
        return {"path": str(blocker / "Maildir")}

    def options(self) -> dict[str, Any]:
        return dict(MAIL_OPTIONS)

    async def received(self, tmp_path: Path) -> list[bytes]:
        root = tmp_path / "Maildir"
        if not root.exists():
            return []
        return [text_of(msg.as_bytes()) for msg in mailbox.Maildir(root, create=False)]


class TestPop3InboundContract(InboundContract):
    """The maildrop is Dovecot's: accepted mail is deleted (DELE, QUIT), a retried one is offered
    again at a later session, a rejected one stays on the server and is not offered again."""

    kind = "pop3"
    box: Mailbox

    @pytest.fixture(autouse=True)
    def account(self, dovecot: Dovecot) -> None:
        self.box = dovecot.add_user()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        box = self.box
        return {"host": "127.0.0.1", "port": box.server.pop3s_port, "ca_file": str(box.server.ca_file),
                "username": box.user, "password": {"file": secret_file(tmp_path, box.password)},
                "poll_interval": 0.3, "connect_timeout": 5, "backfill": 10}

    def body_of(self, env: Envelope) -> bytes:
        return text_of(env.body)

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        await asyncio.to_thread(self.box.append, mail("contract", body.decode()))
        loop = asyncio.get_running_loop()
        end = loop.time() + 20
        first_seen: float | None = None
        while loop.time() < end:
            if len(self.delivered) >= 2:
                return "temporary"
            if self.delivered:
                first_seen = first_seen or loop.time()
                left = await asyncio.to_thread(self.box.count)
                if left == 0:
                    return "ack"
                # retry_after is 1 s and the poll interval 0.3 s: a retried message is back by now
                if loop.time() - first_seen > 4:
                    return "permanent"
            await asyncio.sleep(0.1)
        return f"undecided after {len(self.delivered)} deliveries"
