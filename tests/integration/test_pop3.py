"""The POP3 connector against a real Dovecot: UIDL tracking, deletes only after the outcome,
leave-on-server, bounded first start, crashes — alone and through a real gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

import tests.contract
from connectors.pop3 import Pop3Connector
from gateway.contract import Outcome, Status
from tests.contract import make_connector
from tests.gwtest import free_port, running_gateway, wait_for, write_config
from tests.integration.test_imap import (
    APPENDED_TRACE,
    CALLER_TRACE_ID,
    KIND_REFS,
    HoldingProxy,
    Recorder,
    listening,
    mail,
    mda,
    registry,
    secret_file,
)
from tests.mailauth_support import dkim_txt, pem, rsa_key, stub_dns
from tests.peers.dovecot import Dovecot, Mailbox, dovecot
from tests.peers.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration
__all__ = ["dovecot"]


@pytest.fixture(autouse=True)
def _our_kinds_in_the_contract_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tests.contract, "Registry", registry)


def pop3_raw(box: Mailbox, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": box.server.pop3s_port, "ca_file": str(box.server.ca_file),
            "username": box.user, "password": {"file": secret_file(tmp_path, box.password)},
            "address": "invoices@example.test", "poll_interval": 0.3, "connect_timeout": 5, **extra}


def pop3(box: Mailbox, tmp_path: Path, **extra: Any) -> Pop3Connector:
    c = make_connector("pop3", pop3_raw(box, tmp_path, **extra), tmp_path / "connector", name="pop")
    assert isinstance(c, Pop3Connector)
    return c


async def test_mail_relayed_by_the_gateway_and_appended_reaches_the_file_sink(
        tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    out = tmp_path / "mail.jsonl"
    api = free_port()
    with mda(box) as smtp_port:
        yaml = f"""
connectors:
  inbox: {{type: pop3, host: 127.0.0.1, port: {dovecot.pop3s_port}, ca_file: "{dovecot.ca_file}",
           username: {box.user}, password: {{file: "{secret_file(tmp_path, box.password)}"}},
           address: invoices@example.test, poll_interval: 0.5}}
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  relay: {{type: smtp, url: "smtp://127.0.0.1:{smtp_port}", starttls: "off", sender: gw@example.test}}
  sink: {{type: file, path: "{out}"}}
routes:
  - name: api-to-mail
    from: api
    to: [{{connector: relay, to: [invoices@example.test], subject: "Invoice {{{{ data.n }}}}", text: "due"}}]
  - name: mail-to-file
    from: inbox
    match: {{subject: "invoices@example.test"}}
    to: [{{connector: sink}}]
"""
        async with running_gateway(tmp_path, yaml, registry=registry()):
            await asyncio.to_thread(box.append, mail("appended", "by a client", f"Traceparent: {APPENDED_TRACE}\r\n"))
            async with httpx.AsyncClient() as http:
                r = await http.post(f"http://127.0.0.1:{api}/x", json={"n": 42},
                                    headers={"traceparent": f"00-{CALLER_TRACE_ID}-b7ad6b7169203331-01"})
                assert r.status_code == 202
            await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, timeout=15,
                           what="both messages in the file sink")
            await wait_for(lambda: box.count() == 0, what="both deleted from the server")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(rec["attributes"]["email"]["subject"] for rec in lines) == ["Invoice 42", "appended"]
    for rec in lines:
        assert rec["protocol"] == "pop3" and rec["subject"] == "invoices@example.test"
        assert rec["content_type"] == "message/rfc822" and rec["attributes"]["pop3.uidl"]
    # the trace context: a fetched message's Traceparent, and the caller's trace id carried
    # REST → SMTP → MTA → Dovecot → POP3
    by_subject = {rec["attributes"]["email"]["subject"]: rec for rec in lines}
    # the file sink writes what the attempt sent: the same trace, the attempt's own span
    appended = by_subject["appended"]["attributes"]["traceparent"].split("-")
    assert appended[1] == APPENDED_TRACE.split("-")[1] and appended[2] != APPENDED_TRACE.split("-")[2]
    assert by_subject["Invoice 42"]["attributes"]["traceparent"].split("-")[1] == CALLER_TRACE_ID


@pytest.mark.parametrize(("pattern", "to_server"), [(b"exactly once", False), (b"DELE ", True)],
                         ids=["during-retr", "before-dele"])
async def test_a_gateway_killed_between_fetch_and_delete_delivers_exactly_once_after_restart(
        tmp_path: Path, dovecot: Dovecot, pattern: bytes, to_server: bool) -> None:
    box = dovecot.add_user()
    out = tmp_path / "mail.jsonl"
    admin = free_port()
    async with HoldingProxy(dovecot.pop3_port, pattern, to_server=to_server) as proxy:
        yaml = f"""
connectors:
  inbox: {{type: pop3, host: 127.0.0.1, port: {proxy.port}, tls: none, username: {box.user},
           password: {{file: "{secret_file(tmp_path, box.password)}"}}, poll_interval: 0.5}}
  sink: {{type: file, path: "{out}"}}
routes:
  - {{name: mail-to-file, from: inbox, to: [{{connector: sink}}]}}
"""
        gw = GatewayProcess(write_config(tmp_path, yaml, admin_port=admin), admin, KIND_REFS, tmp_path / "gw.log")
        try:
            await asyncio.to_thread(gw.start)  # ready = the first poll recorded what is there (nothing)
            await asyncio.to_thread(box.append, mail("the one", "exactly once"))
            await asyncio.wait_for(proxy.held.wait(), timeout=15)
            await asyncio.sleep(0.3)
            gw.kill()
            assert await asyncio.to_thread(box.count) == 1
            proxy.armed = False
            await asyncio.to_thread(gw.start)
            await wait_for(lambda: box.count() == 0, timeout=15, what="the delete after restart")
            # a job spooled before the kill is delivered by the restarted gateway's spool worker
            await wait_for(lambda: out.exists() and out.read_text().strip() != "", timeout=15,
                           what="the message in the file sink")
            await asyncio.sleep(1.0)  # room for a duplicate to show up
        finally:
            gw.kill()
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    assert [rec["attributes"]["email"]["subject"] for rec in lines] == ["the one"]


async def test_leave_on_server_tracks_uidls_across_restarts(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    first = Recorder()
    async with listening(pop3(box, tmp_path, leave_on_server=True), first):
        await asyncio.to_thread(box.append, mail("one"))
        await wait_for(lambda: len(first.seen) == 1, what="the first message")
    await asyncio.to_thread(box.append, mail("two (while stopped)"))
    second = Recorder()
    async with listening(pop3(box, tmp_path, leave_on_server=True), second):
        await wait_for(lambda: len(second.seen) == 1, what="the message that came while stopped")
        await asyncio.sleep(1)  # several polls: nothing is offered again
    assert first.subjects() == ["one"] and second.subjects() == ["two (while stopped)"]
    assert await asyncio.to_thread(box.count) == 2  # both still on the server


async def test_a_first_start_never_downloads_the_old_mail_except_the_backfill(
        tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    for i in range(30):
        box.deliver_file(mail(f"old {i:02}"))
        await asyncio.sleep(0.002)  # distinct Maildir order
    rec = Recorder()
    async with listening(pop3(box, tmp_path, backfill=2), rec):
        await wait_for(lambda: len(rec.seen) == 2, what="the backfill")
        await asyncio.to_thread(box.append, mail("new"))
        await wait_for(lambda: len(rec.seen) == 3, what="the new message")
        await asyncio.sleep(0.5)
    assert rec.subjects() == ["old 28", "old 29", "new"]
    assert await asyncio.to_thread(box.count) == 28  # the old ones stay untouched


async def test_outcomes_on_the_wire(tmp_path: Path, dovecot: Dovecot, caplog: pytest.LogCaptureFixture) -> None:
    """Retry: kept and offered again; rejected and too large: left on the server, never offered
    again; a line longer than poplib's own limit is no problem."""
    box = dovecot.add_user()
    rec = Recorder(Outcome(Status.RETRY, retry_after=1, reason="busy"),
                   Status.ACCEPTED, Outcome(Status.REJECTED, reason="no route", code=404))
    async with listening(pop3(box, tmp_path, max_size=50_000), rec):
        with caplog.at_level(logging.WARNING):
            await asyncio.to_thread(box.append, mail("retried", "x" * 5000))  # one 5000-character line
            await wait_for(lambda: len(rec.seen) == 1, what="the first offer")
            assert await asyncio.to_thread(box.count) == 1
            await asyncio.to_thread(box.append, mail("refused"))
            await asyncio.to_thread(box.append, mail("huge", "A" * 60_000))
            await wait_for(lambda: len(rec.seen) == 3, timeout=10, what="the retry and the refused one")
            await asyncio.sleep(1)
    assert rec.subjects() == ["retried", "retried", "refused"]
    assert rec.seen[0].body.count(b"x" * 5000) == 1
    assert await asyncio.to_thread(box.count) == 2  # refused + huge stay; retried is gone
    events = {r.getMessage() for r in caplog.records}
    assert {"pop3.rejected", "pop3.too_large"} <= events


async def test_auth_check_tags_what_it_takes(tmp_path: Path, dovecot: Dovecot) -> None:
    """DKIM and DMARC on fetched mail (no client IP: SPF is none); a signature broken on the way
    is a DMARC fail, tagged and handed on like the rest."""
    box = dovecot.add_user()
    key = rsa_key()
    signed = mail("signed", "pay invoice 42")
    signed = dkim.sign(signed, b"sel", b"example.test", pem(key, "pkcs1").encode()) + signed
    rec = Recorder()
    with stub_dns() as dns:
        dns.txt("sel._domainkey.example.test", dkim_txt(key))
        dns.txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
        check = {"policy": "tag", "resolver": dns.address, "timeout": "0.5s", "authserv_id": "gw.example.test"}
        async with listening(pop3(box, tmp_path, auth_check=check), rec):
            await asyncio.to_thread(box.append, signed)
            await asyncio.to_thread(box.append, signed.replace(b"invoice 42", b"invoice 43"))
            await wait_for(lambda: len(rec.seen) == 2, what="both messages")
    good, bad = rec.seen
    assert good.attributes["auth"]["dkim"] == "pass" and good.attributes["auth"]["dmarc"] == "pass"
    assert good.attributes["auth"]["spf"] == "none"
    assert good.body.startswith(b"Authentication-Results: gw.example.test;\r\n\tspf=none")
    assert good.body.endswith(signed)
    assert (bad.attributes["auth"]["dkim"], bad.attributes["auth"]["dmarc"]) == ("fail", "fail")
    assert bad.attributes["auth"]["dmarc_disposition"] == "quarantine"
    assert await asyncio.to_thread(box.count) == 0  # both taken


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-ca", "stls-ok"])
async def test_tls_and_login(tmp_path: Path, dovecot: Dovecot, case: str) -> None:
    box = dovecot.add_user()
    extra: dict[str, Any] = {}
    if case == "wrong-password":
        extra["password"] = {"file": secret_file(tmp_path, "wrong")}
    elif case == "untrusted-ca":
        extra["ca_file"] = None
    else:
        extra.update(port=dovecot.pop3_port, tls="starttls")
    rec = Recorder()
    c = pop3(box, tmp_path, **extra)
    async with listening(c, rec, wait_up=case == "stls-ok"):
        if case == "stls-ok":
            await asyncio.to_thread(box.append, mail("over STLS"))
            await wait_for(lambda: len(rec.seen) == 1, what="the message")
            assert c.health().up
            return
        await wait_for(lambda: not c.health().up and "not polled" not in c.health().detail,
                       what="the failure in health")
        detail = c.health().detail
        expected = "Authentication failed" if case == "wrong-password" else "certificate verify failed"
        assert expected in detail, detail
        assert box.password not in detail and not rec.seen


async def test_a_server_restart_is_reported_and_polling_resumes(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    rec = Recorder()
    c = pop3(box, tmp_path)
    async with listening(c, rec):
        dovecot.kill()
        try:
            await wait_for(lambda: not c.health().up, what="the failed poll in health")
            assert "Connection refused" in c.health().detail
        finally:
            dovecot.launch()
        await asyncio.to_thread(box.append, mail("after the restart"))
        await wait_for(lambda: len(rec.seen) == 1, timeout=15, what="mail after the restart")
        await wait_for(lambda: c.health().up, what="healthy again")


async def test_a_password_file_corrected_while_polling_is_used_at_the_next_poll(
        tmp_path: Path, dovecot: Dovecot) -> None:
    """The password file is read at every login: a wrong one is refused, and once the file is
    corrected the next poll logs in and takes the mail — no reload, no restart."""
    box = dovecot.add_user()
    secret = Path(secret_file(tmp_path, "wrong-password"))
    rec = Recorder()
    c = pop3(box, tmp_path, password={"file": str(secret)})
    async with listening(c, rec, wait_up=False):
        await wait_for(lambda: "Authentication failed" in c.health().detail, what="the wrong password refused")
        secret.write_text(box.password + "\n")
        await wait_for(lambda: c.health().up, timeout=15, what="a poll logged in with the corrected password")
        await asyncio.to_thread(box.append, mail("after the correction"))  # new mail: the first start is done
        await wait_for(lambda: len(rec.seen) == 1, what="the mail")
