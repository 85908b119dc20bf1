"""SMTP inbound against real clients (swaks, smtplib, raw sockets) through a real in-process gateway.

Each test runs a gateway with an smtp listener on a free loopback port and a file sink, sends
real SMTP, and checks both the wire answers and what the gateway stored.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import smtplib
from pathlib import Path
from typing import Any

import pytest

from connectors.smtp import SmtpConfig, SmtpConnector
from connectors.smtp.users import hash_password
from gateway.contract import ConnectorContext, Outcome
from gateway.envelope import Envelope
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_smtp_peers import RawSmtp, in_thread, make_certs, sink_lines, smtp_client, swaks

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "mail"
PASSWORD = "correct horse battery"


def gateway_yaml(tmp_path: Path, port: int, *, routes: str | None = None, gateway: str = "", **smtp: Any) -> str:
    settings: dict[str, Any] = {
        "type": "smtp", "listen": f"127.0.0.1:{port}", "hostname": "gw.test",
        "recipients": ["example.com", "boss@example.net"], "max_message_size": "20KiB", "max_recipients": 5,
        "idle_timeout": "10s", **smtp,
    }
    routes = routes or """
  - name: example-mail
    from: mail-in
    match: {subject: "*@example.com"}
    to: [{connector: sink}]
"""
    return f"""{gateway}
connectors:
  mail-in: {json.dumps(settings)}
  sink: {{type: file, path: "{tmp_path / 'sink.jsonl'}", fsync: false}}
routes:{routes}"""


def body_of(line: dict[str, Any]) -> bytes:
    if line["body_encoding"] == "base64":
        return base64.b64decode(line["body"])
    return str(line["body"]).encode("utf-8")


def users_file(tmp_path: Path) -> str:
    path = tmp_path / "smtp-users"
    path.write_text(f"# test users\nalice:{hash_password(PASSWORD, rounds=1000)}\n")
    return str(path)


def plain_auth(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- plain delivery ------------------------------------------------------------------------


async def test_swaks_and_smtplib_messages_reach_the_gateway(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    raw = (SAMPLES / "attachments.eml").read_bytes() + b".a line that starts with a dot\r\n"
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--helo", "client.test", "--from", "sensor@plant.test",
                              "--to", "ops@example.com", "--header", "Subject: Boiler 7 at 93 C",
                              "--header", "X-Plant-Site: 7", "--body", "temperature 93")
        assert rc == 0, out
        assert "<-  250 2.0.0 OK: queued as " in out
        client = await in_thread(smtp_client, port)
        refused = await in_thread(client.sendmail, "service@vendor.test", ["ops@example.com", "Night@Example.com"], raw)
        assert refused == {}
        await in_thread(client.quit)
        await wait_for(lambda: len(sink_lines(sink)) == 3, what="three stored envelopes")
    first, *pair = sink_lines(sink)
    assert first["protocol"] == "smtp" and first["source"] == "mail-in"
    assert first["subject"] == "ops@example.com"
    assert first["content_type"] == "message/rfc822"
    assert first["headers"]["subject"] == "Boiler 7 at 93 C" and first["headers"]["x-plant-site"] == "7"
    attrs = first["attributes"]
    assert attrs["mail_from"] == "sensor@plant.test" and attrs["rcpt"] == "ops@example.com"
    assert attrs["helo"] == "client.test" and attrs["peer"].startswith("127.0.0.1:") and attrs["tls"] is None
    assert attrs["email"]["subject"] == "Boiler 7 at 93 C"
    assert attrs["email"]["text"].startswith("temperature 93")
    # one envelope per recipient; the body is the message exactly as sent (dot-stuffing undone)
    assert sorted(e["subject"] for e in pair) == ["night@example.com", "ops@example.com"]
    for env in pair:
        assert body_of(env) == raw
        assert env["attributes"]["rcpt_tos"] == ["ops@example.com", "Night@Example.com"]
        assert [a["filename"] for a in env["attributes"]["email"]["attachments"]] == [
            "logo.png", "Prüfbericht K7.pdf", "readings.csv", "original.eml"]
    assert pair[0]["id"] != pair[1]["id"]


async def test_relaying_is_refused_and_unrouted_mail_is_rejected(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--from", "a@client.test", "--to", "victim@evil.test")
        assert rc != 0 and "<** 550 5.7.1 Relay access denied" in out, out
        client = await in_thread(smtp_client, port)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await in_thread(client.sendmail, "a@client.test", ["x@sub.example.com", "y@evil.test"],
                            b"Subject: x\r\n\r\n")
        assert {code for code, _ in refused.value.recipients.values()} == {550}
        assert all(b"5.7.1" in text for _, text in refused.value.recipients.values())
        # accepted by the relay policy, but no route takes it (unmatched: reject) -> 550 after DATA
        with pytest.raises(smtplib.SMTPDataError) as data_error:
            await in_thread(client.sendmail, "a@client.test", ["boss@example.net"], b"Subject: x\r\n\r\nhi\r\n")
        assert data_error.value.smtp_code == 550 and data_error.value.smtp_error.startswith(b"5.1.1")
        await in_thread(client.quit)
    assert sink_lines(sink) == []


async def test_broken_mime_is_kept_as_sent(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    deep = b"Subject: deep\r\n" + b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(3000))
    messages = [(SAMPLES / "broken-boundary.eml").read_bytes(), (SAMPLES / "bad-base64.eml").read_bytes(), deep,
                b"Subject: \xff\xfe raw bytes\r\nFrom: \xc3(@x\r\n\r\n\x00\xff\r\n"]
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port, max_message_size="1MiB")):
        client = await in_thread(smtp_client, port)
        for raw in messages:
            assert await in_thread(client.sendmail, "a@client.test", ["ops@example.com"], raw) == {}
        await in_thread(client.quit)
        await wait_for(lambda: len(sink_lines(sink)) == len(messages), what="every message stored")
    stored = sink_lines(sink)
    assert [body_of(e) for e in stored] == messages
    views = [e["attributes"]["email"] for e in stored]
    assert "CloseBoundaryNotFoundDefect" in views[0]["defects"]
    assert "InvalidBase64CharactersDefect" in views[1]["defects"]
    assert views[2]["subject"] == "deep" and any(d.startswith("unparsable") for d in views[2]["defects"])
    assert views[3]["subject"] == "\ufffd\ufffd raw bytes"


async def test_invalid_utf8_addresses_are_refused(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        raw = await RawSmtp.open(port)
        assert "SMTPUTF8" in await raw.cmd("EHLO client.test")
        assert (await raw.cmd(b"MAIL FROM:<\xff\xfe@client.test>")).startswith("553 5.1.7")
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await raw.cmd(b"RCPT TO:<\xc3(@example.com>")).startswith("553 5.1.3")
        await raw.close()


# --- limits ----------------------------------------------------------------------------------


async def test_size_is_announced_and_enforced_at_mail_and_after_data(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        raw = await RawSmtp.open(port)
        assert "250-SIZE 20480" in await raw.cmd("EHLO client.test")
        assert (await raw.cmd("MAIL FROM:<a@client.test> SIZE=20481")).startswith("552 5.3.4")
        # no SIZE given: the limit is enforced on the data itself
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<ops@example.com>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        await raw.send(b"Subject: too big\r\n\r\n" + (b"x" * 98 + b"\r\n") * 300 + b".\r\n")
        assert (await raw.reply()).startswith("552 5.3.4")
        # the session goes on
        assert (await raw.cmd("NOOP")).startswith("250")
        await raw.envelope()
        assert (await raw.cmd(b"Subject: small\r\n\r\nfits\r\n.")).startswith("250 2.0.0")
        await raw.close()
        await wait_for(lambda: len(sink_lines(sink)) == 1, what="the small message")
    assert [e["headers"]["subject"] for e in sink_lines(sink)] == ["small"]


async def test_recipient_and_line_limits(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        raw = await RawSmtp.open(port)
        assert (await raw.cmd("EHLO client.test")).startswith("250")
        assert (await raw.cmd("NOOP " + "x" * 5000)).startswith("500 5.5.2")
        assert (await raw.cmd("NOOP")).startswith("250")
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("250")
        for i in range(5):
            assert (await raw.cmd(f"RCPT TO:<r{i}@example.com>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<r5@example.com>")).startswith("452 4.5.3")
        assert (await raw.cmd("DATA")).startswith("354")
        # a 1,200-byte line: over RFC 5321's 1,000
        assert (await raw.cmd(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.")).startswith("500 5.5.2")
        await raw.envelope()
        # a 100 KB line without a line end in sight: discarded as it streams, then 500
        assert (await raw.cmd(b"Subject: longer\r\n\r\n" + b"z" * 100_000 + b"\r\n.")).startswith("500 5.5.2")
        assert (await raw.cmd("NOOP")).startswith("250")
        await raw.close()
    assert sink_lines(sink) == []


SMUGGLED = (b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")


@pytest.mark.parametrize("terminator", [
    b"\n.\r\n", b"\n.\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\r.\n", b"\n.\r",
], ids=repr)
async def test_smtp_smuggling_never_makes_a_second_message(tmp_path: Path, terminator: bytes) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        raw = await RawSmtp.open(port)
        await raw.envelope()
        # one write: the first "message", the fake terminator, the smuggled one, the real end
        await raw.send(b"Subject: first\r\n\r\nhello" + terminator + SMUGGLED + b".\r\n")
        assert (await raw.reply()).startswith("550 5.5.2")
        # exactly one answer: the next reply is NOOP's, not a 250 for a smuggled MAIL FROM
        assert (await raw.cmd("NOOP")) == "250 OK"
        await raw.envelope()
        assert (await raw.cmd(b"Subject: after\r\n\r\nclean\r\n.")).startswith("250 2.0.0")
        await raw.close()
        await wait_for(lambda: len(sink_lines(sink)) == 1, what="the clean message")
    assert [e["headers"]["subject"] for e in sink_lines(sink)] == ["after"]


async def test_bare_newline_in_the_headers_is_refused_too(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)):
        raw = await RawSmtp.open(port)
        await raw.envelope()
        assert (await raw.cmd(b"Subject: x\nBcc: y@example.com\r\n\r\nbody\r\n.")).startswith("550 5.5.2")
        await raw.close()
    assert sink_lines(tmp_path / "sink.jsonl") == []


# --- TLS and AUTH ----------------------------------------------------------------------------


async def test_starttls_and_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    certs = make_certs(tmp_path / "tls")
    ctx = certs.client_context()
    yaml = gateway_yaml(tmp_path, port, tls={"cert": certs.cert, "key": certs.key},
                        users={"file": users_file(tmp_path)})
    async with running_gateway(tmp_path, yaml):
        raw = await RawSmtp.open(port)
        ehlo = await raw.cmd("EHLO client.test")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert (await raw.cmd(plain_auth("alice", PASSWORD))).startswith("538 5.7.11")
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("530 5.7.0")
        await raw.starttls(ctx)
        ehlo = await raw.cmd("EHLO client.test")
        assert "250-AUTH LOGIN PLAIN" in ehlo and "STARTTLS" not in ehlo
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("530 5.7.0")
        assert (await raw.cmd(plain_auth("alice", "wrong"))).startswith("535 5.7.8")
        assert (await raw.cmd(plain_auth("mallory", PASSWORD))).startswith("535 5.7.8")
        assert (await raw.cmd(plain_auth("alice", PASSWORD))).startswith("235")
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await raw.cmd("RCPT TO:<ops@example.com>")).startswith("250")
        assert (await raw.cmd("DATA")).startswith("354")
        assert (await raw.cmd(b"Subject: raw over tls\r\n\r\nhi\r\n.")).startswith("250 2.0.0")
        await raw.close()

        def smtplib_send() -> None:
            client = smtp_client(port, tls=ctx)
            client.login("alice", PASSWORD)  # AUTH PLAIN
            client.sendmail("a@client.test", ["ops@example.com"], b"Subject: smtplib\r\n\r\nhi\r\n")
            client.quit()
        await in_thread(smtplib_send)
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--tls", "--auth", "LOGIN", "--auth-user", "alice",
                              "--auth-password", PASSWORD, "--from", "a@client.test", "--to", "ops@example.com",
                              "--header", "Subject: swaks")
        assert rc == 0 and "<~  250 2.0.0 OK" in out, out

        # three failures end the session
        raw = await RawSmtp.open(port)
        await raw.starttls(ctx)
        await raw.cmd("EHLO client.test")
        for _ in range(2):
            assert (await raw.cmd(plain_auth("alice", "nope"))).startswith("535")
        assert (await raw.cmd(plain_auth("alice", "nope"))).startswith("421 4.7.0")
        assert await raw.closed()
        await wait_for(lambda: len(sink_lines(sink)) == 3, what="three authenticated messages")
    stored = sink_lines(sink)
    assert [e["headers"]["subject"] for e in stored] == ["raw over tls", "smtplib", "swaks"]
    for env in stored:
        assert env["attributes"]["auth"] == {"user": "alice"}
        assert env["attributes"]["tls"] in ("TLSv1.2", "TLSv1.3")
    logged = caplog.text
    assert "smtp.auth_failed" in logged and "smtp.authenticated" in logged
    assert PASSWORD not in logged and base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode() not in logged


async def test_starttls_required_refuses_mail_before_tls(tmp_path: Path) -> None:
    port = free_port()
    certs = make_certs(tmp_path / "tls")
    yaml = gateway_yaml(tmp_path, port, tls={"cert": certs.cert, "key": certs.key}, starttls="required")
    async with running_gateway(tmp_path, yaml):
        raw = await RawSmtp.open(port)
        await raw.cmd("EHLO client.test")
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("530 5.7.0 Must issue a STARTTLS")
        await raw.close()
        client = await in_thread(lambda: smtp_client(port, tls=certs.client_context()))
        assert await in_thread(client.sendmail, "a@client.test", ["ops@example.com"], b"Subject: t\r\n\r\n") == {}
        await in_thread(client.quit)
        await wait_for(lambda: len(sink_lines(tmp_path / "sink.jsonl")) == 1, what="the message sent over TLS")


async def test_implicit_tls_with_auth(tmp_path: Path) -> None:
    port = free_port()
    certs = make_certs(tmp_path / "tls")
    yaml = gateway_yaml(tmp_path, port, tls={"cert": certs.cert, "key": certs.key}, implicit_tls=True,
                        users={"file": users_file(tmp_path)})
    async with running_gateway(tmp_path, yaml):
        raw = await RawSmtp.open(port, tls=certs.client_context())
        ehlo = await raw.cmd("EHLO client.test")
        assert "250-AUTH LOGIN PLAIN" in ehlo and "STARTTLS" not in ehlo
        assert (await raw.cmd("MAIL FROM:<a@client.test>")).startswith("530 5.7.0")
        await raw.close()

        def smtps_send() -> None:
            client = smtp_client(port, tls=certs.client_context(), implicit=True)
            client.login("alice", PASSWORD)
            client.sendmail("a@client.test", ["ops@example.com"], b"Subject: smtps\r\n\r\nhi\r\n")
            client.quit()
        await in_thread(smtps_send)
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--tlsc", "--auth", "PLAIN", "--auth-user", "alice",
                              "--auth-password", PASSWORD, "--from", "a@client.test", "--to", "ops@example.com",
                              "--header", "Subject: swaks smtps")
        assert rc == 0 and "<~  250 2.0.0 OK" in out, out
        # a client that does not speak TLS gets no SMTP at all
        plain = await RawSmtp.open(port, greet=False)
        await plain.send(b"EHLO client.test\r\n")
        assert await plain.closed()
        await wait_for(lambda: len(sink_lines(tmp_path / "sink.jsonl")) == 2, what="two messages over SMTPS")


# --- the answer is the gateway's outcome ---------------------------------------------------


async def test_spool_that_cannot_store_answers_451(tmp_path: Path) -> None:
    """The spool fills up between MAIL and the end of DATA: 451 4.3.0, nothing stored, never 250."""
    port = free_port()
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)) as rt:

        def talk() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.test")
                assert s.mail("a@client.test")[0] == 250
                assert s.rcpt("ops@example.com")[0] == 250
                rt.spool.min_free_bytes = 10**18  # the disk is now full
                rt.spool._free_checked_at = 0  # type: ignore[attr-defined]
                code, _ = s.docmd("DATA")
                assert code == 354
                s.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
                return s.getreply()

        code, text = await asyncio.get_running_loop().run_in_executor(None, talk)
    assert code == 451 and text.startswith(b"4.3.0 Temporary failure, try again later")
    assert sink_lines(tmp_path / "sink.jsonl") == []


async def test_direct_route_failures_and_dead_letters(tmp_path: Path) -> None:
    port = free_port()
    routes = """
  - name: direct-to-down-service
    from: mail-in
    match: {subject: "direct@example.com"}
    mode: direct
    timeout: 5s
    to: [{connector: down}]
  - name: broken-template
    from: mail-in
    match: {subject: "template@example.com"}
    to: [{connector: sink, body: "{{ attributes.no_such_thing }}"}]
  - name: example-mail
    from: mail-in
    match: {subject: "*@example.com"}
    to: [{connector: sink}]
"""
    yaml = gateway_yaml(tmp_path, port, routes=routes).replace(
        "connectors:\n", f"connectors:\n  down: {{type: rest, base_url: \"http://127.0.0.1:{free_port()}\"}}\n")
    async with running_gateway(tmp_path, yaml) as rt:
        client = await in_thread(smtp_client, port)
        # the target is unreachable: the gateway cannot take responsibility -> temporary failure
        with pytest.raises(smtplib.SMTPDataError) as retry:
            await in_thread(client.sendmail, "a@client.test", ["direct@example.com"], b"Subject: d\r\n\r\nhi\r\n")
        assert retry.value.smtp_code == 451 and retry.value.smtp_error.startswith(b"4.3.0")
        assert b"127.0.0.1" not in retry.value.smtp_error  # reasons stay in the log
        # the template fails but the message is kept as a dead letter: that is taking responsibility
        assert await in_thread(client.sendmail, "a@client.test", ["template@example.com"],
                               b"Subject: t\r\n\r\nhi\r\n") == {}
        await in_thread(client.quit)
        dead = await rt.spool.dead_letters()
        assert [(d.route, d.reason) for d in dead] == [("broken-template", "template")]
    assert sink_lines(tmp_path / "sink.jsonl") == []


def standalone(port: int, tmp_path: Path, **cfg: Any) -> SmtpConnector:
    config = SmtpConfig.model_validate({"type": "smtp", "listen": f"127.0.0.1:{port}", "recipients": ["example.com"],
                                        **cfg})
    ctx = ConnectorContext(name="mail-in", logger=logging.getLogger("gateway.connector.mail-in"),
                           http=None,  # type: ignore[arg-type]  # the smtp connector mounts nothing
                           state_dir=str(tmp_path))
    return SmtpConnector(config, ctx)


async def test_internal_failures_answer_451_without_details(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    port = free_port()
    conn = standalone(port, tmp_path)
    calls: list[str] = []

    async def deliver(env: Envelope) -> Outcome:
        calls.append(env.subject)
        if env.subject == "retry@example.com":
            return Outcome.retry(env.id, "spool unavailable")
        raise RuntimeError("do-not-leak: /var/secret/path")

    await conn.listen(deliver)
    try:
        client = await in_thread(smtp_client, port)
        for rcpt in ("boom@example.com", "retry@example.com"):
            with pytest.raises(smtplib.SMTPDataError) as err:
                await in_thread(client.sendmail, "a@client.test", [rcpt], b"Subject: x\r\n\r\nhi\r\n")
            assert err.value.smtp_code == 451 and err.value.smtp_error.startswith(b"4.3.0")
            assert b"leak" not in err.value.smtp_error and b"spool" not in err.value.smtp_error

        # an exception in a command handler (here RCPT) is a 451 as well, never aiosmtpd's 500
        async def broken(*args: Any) -> str:
            raise ValueError("do-not-leak: hook")
        assert conn._listener is not None
        conn._listener.hooks.handle_RCPT = broken  # type: ignore[method-assign]
        client2 = await in_thread(smtp_client, port)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await in_thread(client2.sendmail, "a@client.test", ["x@example.com"], b"Subject: x\r\n\r\n")
        code, text = refused.value.recipients["x@example.com"]
        assert code == 451 and text.startswith(b"4.3.0") and b"leak" not in text
        await in_thread(client.quit)
        await in_thread(client2.quit)
    finally:
        await conn.close()
    assert calls == ["boom@example.com", "retry@example.com"]
    assert "smtp.internal_error" in caplog.text


# --- time and session limits ------------------------------------------------------------------


async def test_timeouts_sessions_and_command_floods(tmp_path: Path) -> None:
    port = free_port()
    sink = tmp_path / "sink.jsonl"
    yaml = gateway_yaml(tmp_path, port, idle_timeout="1s", data_timeout="2s", max_sessions=2,
                        max_commands_per_session=10)
    loop = asyncio.get_running_loop()
    async with running_gateway(tmp_path, yaml) as rt:
        listener = rt.slots["mail-in"].connector._listener  # type: ignore[attr-defined]

        # idle: 421 4.4.2, then closed
        raw = await RawSmtp.open(port)
        started = loop.time()
        assert (await raw.reply(timeout=5)).startswith("421 4.4.2")
        assert await raw.closed(timeout=2) and loop.time() - started < 3

        # a command trickling in one byte at a time is cut off by the idle timer
        raw = await RawSmtp.open(port)
        started = loop.time()
        cut = False
        for byte in b"NOOP and a very slow rest of the command line":
            try:
                await raw.send(bytes([byte]))
            except ConnectionError:
                cut = True
                break
            if raw.reader.at_eof() or loop.time() - started > 6:
                break
            await asyncio.sleep(0.25)
        assert cut or raw.reader.at_eof() or await raw.closed(timeout=2)
        assert loop.time() - started < 4

        # a DATA transfer slower than data_timeout: 421, nothing stored
        raw = await RawSmtp.open(port)
        await raw.envelope()
        for _ in range(12):
            try:
                await raw.send(b"Subject: slow\r\n")
            except ConnectionError:
                break
            if raw.reader._buffer:  # type: ignore[attr-defined]  # the server answered
                break
            await asyncio.sleep(0.4)
        assert (await raw.reply(timeout=5)).startswith("421 4.4.2")

        # sessions are capped
        await wait_for(lambda: len(listener.sessions) == 0, what="idle sessions to close")
        one, two = await RawSmtp.open(port), await RawSmtp.open(port)
        third = await RawSmtp.open(port, greet=False)
        assert (await third.reply()).startswith("421 4.3.2")
        await one.close()
        await wait_for(lambda: len(listener.sessions) == 1, what="a free session slot")
        four = await RawSmtp.open(port)
        # a command flood ends with 421
        replies = [await four.cmd("NOOP") for _ in range(11)]
        assert all(r.startswith("250") for r in replies[:10]) and replies[10].startswith("421 4.7.0")
        assert await four.closed()

        # a client that disconnects mid-DATA leaves nothing behind
        await two.envelope()
        await two.send(b"Subject: cut\r\n\r\npartial")
        await two.close()
        await asyncio.sleep(0.2)
    assert sink_lines(sink) == []


async def test_shutdown_says_421_to_open_sessions(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(tmp_path, gateway_yaml(tmp_path, port)) as rt:
        raw = await RawSmtp.open(port)
        assert (await raw.cmd("EHLO client.test")).startswith("250")
        await rt.stop()
        assert (await raw.reply()).startswith("421 4.3.2")
        assert await raw.closed()
        with pytest.raises(OSError):
            await RawSmtp.open(port)


async def test_shutdown_lets_the_message_in_flight_finish(tmp_path: Path) -> None:
    from aiohttp import web

    received: list[bytes] = []

    async def slow_target(request: web.Request) -> web.Response:
        received.append(await request.read())
        await asyncio.sleep(1.0)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{tail:.*}", slow_target)
    runner = web.AppRunner(app)
    await runner.setup()
    target_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", target_port).start()
    port = free_port()
    routes = """
  - name: direct-to-slow-service
    from: mail-in
    mode: direct
    to: [{connector: slow}]
"""
    yaml = gateway_yaml(tmp_path, port, routes=routes).replace(
        "connectors:\n", f"connectors:\n  slow: {{type: rest, base_url: \"http://127.0.0.1:{target_port}\"}}\n")
    try:
        async with running_gateway(tmp_path, yaml) as rt:
            busy = await RawSmtp.open(port)
            await busy.envelope()
            await busy.send(b"Subject: in flight\r\n\r\nhi\r\n.\r\n")
            await wait_for(lambda: received, what="the target to have the message")
            idle = await RawSmtp.open(port)
            assert (await idle.cmd("EHLO client.test")).startswith("250")
            stopping = asyncio.create_task(rt.stop())
            assert (await idle.reply()).startswith("421 4.3.2")  # idle sessions hear it at once
            assert (await busy.reply()).startswith("250 2.0.0")  # the busy one gets its answer first
            assert (await busy.reply()).startswith("421 4.3.2")
            await stopping
    finally:
        await runner.cleanup()
    assert len(received) == 1


async def test_a_full_spool_answers_452_at_mail_before_any_data(tmp_path: Path) -> None:
    """Postfix's behaviour: refuse at MAIL when the message could not be stored."""
    port = free_port()
    cfg = f"""
connectors:
  mail-in: {{type: smtp, listen: "127.0.0.1:{port}", recipients: ["example.com"]}}
  box: {{type: maildir, path: "{tmp_path / 'Maildir'}"}}
routes:
  - {{name: mail, from: mail-in, to: [{{connector: box}}]}}
"""
    async with running_gateway(tmp_path, cfg) as rt:
        rt.spool.min_free_bytes = 1 << 62  # the disk now counts as full
        rt.spool._free_checked_at = 0  # type: ignore[attr-defined]

        def talk() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.ehlo("client.test")
                return s.mail("a@client.test")

        code, text = await asyncio.get_running_loop().run_in_executor(None, talk)
    assert (code, text) == (452, b"4.3.1 Insufficient system storage")
    assert not list((tmp_path / "Maildir").rglob("new/*"))
