"""The IMAP connector against a real Dovecot: inbound folders (IDLE, checkpoints, outcomes on
the wire, crashes) and APPEND outbound, alone and through a real gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller

import tests.contract
from connectors.imap import ImapConnector
from connectors.pop3 import Pop3Connector
from connectors.xmpp import XmppConnector
from gateway.contract import Connector, Outcome, PermanentError, Status, Target, TransientError
from gateway.envelope import Envelope
from gateway.registry import Registry
from tests.contract import OutboundContract, make_connector
from tests.gwtest import free_port, running_gateway, wait_for, write_config
from tests.mailauth_support import dkim_txt, pem, rsa_key, stub_dns
from tests.peers.dovecot import Dovecot, Mailbox, dovecot
from tests.peers.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration
__all__ = ["dovecot"]  # the session fixture, imported so pytest finds it

KINDS: dict[str, type[Connector]] = {"imap": ImapConnector, "pop3": Pop3Connector, "xmpp": XmppConnector}
KIND_REFS = {"imap": "connectors.imap:ImapConnector", "pop3": "connectors.pop3:Pop3Connector"}


def registry() -> Registry:
    return Registry(dict(KINDS))


@pytest.fixture(autouse=True)
def _our_kinds_in_the_contract_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    # Until pyproject.toml registers the imap/pop3 entry points, the shared suite needs them.
    monkeypatch.setattr(tests.contract, "Registry", registry)


APPENDED_TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
CALLER_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def mail(subject: str, body: str = "hello", extra: str = "") -> bytes:
    return (f"From: Sensor <sensor@example.test>\r\nTo: alerts@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n{extra}\r\n{body}\r\n").encode()


BROKEN_MIME = (b"From: x@example.test\r\nSubject: broken\r\nMIME-Version: 1.0\r\n"
               b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n"
               b"the text part\r\n--b1\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n")  # no closing boundary


def secret_file(tmp_path: Path, value: str) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"secret-{uuid.uuid4().hex[:6]}"
    path.write_text(value)
    return str(path)


def imap_raw(box: Mailbox, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": box.server.imaps_port, "ca_file": str(box.server.ca_file),
            "username": box.user, "password": {"file": secret_file(tmp_path, box.password)},
            "address": "alerts@example.test", "poll_interval": 1, "connect_timeout": 5, "command_timeout": 10,
            **extra}


def imap(box: Mailbox, tmp_path: Path, **extra: Any) -> ImapConnector:
    c = make_connector("imap", imap_raw(box, tmp_path, **extra), tmp_path, name="mbox")
    assert isinstance(c, ImapConnector)
    return c


class Recorder:
    """A Deliver that answers from a script (then ACCEPTED) and records every envelope."""

    def __init__(self, *script: Outcome | Status) -> None:
        self.seen: list[Envelope] = []
        self.script = list(script)

    async def __call__(self, env: Envelope) -> Outcome:
        self.seen.append(env)
        step = self.script.pop(0) if self.script else Status.ACCEPTED
        if isinstance(step, Outcome):
            return Outcome(step.status, env.id, reason=step.reason, retry_after=step.retry_after, code=step.code)
        return Outcome(step, env.id, reason="test")

    def subjects(self) -> list[str]:
        return [e.headers.get("subject", "") for e in self.seen]


@asynccontextmanager
async def listening(c: Connector, deliver: Any, *, wait_up: bool = True) -> AsyncIterator[Connector]:
    """Open and listen; with ``wait_up``, return once the first start is settled (so mail
    added from now on is new mail)."""
    await c.open()
    await c.listen(deliver)
    try:
        if wait_up:
            await wait_for(lambda: c.health().up, what=f"{c.name} up")
        yield c
    finally:
        await c.stop_listening(2)
        await c.close()


# --- a local delivery agent and a fault-injecting proxy ----------------------------------------


class _Mda:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.box.deliver_file(envelope.original_content)
        return "250 2.0.0 delivered to the Maildir"


@contextmanager
def mda(box: Mailbox) -> Iterator[int]:
    """An SMTP server that delivers into the box's Maildir, as Postfix + a local MDA would."""
    port = free_port()
    controller = Controller(_Mda(box), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


class HoldingProxy:
    """A TCP proxy that stops forwarding one direction for good once it sees ``pattern`` there
    (client→server with ``to_server=True``), simulating a gateway that dies at that moment."""

    def __init__(self, upstream: int, pattern: bytes, *, to_server: bool) -> None:
        self.upstream = upstream
        self.pattern = pattern
        self.to_server = to_server
        self.armed = True
        self.held = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer, self.to_server)),
                 asyncio.ensure_future(self._pump(up_reader, writer, not self.to_server))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for p in pumps:
            p.cancel()
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, watch: bool) -> None:
        tail = b""
        while data := await src.read(65536):
            if watch and self.armed and self.pattern in tail + data:
                self.held.set()
                while await src.read(65536):  # swallow everything from now on
                    pass
                return
            tail = data[-len(self.pattern):]
            dst.write(data)
            await dst.drain()


# --- the outbound contract (APPEND) ----------------------------------------------------------


class TestImapAppendContract(OutboundContract):
    kind = "imap"

    @pytest.fixture(autouse=True)
    def _box(self, dovecot: Dovecot) -> None:
        self.box = dovecot.add_user()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return imap_raw(self.box, tmp_path)

    def options(self) -> dict[str, Any]:
        return {"folder": "Archive", "subject": "contract"}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {**self.config(tmp_path), "port": free_port(), "connect_timeout": 1}

    async def received(self, tmp_path: Path) -> list[bytes]:
        def read() -> list[bytes]:
            with self.box.imap() as c:
                if c.select("Archive")[0] != "OK":
                    return []
                _, data = c.fetch("1:*", "(BODY.PEEK[])")
                return [item[1] for item in data if isinstance(item, tuple)]

        return await asyncio.to_thread(read)


async def test_append_builds_or_forwards_and_refuses_injection(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    c = imap(box, tmp_path)
    await c.open()
    try:
        def target(**opts: Any) -> Target:
            return Target(route="archive", connector="mbox", options=ImapConnector.Options.model_validate(opts))

        alert = Envelope(source="api", protocol="rest", subject="/alerts/7", body=b'{"t": 97}',
                         content_type="application/json")
        await c.send(alert, target(folder="Boiler Alerts", flags=["\\Seen", "$archived"], subject="boiler hot",
                                   text="97 °C", mail_headers={"X-Site": "north"}))
        original = mail("forward me")
        await c.send(Envelope(source="mbox", protocol="imap", subject="a@x", body=original,
                              content_type="message/rfc822"), target(folder="Copies"))
        with pytest.raises(PermanentError, match="header injection"):
            await c.send(alert, target(folder="Alerts", subject="x\r\nBcc: evil@example.test"))
        with pytest.raises(PermanentError):
            await c.send(alert, target(folder='Bad"Folder'))
        with box.imap() as m:
            m.select('"Boiler Alerts"')
            _, data = m.fetch("1", "(FLAGS BODY.PEEK[])")
            head, raw = data[0]
            assert b"\\Seen" in head and b"$archived" in head
            assert b"Subject: boiler hot" in raw and b"X-Site: north" in raw and b"97 \xc2\xb0C" in raw
            assert f"X-Gateway-Envelope-Id: {alert.id}".encode() in raw
            m.select("Copies")
            _, data = m.fetch("1", "(BODY.PEEK[])")
            assert data[0][1] == original  # forwarded byte for byte
            assert m.select("Alerts")[0] == "NO"  # the refused message created nothing
    finally:
        await c.close()


# --- inbound ---------------------------------------------------------------------------------


async def test_mail_appended_and_mail_sent_by_the_gateway_arrive_as_envelopes(
        tmp_path: Path, dovecot: Dovecot) -> None:
    """Two ways in: a client APPENDs over IMAP; the gateway's own SMTP outbound sends to an MTA
    that delivers into the Maildir. Both reach the file sink through the IMAP inbound."""
    box = dovecot.add_user()
    out = tmp_path / "mail.jsonl"
    api = free_port()
    with mda(box) as smtp_port:
        yaml = f"""
connectors:
  mbox: {{type: imap, host: 127.0.0.1, port: {dovecot.imaps_port}, ca_file: "{dovecot.ca_file}",
          username: {box.user}, password: {{file: "{secret_file(tmp_path, box.password)}"}},
          address: alerts@example.test}}
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  relay: {{type: smtp, url: "smtp://127.0.0.1:{smtp_port}", starttls: "off", sender: gw@example.test}}
  sink: {{type: file, path: "{out}"}}
routes:
  - name: api-to-mail
    from: api
    to:
      - connector: relay
        to: [alerts@example.test]
        subject: "Boiler {{{{ data.site }}}}"
        text: "temperature {{{{ data.t }}}}"
  - name: mail-to-file
    from: mbox
    match: {{subject: "alerts@example.test"}}
    to: [{{connector: sink}}]
"""
        async with running_gateway(tmp_path, yaml, registry=registry()):
            await asyncio.to_thread(box.append, mail("appended over IMAP", "first",
                                                     f"Traceparent: {APPENDED_TRACE}\r\n"))
            async with httpx.AsyncClient() as http:
                r = await http.post(f"http://127.0.0.1:{api}/alerts", json={"site": "north", "t": 97},
                                    headers={"traceparent": f"00-{CALLER_TRACE_ID}-b7ad6b7169203331-01"})
                assert r.status_code == 202
            await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 2, timeout=15,
                           what="both messages in the file sink")
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_subject = {rec["attributes"]["email"]["subject"]: rec for rec in lines}
    assert set(by_subject) == {"appended over IMAP", "Boiler north"}
    relayed = by_subject["Boiler north"]
    assert relayed["protocol"] == "imap" and relayed["subject"] == "alerts@example.test"
    assert relayed["content_type"] == "message/rfc822"
    assert relayed["attributes"]["email"]["text"].strip() == "temperature 97"
    assert relayed["attributes"]["mail_from"] == "gw@example.test"
    assert relayed["headers"]["subject"] == "Boiler north"
    assert relayed["attributes"]["imap.folder"] == "INBOX"
    assert by_subject["appended over IMAP"]["body"].endswith("first\r\n")
    # the trace context: the Traceparent header of a fetched message, and the caller's trace id
    # carried REST → SMTP (the mail's Traceparent) → MTA → Dovecot → IMAP
    # the file sink writes what the attempt sent: the same trace, the attempt's own span
    appended = by_subject["appended over IMAP"]["attributes"]["traceparent"].split("-")
    assert appended[1] == APPENDED_TRACE.split("-")[1] and appended[2] != APPENDED_TRACE.split("-")[2]
    assert relayed["attributes"]["traceparent"].split("-")[1] == CALLER_TRACE_ID
    flags = await asyncio.to_thread(box.flags)
    assert all("\\Seen" in f for f in flags.values())  # marked only after the outcome


async def test_append_signs_with_dkim_and_the_watcher_checks_what_it_fetches(
        tmp_path: Path, dovecot: Dovecot) -> None:
    """One imap connector both ways: alerts are APPENDed DKIM-signed into the folder it watches
    with ``auth_check``; a client APPENDs a spoof. The signed one routes as DMARC pass, the spoof
    as fail: fetched mail is tagged, never refused, even under ``policy: reject``."""
    box = dovecot.add_user()
    key = rsa_key()
    files = {name: tmp_path / f"{name}.jsonl" for name in ("authentic", "suspect")}
    api = free_port()
    with stub_dns() as dns:
        dns.txt("gw._domainkey.example.test", dkim_txt(key))
        dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        mbox = {"type": "imap", **imap_raw(box, tmp_path), "sender": "Gateway <gw@example.test>",
                "dkim": {"domain": "example.test", "selector": "gw",
                         "key": {"file": secret_file(tmp_path, pem(key))}},
                "auth_check": {"policy": "reject", "resolver": dns.address, "timeout": "0.5s",
                               "authserv_id": "gw.example.test"}}
        yaml = f"""
connectors:
  mbox: {json.dumps(mbox)}
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  authentic: {{type: file, path: "{files['authentic']}", fsync: false}}
  suspect: {{type: file, path: "{files['suspect']}", fsync: false}}
routes:
  - {{name: alerts-to-mailbox, from: api, to: [{{connector: mbox, subject: "Boiler {{{{ data.site }}}}"}}]}}
  - {{name: authentic, from: mbox, match: {{when: "auth.dmarc == 'pass'"}}, to: [{{connector: authentic}}]}}
  - {{name: suspect, from: mbox, match: {{when: "auth.dmarc == 'fail'"}}, to: [{{connector: suspect}}]}}
"""
        async with running_gateway(tmp_path, yaml, registry=registry()):
            async with httpx.AsyncClient() as http:
                r = await http.post(f"http://127.0.0.1:{api}/alerts", json={"site": "north"})
                assert r.status_code == 202
            await asyncio.to_thread(box.append, mail("pay now", extra="Return-Path: <sensor@example.test>\r\n"))
            await wait_for(lambda: all(f.exists() and f.read_text().strip() for f in files.values()), timeout=15,
                           what="one message in each file")
    authentic, suspect = (json.loads(files[name].read_text()) for name in ("authentic", "suspect"))
    assert authentic["attributes"]["email"]["subject"] == "Boiler north"
    auth = authentic["attributes"]["auth"]
    assert (auth["spf"], auth["dkim"], auth["dmarc"], auth["dkim_domains"]) == ("none", "pass", "pass",
                                                                                ["example.test"])
    assert authentic["body"].startswith("Authentication-Results: gw.example.test;\r\n\tspf=none")
    assert "\r\nDKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test;" in authentic["body"]
    assert suspect["attributes"]["email"]["subject"] == "pay now"
    assert suspect["attributes"]["auth"]["dmarc"] == "fail"
    assert "smtp.mailfrom=sensor@example.test" in suspect["body"]
    flags = await asyncio.to_thread(box.flags)
    assert len(flags) == 2 and all("\\Seen" in f for f in flags.values())


@pytest.mark.parametrize(("pattern", "to_server", "when"), [
    (b"BODY[] {", False, "while the message was being fetched"),
    (b"UID STORE", True, "after the message was spooled, before \\Seen reached the server"),
], ids=["during-fetch", "before-seen"])
async def test_a_gateway_killed_between_fetch_and_ack_delivers_exactly_once_after_restart(
        tmp_path: Path, dovecot: Dovecot, pattern: bytes, to_server: bool, when: str) -> None:
    """SIGKILL of a gateway process (the connector talks plain IMAP through a proxy that stops
    forwarding at the given moment), then a restart: the file sink has the message once."""
    box = dovecot.add_user()
    await asyncio.to_thread(box.append, mail("already there"))
    out = tmp_path / "mail.jsonl"
    admin = free_port()
    async with HoldingProxy(dovecot.imap_port, pattern, to_server=to_server) as proxy:
        yaml = f"""
connectors:
  mbox: {{type: imap, host: 127.0.0.1, port: {proxy.port}, tls: none, username: {box.user},
          password: {{file: "{secret_file(tmp_path, box.password)}"}}, address: alerts@example.test,
          poll_interval: 1}}
  sink: {{type: file, path: "{out}"}}
routes:
  - {{name: mail-to-file, from: mbox, to: [{{connector: sink}}]}}
"""
        gw = GatewayProcess(write_config(tmp_path, yaml, admin_port=admin), admin, KIND_REFS, tmp_path / "gw.log")
        try:
            await asyncio.to_thread(gw.start)
            await asyncio.sleep(0.5)  # first start: checkpoint at "already there"
            await asyncio.to_thread(box.append, mail("the one", "exactly once"))
            await asyncio.wait_for(proxy.held.wait(), timeout=15)
            await asyncio.sleep(0.3)
            gw.kill()
            assert "\\Seen" not in (await asyncio.to_thread(box.flags))[2]
            proxy.armed = False
            await asyncio.to_thread(gw.start)
            await wait_for(lambda: "\\Seen" in box.flags().get(2, ""), timeout=15, what="\\Seen after restart")
            # a job spooled before the kill is delivered by the restarted gateway's spool worker
            await wait_for(lambda: out.exists() and out.read_text().strip() != "", timeout=15,
                           what="the message in the file sink")
            await asyncio.sleep(1.0)  # room for a duplicate to show up
        finally:
            gw.kill()
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    assert [rec["attributes"]["email"]["subject"] for rec in lines] == ["the one"], when
    if to_server:  # the second fetch was answered from the idempotency record, not delivered again
        assert gw.events("envelope.duplicate"), gw.log_tail()


async def test_retry_leaves_the_message_untouched_and_nothing_overtakes_it(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    rec = Recorder(Outcome(Status.RETRY, retry_after=1, reason="spool full"))
    async with listening(imap(box, tmp_path), rec):
        await asyncio.to_thread(box.append, mail("first"))
        await asyncio.to_thread(box.append, mail("second"))
        await wait_for(lambda: len(rec.seen) == 1, what="the first offer")
        await asyncio.sleep(0.3)
        assert all("\\Seen" not in f for f in (await asyncio.to_thread(box.flags)).values())
        await wait_for(lambda: len(rec.seen) == 3, timeout=10, what="the retry and the second message")
    assert rec.subjects() == ["first", "first", "second"]
    assert all("\\Seen" in f for f in (await asyncio.to_thread(box.flags)).values())


async def test_rejected_oversized_and_broken_mail(tmp_path: Path, dovecot: Dovecot,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    box = dovecot.add_user()
    rec = Recorder(Outcome(Status.REJECTED, reason="no route", code=404))
    huge = mail("huge attachment", "A" * 300_000)
    async with listening(imap(box, tmp_path, error_folder="Errors", max_size=100_000), rec):
        with caplog.at_level(logging.WARNING):
            for raw in (mail("refused"), huge, BROKEN_MIME):
                await asyncio.to_thread(box.append, raw)
            await wait_for(lambda: len(rec.seen) == 2, what="two offers")
            await wait_for(lambda: box.count("Errors") == 2, what="two messages in Errors")
    assert rec.subjects() == ["refused", "broken"]  # the huge one was never downloaded
    broken = rec.seen[1]
    assert broken.body == BROKEN_MIME  # the raw bytes are the truth
    assert broken.attributes["email"]["text"].strip() == "the text part"
    assert broken.attributes["email"]["defects"]
    events = {r.getMessage() for r in caplog.records}
    assert {"imap.rejected", "imap.too_large"} <= events
    assert await asyncio.to_thread(box.count) == 1  # only the accepted broken one stays, \Seen
    assert "\\Seen" in next(iter((await asyncio.to_thread(box.flags)).values()))
    assert all("\\Seen" not in f for f in (await asyncio.to_thread(box.flags, "Errors")).values())


async def test_first_start_takes_only_new_mail_unless_told_to_backfill(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    for i in range(4):
        await asyncio.to_thread(box.append, mail(f"old {i}"))
    fresh = Recorder()
    async with listening(imap(box, tmp_path / "a", search={"unseen": False}), fresh):
        await asyncio.to_thread(box.append, mail("new"))
        await wait_for(lambda: len(fresh.seen) == 1, what="the new message")
    backfill = Recorder()
    async with listening(imap(box, tmp_path / "b", search={"unseen": False}, backfill=2), backfill):
        await wait_for(lambda: len(backfill.seen) == 2, what="the backfill")
        await asyncio.sleep(0.5)
    assert fresh.subjects() == ["new"]
    assert backfill.subjects() == ["old 3", "new"]


async def test_a_restart_neither_redelivers_nor_skips(tmp_path: Path, dovecot: Dovecot) -> None:
    """search.unseen is off, so only the checkpoint keeps handled mail from coming again."""
    box = dovecot.add_user()
    first = Recorder()
    async with listening(imap(box, tmp_path, search={"unseen": False}), first):
        await asyncio.to_thread(box.append, mail("one"))
        await asyncio.to_thread(box.append, mail("two"))
        await wait_for(lambda: len(first.seen) == 2, what="two messages")
    await asyncio.to_thread(box.append, mail("three (while stopped)"))
    second = Recorder()
    async with listening(imap(box, tmp_path, search={"unseen": False}), second):
        await wait_for(lambda: len(second.seen) == 1, what="the message that came while stopped")
        await asyncio.sleep(0.5)
    assert first.subjects() == ["one", "two"]
    assert second.subjects() == ["three (while stopped)"]


async def test_a_uidvalidity_change_rescans_without_taking_handled_mail_again(
        tmp_path: Path, dovecot: Dovecot, caplog: pytest.LogCaptureFixture) -> None:
    box = dovecot.add_user()
    first = Recorder()
    async with listening(imap(box, tmp_path), first):
        await asyncio.to_thread(box.append, mail("handled"))
        await wait_for(lambda: len(first.seen) == 1, what="the first message")
        await asyncio.sleep(0.3)
    old_validity = first.seen[0].attributes["imap.uidvalidity"]
    # Renumber the folder as a server restore would: new UIDVALIDITY, flags kept in the file names.
    uidlist = box.maildir / "dovecot-uidlist"
    header, _, rest = uidlist.read_text().partition("\n")
    uidlist.write_text(header.replace(f"V{old_validity}", f"V{old_validity + 1000}") + "\n" + rest)
    for index in box.maildir.glob("dovecot.index*"):
        index.unlink()
    await asyncio.to_thread(box.append, mail("new after the change"))
    second = Recorder()
    with caplog.at_level(logging.WARNING):
        async with listening(imap(box, tmp_path), second):
            await wait_for(lambda: len(second.seen) == 1, what="the unseen message")
            await asyncio.sleep(0.5)
    assert second.subjects() == ["new after the change"]
    assert second.seen[0].attributes["imap.uidvalidity"] == old_validity + 1000
    assert any(r.getMessage() == "imap.uidvalidity_changed" for r in caplog.records)


async def test_reconnects_after_the_server_restarts(tmp_path: Path, dovecot: Dovecot) -> None:
    box = dovecot.add_user()
    rec = Recorder()
    c = imap(box, tmp_path)
    async with listening(c, rec):
        dovecot.kill()
        try:
            await wait_for(lambda: not c.health().up, what="the connector noticing")
        finally:
            dovecot.launch()
        await asyncio.to_thread(box.append, mail("after the restart"))
        await wait_for(lambda: len(rec.seen) == 1, timeout=15, what="mail after the restart")
        assert c.health().up


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-ca", "tls-to-a-plain-port", "starttls-ok",
                                  "plain-when-chosen"])
async def test_tls_and_login(tmp_path: Path, dovecot: Dovecot, case: str) -> None:
    box = dovecot.add_user()
    raw = imap_raw(box, tmp_path, connect_timeout=2)
    if case == "wrong-password":
        raw["password"] = {"file": secret_file(tmp_path, "wrong")}
    elif case == "untrusted-ca":
        del raw["ca_file"]
    elif case == "tls-to-a-plain-port":
        raw["port"] = dovecot.imap_port
    elif case == "starttls-ok":
        raw.update(port=dovecot.imap_port, tls="starttls")
    else:
        raw.update(port=dovecot.imap_port, tls="none")
    c = make_connector("imap", raw, tmp_path)
    try:
        if case.endswith("ok") or case == "plain-when-chosen":
            await c.open()
            assert c.health().up
            return
        with pytest.raises(TransientError) as info:
            await c.open()
        expected = {"wrong-password": "refused", "untrusted-ca": "certificate", "tls-to-a-plain-port": "TLS"}[case]
        assert expected in str(info.value) and not c.health().up
        assert box.password not in str(info.value)
    finally:
        await c.close()


async def test_a_stop_landing_after_done_does_not_send_a_second_done(tmp_path: Path, dovecot: Dovecot) -> None:
    """A stop that cancels the watcher after it sent DONE, before the server's answer to IDLE came:
    the LOGOUT that follows must not send DONE again (Dovecot answers a second one with BAD, and the
    library then aborts), and the server accepts the LOGOUT."""
    from connectors.imap.session import open_session

    box = dovecot.add_user()
    session = await open_session(imap(box, tmp_path).cfg, box.password, None)
    client = session.client
    await session.select("INBOX")
    sent: list[str] = []
    send = client.protocol.send

    def recorded(line: str, scrub: str | None = None) -> None:
        sent.append(line.split(" ", 1)[-1])  # without the tag
        send(line, scrub)

    client.protocol.send = recorded
    watcher = asyncio.create_task(session.wait_for_change(60))
    await wait_for(client.has_pending_idle, what="IDLE under way")
    await wait_for(client.protocol._idle_event.is_set, what="the server's + to IDLE")
    idle_done = client.idle_done
    loop = asyncio.get_running_loop()

    def done_then_stopped() -> None:
        idle_done()
        client.protocol.transport.pause_reading()  # the server's OK to IDLE waits in the socket
        loop.call_soon(watcher.cancel)  # ... and the stop lands while the watcher waits for it
        loop.call_later(0.3, client.protocol.transport.resume_reading)

    client.idle_done = done_then_stopped
    await asyncio.to_thread(box.append, mail("wakes the IDLE"))  # the watcher sends DONE
    with pytest.raises(asyncio.CancelledError):
        await watcher
    await asyncio.wait_for(session.logout(), 10)
    assert [line for line in sent if line.startswith("DONE")] == ["DONE"]
    assert client.protocol.state == "LOGOUT", sent  # the server answered LOGOUT with OK


async def test_xoauth2_login_with_a_bearer_token_a_revoked_one_and_a_renewed_one(
        tmp_path: Path, dovecot: Dovecot) -> None:
    """XOAUTH2 against Dovecot's oauth2 passdb, which asks a token introspection endpoint: a valid
    token logs in and mail arrives; once the token is revoked, a new login is refused as a login
    failure (not a hang in the SASL exchange), the connector reports itself down, and the error
    does not carry the token; a token renewed in the file is used from the next login on."""
    box = dovecot.add_user()
    token = box.token()
    raw = imap_raw(box, tmp_path, connect_timeout=5)
    del raw["password"]
    raw["oauth2_token"] = {"file": secret_file(tmp_path, token)}
    rec = Recorder()
    asked = dovecot.issuer.asked
    async with listening(make_connector("imap", raw, tmp_path, name="mbox"), rec):
        await asyncio.to_thread(box.append, mail("by token"))
        await wait_for(lambda: rec.subjects() == ["by token"], what="mail fetched over an XOAUTH2 session")
    assert dovecot.issuer.asked > asked  # the server did ask about the token
    assert f"user=<{box.user}>, method=XOAUTH2" in dovecot.log_text()

    box.revoke(token)
    c = make_connector("imap", raw, tmp_path, name="mbox")
    try:
        with pytest.raises(TransientError) as info:
            await asyncio.wait_for(c.open(), 20)
        message = str(info.value)  # the server's refusal and its XOAUTH2 error, not a timeout
        assert "refused: [AUTHENTICATIONFAILED]" in message and '(XOAUTH2: {"status":"401"' in message, message
        assert not c.health().up and "AUTHENTICATIONFAILED" in c.health().detail
        assert token not in message and token not in c.health().detail
    finally:
        await c.close()

    # The token file is read at every login: the runtime opens a refused connector again, and the
    # same connector takes the renewed token (as a sidecar or a mounted Secret renews the file).
    c = make_connector("imap", raw, tmp_path, name="mbox")
    rec = Recorder()
    try:
        with pytest.raises(TransientError):
            await asyncio.wait_for(c.open(), 20)
        Path(raw["oauth2_token"]["file"]).write_text(box.token() + "\n")
        await asyncio.wait_for(c.open(), 20)
        await c.listen(rec)
        await wait_for(lambda: c.health().up, what="listening with the renewed token")
        await asyncio.to_thread(box.append, mail("after the renewal"))
        await wait_for(lambda: rec.subjects() == ["after the renewal"], what="mail after the renewal")
    finally:
        await c.stop_listening(2)
        await c.close()
