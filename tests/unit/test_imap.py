"""IMAP: answers as aioimaplib hands them over (captured from Dovecot 2.3), folder names, search
criteria, config rules, the mail envelope on real .eml samples, and the checkpoint store. Pure."""

from __future__ import annotations

import asyncio
import logging
from datetime import date
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.imap import ImapConnector
from connectors.imap.config import ImapConfig, ImapTarget, check_folder
from connectors.imap.mapping import mail_envelope
from connectors.imap.session import Session, parse_fetch, parse_search, parse_select, utf7
from connectors.imap.state import CheckpointStore, FolderCheckpoint
from gateway.config.loader import load_config
from gateway.config.yamlsrc import FromEnv
from gateway.contract import ConnectorContext
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.registry import Registry
from gateway.routing.router import Planned
from tests.stubborn import ignoring_cancellation

SAMPLES = Path(__file__).parent.parent / "samples" / "mail"

SELECT = [b"FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)",
          b"OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] Flags permitted.",
          b"1 EXISTS", b"0 RECENT", b"OK [UNSEEN 1] First unseen.", b"OK [UIDVALIDITY 1795852196] UIDs valid",
          b"OK [UIDNEXT 2] Predicted next UID", b"[READ-WRITE] Select completed (0.001 + 0.000 secs)."]
FETCH_BODY = [b"1 FETCH (UID 7 RFC822.SIZE 32 FLAGS () BODY[] {32}",
              bytearray(b"From: a@x\r\nSubject: hi\r\n\r\nbody\r\n"), b")",
              b"Fetch completed (0.001 + 0.000 secs)."]
FETCH_META = [b"3 FETCH (FLAGS (\\Seen))",  # unsolicited: another session changed a flag
              b"1 FETCH (UID 7 RFC822.SIZE 32 FLAGS (\\Seen $label))", b"Fetch completed (0.001 + 0.000 secs)."]


def test_select_search_and_fetch_answers() -> None:
    assert parse_select(SELECT) == (1795852196, 2)
    assert parse_search([b"3 5 4", b"Search completed (0.001 + 0.000 secs)."]) == [3, 4, 5]
    assert parse_search([b"", b"Search completed."]) == []
    got = parse_fetch(FETCH_BODY)[7]
    assert got.body == b"From: a@x\r\nSubject: hi\r\n\r\nbody\r\n" and got.size == 32 and got.flags == set()
    meta = parse_fetch(FETCH_META)
    assert list(meta) == [7] and meta[7].flags == {"\\Seen", "$label"}


def test_folder_names_are_modified_utf7_and_checked() -> None:
    assert utf7("INBOX") == "INBOX"
    assert utf7("Entwürfe") == "Entw&APw-rfe"
    assert utf7("R&D") == "R&-D"
    assert utf7("日本語") == "&ZeVnLIqe-"
    for bad in ("", 'a"b', "a\\b", "x*", "y%", "line\r\nA1 LOGOUT"):
        with pytest.raises(ValueError):
            check_folder(bad)


def cfg(**extra: Any) -> ImapConfig:
    return ImapConfig.model_validate({"type": "imap", "host": "mail.example.com", "username": "alerts",
                                      "password": FromEnv("pw"), **extra})


def test_config_rules() -> None:
    assert (cfg().effective_port, cfg(tls="starttls").effective_port, cfg(tls="none").effective_port) == (993, 143, 143)
    assert cfg(address="Alerts@Example.com").mailbox_address == "alerts@example.com"
    both = {"oauth2_token": FromEnv("t")}
    for bad, why in [(both, "exactly one"), ({"password": None}, "exactly one"),
                     ({"password": "inline"}, "never written inline"),
                     ({"after": "move"}, "needs move_to"),
                     ({"after": "move", "move_to": "INBOX"}, "must not be one of the watched"),
                     ({"error_folder": "INBOX"}, "must not be one of the watched"),
                     ({"folders": ["INBOX", "INBOX"]}, "more than once"),
                     ({"search": {"subject": 'a"b'}}, "without quotes"),
                     ({"username": "a b"}, "without spaces"), ({"tls": "maybe"}, "tls")]:
        with pytest.raises(ValidationError, match=why):
            cfg(**bad)
    xoauth = ImapConfig.model_validate({"type": "imap", "host": "h", "username": "u",
                                        "oauth2_token": FromEnv("ya29.token")})
    assert xoauth.password is None and "ya29" not in repr(xoauth)


def test_search_criteria(tmp_path: Path) -> None:
    def criteria(**search: Any) -> list[str]:
        ctx = ConnectorContext("mbox", logging.getLogger("t"), HttpHub(logging.getLogger("h")), str(tmp_path))
        return ImapConnector(cfg(search=search), ctx)._criteria(42)

    assert criteria() == ["UID 42:*", "UNSEEN"]
    assert criteria(unseen=False, since=date(2024, 5, 3), **{"from": "sensor@plant.example"}, subject="Kessel") == [
        "UID 42:*", "SINCE", "3-May-2024", "FROM", '"sensor@plant.example"', "SUBJECT", '"Kessel"']
    assert criteria(subject="über")[:3] == ["CHARSET", "UTF-8", "UID 42:*"]


def test_append_target_flags_and_folder_substitution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImapTarget.model_validate({"flags": ["\\Seen", "$archived"]}).flags == ["\\Seen", "$archived"]
    for bad in (["\\Recent"], ["two words"], ["(x)"]):
        with pytest.raises(ValidationError, match="invalid flag"):
            ImapTarget.model_validate({"flags": bad})
    monkeypatch.setenv("GW_TEST_IMAP_PW", "x")
    path = tmp_path / "routes.yaml"
    path.write_text("""
connectors:
  api: {type: rest, listen: "127.0.0.1:18081", auth: {type: none}}
  archive: {type: imap, host: mail.example.com, username: gw, password: "${GW_TEST_IMAP_PW}"}
routes:
  - {name: keep, from: api, to: [{connector: archive, folder: "Alerts-{{ data.site }}"}]}
""")
    router = load_config(str(path), Registry({"imap": ImapConnector})).router

    def plan(site: str) -> Planned | tuple[object, str]:
        env = Envelope(source="api", protocol="rest", subject="/x", body=f'{{"site": "{site}"}}'.encode(),
                       content_type="application/json")
        return router.reshape(env, router.routes[0])[0]

    ok = plan("north")
    assert isinstance(ok, Planned) and isinstance(ok.spec.options, ImapTarget)
    assert ok.spec.options.folder == "Alerts-north"
    for evil in ('x" (\\\\Deleted)', "*", "a\\\\b"):
        assert not isinstance(plan(evil), Planned)


def test_the_envelope_is_the_smtp_inbound_one_on_real_samples() -> None:
    raw = (SAMPLES / "plain.eml").read_bytes()
    env = mail_envelope(raw, source="mbox", protocol="imap", mailbox="ops@example.com",
                        idempotency_key="imap:INBOX:9:4", extra={"imap.folder": "INBOX", "imap.uid": 4})
    assert env.body == raw and env.content_type == "message/rfc822" and env.subject == "ops@example.com"
    assert env.headers["subject"] == "Kessel 7 über 90 °C"
    assert env.headers["message-id"] == "<boiler-7-0001@plant.example>"
    assert env.attributes["mail_from"] == "sensor@plant.example"  # Return-Path
    assert env.attributes["rcpt"] == "ops@example.com" and env.attributes["size"] == len(raw)
    assert env.attributes["idempotency_key"] == "imap:INBOX:9:4" and env.attributes["imap.uid"] == 4
    assert env.attributes["email"]["cc"] == ["audit@example.com"]
    attached = mail_envelope((SAMPLES / "attachments.eml").read_bytes(), source="mbox", protocol="pop3",
                             mailbox="ops@example.com", idempotency_key="pop3:x", extra={})
    assert attached.attributes["mail_from"] == "service@vendor.example"  # no Return-Path: From
    assert "readings.csv" in [a["filename"] for a in attached.attributes["email"]["attachments"]]
    broken = mail_envelope((SAMPLES / "broken-boundary.eml").read_bytes(), source="m", protocol="imap",
                           mailbox="a@b", idempotency_key="k", extra={})
    assert "CloseBoundaryNotFoundDefect" in broken.attributes["email"]["defects"]
    assert Envelope.from_json(env.to_json()).attributes["email"]["subject"] == "Kessel 7 über 90 °C"


async def test_checkpoints_survive_a_new_store(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "state"))
    assert await store.folder("INBOX") is None
    await store.set_folder("INBOX", FolderCheckpoint(17, 4))
    await store.set_folder("INBOX", FolderCheckpoint(17, 5))
    assert await store.pop3_known() is None
    await store.pop3_start(["a", "b"])
    await store.pop3_mark("c", "done")
    store.close()
    again = CheckpointStore(str(tmp_path / "state"))
    assert await again.folder("INBOX") == FolderCheckpoint(17, 5)
    assert await again.pop3_known() == {"a": "old", "b": "old", "c": "done"}
    assert await again.pop3_prune(["b", "c", "d"]) == 1
    assert await again.pop3_known() == {"b": "old", "c": "done"}
    again.close()


class _StubbornClient:
    """An aioimaplib client whose LOGOUT never ends, not even when cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()  # set by the test when done, so the task can end
        self.tasks: list[Any] = []
        self.protocol = SimpleNamespace(tasks=[], pending_sync_command=None, transport=SimpleNamespace(closed=False))
        self.protocol.transport.close = lambda: setattr(self.protocol.transport, "closed", True)

    async def logout(self) -> None:
        await ignoring_cancellation(self.release)


async def test_logout_ends_and_closes_the_connection_even_if_the_library_does_not() -> None:
    client = _StubbornClient()
    session = Session(client, cfg())  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(session.logout(), 10)  # bounded at 2 s inside; a hang fails here
        assert client.protocol.transport.closed and session.lost.is_set()
    finally:
        client.release.set()


async def test_stop_listening_is_bounded_when_a_watcher_ignores_its_cancellation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import connectors.imap as imap_module

    monkeypatch.setattr(imap_module, "_STOP_WAIT", 0.2)
    ctx = ConnectorContext("mbox", logging.getLogger("t"), HttpHub(logging.getLogger("h")), str(tmp_path))
    conn = ImapConnector(cfg(), ctx)

    release = asyncio.Event()
    task = asyncio.create_task(ignoring_cancellation(release))
    conn._watchers["INBOX"] = task
    try:
        with caplog.at_level(logging.WARNING):
            await asyncio.wait_for(conn.stop_listening(0), 10)
        assert not conn._watchers and not task.done()
        assert any(r.getMessage() == "imap.stop_timeout" for r in caplog.records)
    finally:
        release.set()
        await task
