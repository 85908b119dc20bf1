"""DMARC at SMTP time, end to end: swaks → the real ``smtp`` connector in a real in-process
gateway → routes on ``auth.*`` → file sinks.

DNS is the stub server on 127.0.0.1 (real DNS over UDP); swaks is the real client; the DKIM
signatures are made here with dkimpy, independently of the code under test.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.gwtest import free_port, jsonl, running_gateway, wait_for
from tests.integration.test_smtp_inbound import PASSWORD, users_file
from tests.integration.test_smtp_peers import make_certs, swaks
from tests.mailauth_support import StubDns, dkim_txt, message, pem, rsa_key, stub_dns, wire

pytestmark = pytest.mark.integration

R_DMARC = "550 5.7.1 Message rejected: it fails the DMARC policy of example.test"
R_DNS = "451 4.7.1 Sender authentication could not complete (DNS), try again later"


@pytest.fixture(scope="module")
def key() -> Any:
    return rsa_key()


@pytest.fixture
def dns(key: Any) -> Iterator[StubDns]:
    with stub_dns() as server:
        server.txt("sel._domainkey.example.test", dkim_txt(key))
        server.txt("example.test", "v=spf1 ip4:192.0.2.1 -all")  # 127.0.0.1 may not send for it
        server.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        yield server


def smtp(port: int, policy: str, dns: StubDns, **extra: Any) -> str:
    settings = {"type": "smtp", "listen": f"127.0.0.1:{port}", "hostname": "mx.gw.test", "recipients": ["gw.test"],
                "auth_check": {"policy": policy, "resolver": dns.address, "timeout": "0.5s",
                               "authserv_id": "mx.gw.test"}, **extra}
    return json.dumps(settings)


@pytest.fixture
async def gateway(tmp_path: Path, dns: StubDns) -> AsyncIterator[dict[str, Any]]:
    ports = {"strict": free_port(), "tagged": free_port(), "submit": free_port()}
    certs = make_certs(tmp_path / "certs")
    files = {name: tmp_path / f"{name}.jsonl" for name in ("inbox", "quarantine", "sent")}
    submit = smtp(ports["submit"], "reject", dns, tls={"cert": certs.cert, "key": certs.key},
                  users={"file": users_file(tmp_path)})
    yaml = f"""
    connectors:
      mx: {smtp(ports["strict"], "reject", dns)}
      mx-tag: {smtp(ports["tagged"], "tag", dns)}
      submit: {submit}
      inbox: {{type: file, path: "{files['inbox']}", fsync: false}}
      quarantine: {{type: file, path: "{files['quarantine']}", fsync: false}}
      sent: {{type: file, path: "{files['sent']}", fsync: false}}
    routes:
      - name: authentic
        from: [mx, mx-tag]
        match: {{when: "auth.dmarc == 'pass'"}}
        to: [{{connector: inbox}}]
      - name: suspect
        from: mx-tag
        match: {{when: "auth.dmarc in ['fail', 'none', 'permerror']"}}
        to: [{{connector: quarantine}}]
      - name: our-users
        from: submit
        match: {{when: "auth.user == 'alice'"}}
        to: [{{connector: sent}}]
    """
    async with running_gateway(tmp_path, yaml) as rt:
        yield {**ports, **files, "runtime": rt}


async def send(port: int, data: bytes, tmp_path: Path, *extra: str, mail_from: str = "alice@example.test",
               to: str = "ops@gw.test") -> str:
    path = tmp_path / "message.eml"
    path.write_bytes(data)
    _, out = await swaks("--server", f"127.0.0.1:{port}", "--helo", "mail.example.test", "--from", mail_from,
                          "--to", to, "--data", f"@{path}", *extra)
    return out


def data_reply(transcript: str) -> str:
    """The server's answer to the end of DATA in a swaks transcript."""
    lines = [ln for ln in transcript.splitlines() if ln[:4] in ("<-  ", "<** ", "<~  ", "<~* ")]
    after_354 = lines[[i for i, ln in enumerate(lines) if " 354 " in ln][-1] + 1]
    return after_354[4:]


def records(path: Path) -> list[dict[str, Any]]:
    return jsonl(path)


def body(record: dict[str, Any]) -> str:
    if record["body_encoding"] == "base64":
        return base64.b64decode(record["body"]).decode("utf-8")
    return str(record["body"])


def signed_message(key: Any, selector: str = "sel", **kw: Any) -> bytes:
    raw = wire(message(**kw))
    return dkim.sign(raw, selector.encode(), b"example.test", pem(key, "pkcs1").encode()) + raw


async def test_spoofed_mail_gets_550_and_signed_mail_arrives_tagged(
        gateway: dict[str, Any], key: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway"):
        transcript = await send(gateway["strict"], wire(message(subject="Pay invoice 42 now")), tmp_path)
    assert data_reply(transcript) == R_DMARC
    refused = [r for r in caplog.records if r.getMessage() == "smtp.auth_refused"]
    assert len(refused) == 1 and refused[0].fields["dmarc"] == "fail"  # type: ignore[attr-defined]

    transcript = await send(gateway["strict"], signed_message(key), tmp_path)
    assert data_reply(transcript).startswith("250 2.0.0 OK: queued as ")
    await wait_for(lambda: len(records(gateway["inbox"])) == 1, what="the signed message in the inbox")
    env = records(gateway["inbox"])[0]
    auth = env["attributes"]["auth"]
    assert (auth["spf"], auth["dkim"], auth["dmarc"]) == ("fail", "pass", "pass")  # DMARC passes on DKIM
    assert auth["dkim_domains"] == ["example.test"] and auth["from_domain"] == "example.test"
    text = body(env)
    assert text.startswith("Authentication-Results: mx.gw.test;\r\n\tspf=fail")
    assert "dkim=pass header.d=example.test header.s=sel" in text
    assert "dmarc=pass (p=reject dis=none) header.from=example.test" in text
    # the parsed view and the size are of the message as passed on, header included
    assert env["attributes"]["email"]["headers"]["authentication-results"].startswith("mx.gw.test;")
    assert env["attributes"]["size"] == len(text.encode())
    assert await gateway["runtime"].spool.dead_letters() == []
    assert all("Pay invoice" not in body(r) for r in records(gateway["inbox"]) + records(gateway["quarantine"]))


async def test_broken_signature_is_refused_and_dns_failure_asks_to_retry(
        gateway: dict[str, Any], key: Any, dns: StubDns, tmp_path: Path) -> None:
    tampered = signed_message(key).replace(b"north", b"south")
    assert data_reply(await send(gateway["strict"], tampered, tmp_path)).startswith("550 5.7.1 ")

    # Another selector (the first key is cached now) whose lookup times out: 451, never 550.
    dns.txt("sel2._domainkey.example.test", dkim_txt(key))
    dns.silent.add("sel2._domainkey.example.test")
    assert data_reply(await send(gateway["strict"], signed_message(key, selector="sel2"), tmp_path)) == R_DNS
    # The DMARC record's server fails (SERVFAIL): 451 too.
    dns.txt("_dmarc.other.test", "v=DMARC1; p=reject")
    dns.servfail.add("_dmarc.other.test")
    spoof = wire(message(sender="Bob <bob@other.test>"))
    assert data_reply(await send(gateway["strict"], spoof, tmp_path, mail_from="bob@other.test")) == R_DNS
    assert records(gateway["inbox"]) == []

    dns.silent.clear()  # DNS is back: the sender's retry is accepted
    transcript = await send(gateway["strict"], signed_message(key, selector="sel2"), tmp_path)
    assert data_reply(transcript).startswith("250 ")
    await wait_for(lambda: len(records(gateway["inbox"])) == 1, what="the retried message")


async def test_tag_policy_accepts_and_routes_on_auth(gateway: dict[str, Any], key: Any, tmp_path: Path) -> None:
    # A sender's own "Authentication-Results" claiming our name must not survive.
    forged = b"Authentication-Results: mx.gw.test; dmarc=pass header.from=example.test\r\n" + \
        wire(message(subject="spoof"))
    assert data_reply(await send(gateway["tagged"], forged, tmp_path)).startswith("250 ")
    assert data_reply(await send(gateway["tagged"], signed_message(key, subject="real"), tmp_path)).startswith("250 ")
    await wait_for(lambda: len(records(gateway["quarantine"])) == 1 and len(records(gateway["inbox"])) == 1,
                   what="one message in each file")
    suspect = records(gateway["quarantine"])[0]
    assert suspect["attributes"]["auth"]["dmarc"] == "fail"
    assert suspect["attributes"]["auth"]["dmarc_disposition"] == "reject"
    text = body(suspect)
    assert "Subject: spoof" in text
    assert text.count("Authentication-Results: mx.gw.test;") == 1
    assert "dmarc=fail (p=reject dis=reject) header.from=example.test" in text
    assert "dmarc=pass" not in text
    assert "Subject: real" in body(records(gateway["inbox"])[0])


async def test_authenticated_submitters_are_not_checked(gateway: dict[str, Any], tmp_path: Path) -> None:
    # The same spoof the strict listener refuses, from our own user over TLS + AUTH: accepted.
    transcript = await send(gateway["submit"], wire(message(subject="from alice")), tmp_path, "--tls",
                            "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD)
    assert data_reply(transcript).startswith("250 "), transcript
    await wait_for(lambda: len(records(gateway["sent"])) == 1, what="the submitted message")
    env = records(gateway["sent"])[0]
    assert env["attributes"]["auth"] == {"user": "alice"}
    assert "Authentication-Results" not in body(env)
