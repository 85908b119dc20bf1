"""Real SMTP peers for the mail tests, and checks that they are here.

Helpers (imported by the other mail test modules): trustme certificates, swaks as a subprocess,
a raw-socket SMTP client for what well-behaved clients never send, smtplib off the event loop,
and an aiosmtpd relay whose answers a test scripts. The tests in this module only check that
the peers exist, so a missing one fails with the install step instead of a confusing error.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.gwtest import free_port, jsonl

pytestmark = pytest.mark.integration

SWAKS = "/usr/bin/swaks"
SWAKS_INSTALL = "apt-get install -y swaks libnet-ssleay-perl"


# --- certificates ----------------------------------------------------------------------


@dataclass
class Certs:
    ca: str
    cert: str
    key: str

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def make_certs(directory: Path) -> Certs:
    """A throwaway CA and a server certificate for localhost / 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    paths = Certs(str(directory / "ca.pem"), str(directory / "cert.pem"), str(directory / "key.pem"))
    ca.cert_pem.write_to_path(paths.ca)
    Path(paths.cert).write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    server.private_key_pem.write_to_path(paths.key)
    return paths


# --- clients -----------------------------------------------------------------------------


async def swaks(*args: str, timeout: float = 30.0) -> tuple[int, str]:
    """Run swaks; returns (exit code, stdout+stderr)."""
    if not Path(SWAKS).exists():
        pytest.fail(f"swaks is not installed: run {SWAKS_INSTALL}")
    proc = await asyncio.create_subprocess_exec(SWAKS, "--timeout", "15", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"swaks {' '.join(args)} did not finish within {timeout}s") from None
    return int(proc.returncode or 0), out.decode("utf-8", "replace")


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking client call (smtplib) without blocking the gateway's loop."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), timeout=30)


def smtp_client(port: int, *, tls: ssl.SSLContext | None = None, implicit: bool = False) -> smtplib.SMTP:
    if implicit:
        return smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=tls)
    client = smtplib.SMTP("127.0.0.1", port, timeout=10)
    if tls is not None:
        client.starttls(context=tls)
    return client


class RawSmtp:
    """A line-level SMTP client over a real socket, for inputs no library would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, tls: ssl.SSLContext | None = None, greet: bool = True) -> RawSmtp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                       server_hostname="localhost" if tls else None)
        raw = cls(reader, writer)
        if greet:
            greeting = await raw.reply()
            assert greeting.startswith("220 "), greeting
        return raw

    async def reply(self, timeout: float = 10.0) -> str:
        """One complete reply (all lines of a multi-line one), or '' on EOF."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout=timeout)
            if not line:
                return "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        assert (await self.cmd("STARTTLS")).startswith("220")
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def envelope(self, mail_from: str = "a@client.test", rcpt: str = "ops@example.com") -> None:
        assert (await self.cmd("EHLO client.test")).startswith("250")
        assert (await self.cmd(f"MAIL FROM:<{mail_from}>")).startswith("250")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await self.cmd("DATA")).startswith("354")

    async def closed(self, timeout: float = 10.0) -> bool:
        """True once the server closed the connection (EOF)."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), timeout=timeout) == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), timeout=2)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass


def sink_lines(path: Path) -> list[dict[str, Any]]:
    """The envelopes a file connector wrote."""
    return jsonl(path)


# --- a relay the tests script ------------------------------------------------------------


@dataclass
class RelayHandler:
    """aiosmtpd handler: records messages; ``data_replies`` answer DATA in order (then 250)."""

    data_replies: list[str] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    messages: list[Envelope] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    #: Every DATA received, accepted or not; every RCPT address asked for.
    attempts: list[bytes] = field(default_factory=list)
    rcpts_seen: list[str] = field(default_factory=list)
    ehlo_count: int = 0

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        self.ehlo_count += 1
        return responses

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          options: list[str]) -> str:
        self.rcpts_seen.append(address)
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts.append(envelope.original_content or b"")
        if self.data_replies:
            return self.data_replies.pop(0)
        self.messages.append(envelope)
        self.sessions.append(session)
        return "250 2.0.0 Ok: stored"


class Relay:
    """A real SMTP server (aiosmtpd Controller, its own thread) on a free loopback port."""

    def __init__(self, handler: RelayHandler | None = None, *, tls: ssl.SSLContext | None = None,
                 implicit_tls: bool = False, users: dict[str, str] | None = None):
        self.handler = handler or RelayHandler()
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if tls is not None and not implicit_tls:
            kwargs.update(tls_context=tls, require_starttls=True)
        if implicit_tls:
            kwargs.update(ssl_context=tls)
        if users is not None:
            def authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                              data: Any) -> AuthResult:
                ok = isinstance(data, LoginPassword) and users.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok, handled=False)
            kwargs.update(authenticator=authenticator, auth_required=True,
                          auth_require_tls=not implicit_tls)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port, ready_timeout=10,
                                     **kwargs)

    def __enter__(self) -> Relay:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


# --- the peers are here --------------------------------------------------------------------


def test_swaks_is_installed_with_tls() -> None:
    path = shutil.which("swaks") or SWAKS
    if not Path(path).exists():
        pytest.fail(f"swaks is not installed: run {SWAKS_INSTALL}")
    support = subprocess.run([path, "--support"], capture_output=True, text=True, timeout=30, check=False)
    text = support.stdout + support.stderr
    assert "TLS supported" in text, f"swaks cannot speak TLS (Net::SSLeay missing): run {SWAKS_INSTALL}"


async def test_relay_helper_is_a_real_server(tmp_path: Path) -> None:
    with Relay() as relay:
        client = await in_thread(smtp_client, relay.port)
        await in_thread(client.sendmail, "a@x.test", ["b@y.test"], b"Subject: t\r\n\r\nhi\r\n")
        await in_thread(client.quit)
    assert len(relay.handler.messages) == 1
    assert relay.handler.messages[0].content == b"Subject: t\r\n\r\nhi\r\n"
