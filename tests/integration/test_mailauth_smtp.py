"""DMARC at SMTP time, end to end: swaks → a real in-process gateway → routes on ``auth.*`` → file.

The inbound side is a minimal aiosmtpd connector defined here (``authsmtp``) that calls the
mailauth functions the way the SMTP connector is to call them: verify after DATA, answer with
``smtp_reply`` when the policy refuses, otherwise add the Authentication-Results header, put the
results in ``attributes['auth']`` and answer as the gateway's outcome says. DNS is the stub
server on 127.0.0.1; swaks is the real client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import dkim
import pytest
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from connectors.file import FileConnector
from connectors.mailauth import Verifier, add_authentication_results, smtp_reply
from connectors.mailauth.config import AuthCheckSettings
from gateway.contract import Connector, ConnectorConfig, ConnectorContext, Deliver, Status
from gateway.envelope import Envelope
from gateway.logs import event
from gateway.registry import Registry
from tests.gwtest import free_port, running_gateway, wait_for
from tests.mailauth_support import StubDns, dkim_txt, message, pem, rsa_key, stub_dns, wire

pytestmark = pytest.mark.integration


class AuthSmtpConfig(ConnectorConfig, AuthCheckSettings):
    type: Literal["authsmtp"] = "authsmtp"
    listen: str


class AuthSmtp(Connector):
    """Test-only inbound SMTP: the mailauth wiring in ~30 lines."""

    kind = "authsmtp"
    Config = AuthSmtpConfig
    supports_inbound = True

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, AuthSmtpConfig)
        self.cfg = config
        self.verifier = Verifier(config.auth_check, log=self.log) if config.auth_check else None
        self.server: asyncio.Server | None = None

    async def listen(self, deliver: Deliver) -> None:
        host, _, port = self.cfg.listen.rpartition(":")
        handler = _Handler(self, deliver)
        self.server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(handler, hostname="mx.gw.test"), host, int(port))

    async def stop_listening(self, drain: float) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


class _Handler:
    def __init__(self, conn: AuthSmtp, deliver: Deliver):
        self.conn = conn
        self.deliver = deliver

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        raw = bytes(envelope.original_content or b"")
        ip = str(session.peer[0]) if isinstance(session.peer, tuple) else ""
        attributes: dict[str, Any] = {"mail_from": envelope.mail_from, "helo": session.host_name or ""}
        check = self.conn.cfg.auth_check
        if self.conn.verifier is not None and check is not None and check.policy != "off":
            results = await self.conn.verifier.verify(raw, ip, session.host_name or "", envelope.mail_from or "",
                                                      connector=self.conn.name)
            refusal = smtp_reply(results, check)
            if refusal is not None:
                event(self.conn.log, "smtp.auth_refused", logging.INFO, connector=self.conn.name,
                      reply=refusal[:3], dmarc=results.dmarc)
                return refusal
            raw = add_authentication_results(raw, results)
            attributes["auth"] = results.as_dict()
        env = Envelope(source=self.conn.name, protocol="smtp", subject=envelope.rcpt_tos[0], body=raw,
                       content_type="message/rfc822", attributes=attributes)
        outcome = await self.deliver(env)
        if outcome.acknowledge:
            return f"250 2.0.0 OK: queued as {outcome.envelope_id}"
        if outcome.status is Status.RETRY:
            return "451 4.3.0 Temporary failure, try again later"
        return "554 5.7.0 Message refused"


@pytest.fixture(scope="module")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        pytest.fail("swaks is not installed: apt-get install -y swaks")
    return path


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_key()


@pytest.fixture
def dns(key: Any) -> Iterator[StubDns]:
    with stub_dns() as server:
        server.txt("sel._domainkey.example.test", dkim_txt(key))
        server.txt("example.test", "v=spf1 ip4:192.0.2.1 -all")  # 127.0.0.1 is not allowed to send for it
        server.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        server.txt("_dmarc.tagged.test", "v=DMARC1; p=reject")
        yield server


@pytest.fixture
async def gateway(tmp_path: Path, dns: StubDns) -> AsyncIterator[dict[str, Any]]:
    strict, tagged = free_port(), free_port()
    yaml = f"""
    connectors:
      mx:
        type: authsmtp
        listen: "127.0.0.1:{strict}"
        auth_check: {{policy: reject, resolver: "{dns.address}", timeout: 0.5s, authserv_id: mx.gw.test}}
      mx-tag:
        type: authsmtp
        listen: "127.0.0.1:{tagged}"
        auth_check: {{policy: tag, resolver: "{dns.address}", timeout: 0.5s, authserv_id: mx.gw.test}}
      inbox: {{type: file, path: "{tmp_path / 'inbox.jsonl'}"}}
      quarantine: {{type: file, path: "{tmp_path / 'quarantine.jsonl'}"}}
    routes:
      - name: authentic
        from: [mx, mx-tag]
        match: {{when: "auth.dmarc == 'pass'"}}
        to: [{{connector: inbox}}]
      - name: suspect
        from: mx-tag
        match: {{when: "auth.dmarc in ['fail', 'none', 'permerror']"}}
        to: [{{connector: quarantine}}]
    """
    registry = Registry({"authsmtp": AuthSmtp, "file": FileConnector})
    async with running_gateway(tmp_path, yaml, registry=registry):
        yield {"strict": strict, "tagged": tagged, "inbox": tmp_path / "inbox.jsonl",
               "quarantine": tmp_path / "quarantine.jsonl"}


async def send(swaks: str, port: int, data: bytes, tmp_path: Path, mail_from: str = "alice@example.test",
               to: str = "ops@gw.test") -> str:
    path = tmp_path / "message.eml"
    path.write_bytes(data)
    proc = await asyncio.create_subprocess_exec(
        swaks, "--server", f"127.0.0.1:{port}", "--helo", "mail.example.test", "--from", mail_from, "--to", to,
        "--data", f"@{path}", "--timeout", "20", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    return out.decode("utf-8", "replace")


def data_reply(transcript: str) -> str:
    """The server's answer to the end of DATA in a swaks transcript."""
    lines = [ln for ln in transcript.splitlines() if ln.startswith(("<-  ", "<** "))]
    after_354 = lines[[i for i, ln in enumerate(lines) if " 354 " in ln][-1] + 1]
    return after_354[4:]


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def signed_message(key: Any, selector: str = "sel", **kw: Any) -> bytes:
    raw = wire(message(**kw))
    return dkim.sign(raw, selector.encode(), b"example.test", pem(key, "pkcs1").encode()) + raw


async def test_spoofed_mail_gets_550_and_signed_mail_is_accepted(swaks: str, gateway: dict[str, Any], key: Any,
                                                                 tmp_path: Path) -> None:
    spoofed = wire(message(subject="Pay invoice 42 now"))
    transcript = await send(swaks, gateway["strict"], spoofed, tmp_path)
    assert data_reply(transcript) == "550 5.7.1 Message rejected: it fails the DMARC policy of example.test"

    transcript = await send(swaks, gateway["strict"], signed_message(key), tmp_path)
    assert data_reply(transcript).startswith("250 2.0.0 OK: queued as ")
    await wait_for(lambda: len(records(gateway["inbox"])) == 1, what="the signed message in the inbox")
    env = records(gateway["inbox"])[0]
    assert env["attributes"]["auth"]["dmarc"] == "pass"
    assert env["attributes"]["auth"]["spf"] == "fail"  # DMARC passes on the aligned DKIM signature
    assert env["body"].startswith("Authentication-Results: mx.gw.test;\r\n\tspf=fail")
    assert "dkim=pass header.d=example.test header.s=sel" in env["body"]
    assert all("Pay invoice" not in r["body"] for r in records(gateway["inbox"]))


async def test_tampered_signature_is_refused_and_dns_failure_asks_to_retry(
        swaks: str, gateway: dict[str, Any], key: Any, dns: StubDns, tmp_path: Path) -> None:
    tampered = signed_message(key).replace(b"north", b"south")
    transcript = await send(swaks, gateway["strict"], tampered, tmp_path)
    assert data_reply(transcript).startswith("550 5.7.1 ")

    # Another selector (the first key is in the resolver's cache now) whose lookup times out.
    dns.txt("sel2._domainkey.example.test", dkim_txt(key))
    dns.silent.add("sel2._domainkey.example.test")
    transcript = await send(swaks, gateway["strict"], signed_message(key, selector="sel2"), tmp_path)
    assert data_reply(transcript) == "451 4.7.1 Sender authentication could not complete (DNS), try again later"
    dns.silent.clear()
    transcript = await send(swaks, gateway["strict"], signed_message(key, selector="sel2"), tmp_path)
    assert data_reply(transcript).startswith("250 ")
    await wait_for(lambda: len(records(gateway["inbox"])) == 1, what="the retried message")


async def test_tag_policy_accepts_and_routes_on_auth(swaks: str, gateway: dict[str, Any], key: Any,
                                                     tmp_path: Path) -> None:
    transcript = await send(swaks, gateway["tagged"], wire(message(subject="spoof")), tmp_path)
    assert data_reply(transcript).startswith("250 ")
    transcript = await send(swaks, gateway["tagged"], signed_message(key, subject="real"), tmp_path)
    assert data_reply(transcript).startswith("250 ")
    await wait_for(lambda: len(records(gateway["quarantine"])) == 1 and len(records(gateway["inbox"])) == 1,
                   what="one message in each file")
    suspect = records(gateway["quarantine"])[0]
    assert suspect["attributes"]["auth"]["dmarc"] == "fail"
    assert suspect["attributes"]["auth"]["dmarc_disposition"] == "reject"
    assert "Subject: spoof" in suspect["body"]
    assert "dmarc=fail (p=reject dis=reject) header.from=example.test" in suspect["body"]
    assert "Subject: real" in records(gateway["inbox"])[0]["body"]
