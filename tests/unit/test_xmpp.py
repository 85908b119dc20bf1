"""XMPP mapping, options and stream hardening on real stanzas (as Prosody 0.12 sends them). Pure."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError
from slixmpp.stanza import Message

from connectors.xmpp import XmppConnector
from connectors.xmpp.config import XmppConfig, XmppTarget
from connectors.xmpp.mapping import incoming, outgoing_text, to_envelope
from connectors.xmpp.stream import MAX_DEPTH, AckWindow, HardenedClient
from gateway.config.loader import load_config
from gateway.config.yamlsrc import FromEnv
from gateway.contract import ConnectorContext
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.registry import Registry
from gateway.routing.router import Planned

ROOMS = frozenset({"ops@conference.localhost"})

CHAT = """<message xmlns="jabber:client" xml:lang="en" type="chat" from="alice@localhost/phone"
  to="gateway@localhost" id="e41fb0fd9f79496c9bf9bcb3875451d6"><body>disk 91% on db-1</body>
  <thread>t-42</thread><request xmlns="urn:xmpp:receipts"/></message>"""

OFFLINE = """<message xmlns="jabber:client" type="chat" from="alice@localhost/phone" to="gateway@localhost"
  id="m2"><body>sent while you were away</body>
  <delay xmlns="urn:xmpp:delay" from="localhost" stamp="2025-11-28T07:41:17Z"/></message>"""

ROOM_MSG = """<message xmlns="jabber:client" type="groupchat" from="ops@conference.localhost/bob"
  to="gateway@localhost/r1" id="g1"><body>thanks gw</body><request xmlns="urn:xmpp:receipts"/></message>"""

ROOM_ECHO = """<message xmlns="jabber:client" type="groupchat" from="ops@conference.localhost/gateway"
  to="gateway@localhost/r1" id="g2"><body>deploy finished</body></message>"""

ROOM_HISTORY = """<message xmlns="jabber:client" type="groupchat" from="ops@conference.localhost/bob"
  to="gateway@localhost/r1" id="g3"><body>old news</body>
  <delay xmlns="urn:xmpp:delay" from="ops@conference.localhost" stamp="2025-11-27T10:00:00Z"/></message>"""

OTHER_ROOM = """<message xmlns="jabber:client" type="groupchat" from="random@conference.localhost/eve"
  to="gateway@localhost/r1" id="g4"><body>hi</body></message>"""

CHAT_STATE = """<message xmlns="jabber:client" type="chat" from="alice@localhost/phone" to="gateway@localhost">
  <composing xmlns="http://jabber.org/protocol/chatstates"/></message>"""

BOUNCE = """<message xmlns="jabber:client" type="error" from="nobody-here@localhost" to="gateway@localhost/r1"
  id="01M8GHMSBEA1XPN0H71WK779ZG.1"><error type="cancel"><service-unavailable
  xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/></error></message>"""


def stanza(text: str) -> Message:
    return Message(xml=ET.fromstring(text))


def test_a_chat_message_becomes_an_envelope_addressed_by_its_sender() -> None:
    inc = incoming(stanza(CHAT), ROOMS, "gateway")
    assert inc is not None and inc.wants_receipt
    env = to_envelope(inc, source="chat", content_type="text/plain; charset=utf-8")
    assert env.subject == "alice@localhost" and env.reply_to == "alice@localhost"
    assert env.protocol == "xmpp" and env.source == "chat"
    assert env.body == b"disk 91% on db-1" and env.data == "disk 91% on db-1"
    assert dict(env.attributes) == {
        "xmpp.from": "alice@localhost", "xmpp.from_full": "alice@localhost/phone", "xmpp.to": "gateway@localhost",
        "xmpp.type": "chat", "xmpp.id": "e41fb0fd9f79496c9bf9bcb3875451d6", "xmpp.thread": "t-42",
    }


def test_an_offline_message_carries_its_delay_stamp() -> None:
    inc = incoming(stanza(OFFLINE), ROOMS, "gateway")
    assert inc is not None and not inc.wants_receipt
    env = to_envelope(inc, source="chat", content_type="text/plain")
    assert env.attributes["xmpp.delayed"] == "2025-11-28T07:41:17+00:00"


def test_a_room_message_is_addressed_by_the_room_and_never_asks_a_receipt() -> None:
    inc = incoming(stanza(ROOM_MSG), ROOMS, "gateway")
    assert inc is not None and not inc.wants_receipt
    env = to_envelope(inc, source="chat", content_type="text/plain")
    assert env.subject == "ops@conference.localhost" and env.reply_to == "ops@conference.localhost"
    assert env.attributes["xmpp.room"] == "ops@conference.localhost"
    assert env.attributes["xmpp.nick"] == "bob" and env.attributes["xmpp.from"] == "ops@conference.localhost"


@pytest.mark.parametrize("sample", [ROOM_ECHO, ROOM_HISTORY, OTHER_ROOM, CHAT_STATE, BOUNCE],
                         ids=["own-echo", "room-history", "room-not-joined", "chat-state", "error"])
def test_stanzas_that_carry_no_new_message_are_not_envelopes(sample: str) -> None:
    assert incoming(stanza(sample), ROOMS, "gateway") is None


def test_outgoing_text_refuses_what_xmpp_cannot_carry() -> None:
    assert outgoing_text("Boiler 97 °C\n".encode(), 100) == "Boiler 97 °C\n"
    for body, why in [(b"\xff", "not UTF-8"), (b"\x07", "control characters"), (b"x" * 101, "over max_body")]:
        with pytest.raises(ValueError, match=why):
            outgoing_text(body, 100)


def test_config_checks_jids_and_keeps_secrets_out_of_the_file() -> None:
    ok = {"type": "xmpp", "jid": "gateway@example.com", "password": FromEnv("s3cret")}
    cfg = XmppConfig.model_validate({**ok, "rooms": ["Ops@Conference.Example.com"]})
    assert cfg.rooms == ["ops@conference.example.com"]
    assert "s3cret" not in repr(cfg)
    for bad, why in [({"jid": "example.com"}, "needs a user part"), ({"jid": "a@@b"}, "not a valid JID"),
                     ({"rooms": ["ops@conference.example.com/nick"]}, "bare room JID"),
                     ({"password": "inline"}, "never written inline"), ({"tls": "none"}, "tls")]:
        with pytest.raises(ValidationError, match=why):
            XmppConfig.model_validate({**ok, **bad})


def test_groupchat_targets_have_no_subject() -> None:
    XmppTarget.model_validate({"to": "ops@conference.example.com", "type": "groupchat"})
    with pytest.raises(ValidationError, match="subject"):
        XmppTarget.model_validate({"to": "ops@conference.example.com", "type": "groupchat", "subject": "x"})


def test_default_ports_follow_the_tls_mode(tmp_path: Path) -> None:
    def conn(**extra: object) -> XmppConnector:
        cfg = XmppConfig.model_validate({"type": "xmpp", "jid": "gw@example.com", "password": FromEnv("x"),
                                         **extra})
        ctx = ConnectorContext("chat", logging.getLogger("t"), HttpHub(logging.getLogger("h")), str(tmp_path))
        return XmppConnector(cfg, ctx)

    assert (conn().host, conn().port) == ("example.com", 5222)
    assert conn(tls="direct").port == 5223
    assert (conn(host="10.0.0.5", port=15222).host, conn(host="10.0.0.5", port=15222).port) == ("10.0.0.5", 15222)


def test_a_value_from_the_message_cannot_change_the_recipient_domain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_XMPP_PW", "x")
    path = tmp_path / "routes.yaml"
    path.write_text("""
connectors:
  api: {type: rest, listen: "127.0.0.1:18080", auth: {type: none}}
  chat: {type: xmpp, jid: gw@example.com, password: "${GW_TEST_XMPP_PW}"}
routes:
  - name: to-chat
    from: api
    to: [{connector: chat, to: "{{ data.user }}@example.com"}]
""")
    router = load_config(str(path), Registry({"xmpp": XmppConnector})).router
    route = router.routes[0]

    def plan(user: str) -> Planned | tuple[object, str]:
        env = Envelope(source="api", protocol="rest", subject="/x", body=f'{{"user": "{user}"}}'.encode(),
                       content_type="application/json")
        return router.reshape(env, route)[0]

    ok = plan("alice")
    assert isinstance(ok, Planned) and isinstance(ok.spec.options, XmppTarget)
    assert ok.spec.options.to == "alice@example.com"
    for evil in ("eve@evil.example", "alice/other", "a b", "x:y"):
        refused = plan(evil)
        assert not isinstance(refused, Planned) and "shape of the JID" in refused[1]


def test_the_ack_window_counts_only_up_to_the_first_message_without_an_outcome() -> None:
    w = AckWindow()
    assert w.handled == 0
    presence = w.receive(hold=False)
    m1 = w.receive(hold=True)
    m2 = w.receive(hold=True)
    w.receive(hold=False)
    assert (presence, m1, m2) == (1, 2, 3)
    assert w.handled == 1
    w.settle(m2)
    assert w.handled == 1  # m1 still waits
    w.settle(m1)
    assert w.handled == 4


# --- the hardened stream parser ----------------------------------------------------------------

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' id='s1' from='localhost' version='1.0'>")


@pytest.mark.parametrize(("data", "condition"), [
    (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><stream:stream>", "restricted-xml"),
    (HEADER + b"<message><body>&lol;</body></message>", "not-well-formed"),
    (HEADER + b"<message>" + b"<a>" * MAX_DEPTH, "policy-violation"),
    (HEADER + b"<message><body>" + b"A" * 5000, "policy-violation"),
    (HEADER + b"<message><body>x</bod></message>", "not-well-formed"),
], ids=["dtd", "entity", "depth", "size", "malformed"])
async def test_the_parser_refuses_hostile_xml(data: bytes, condition: str) -> None:
    refused: list[tuple[str, str]] = []
    client = HardenedClient("gw@localhost", "x", max_stanza=4096, on_refused=lambda c, t: refused.append((c, t)))
    client.init_parser()
    client.data_received(data)
    assert refused and refused[0][0] == condition
    assert client.parser is None  # nothing more is read from that stream


async def test_the_parser_passes_an_ordinary_stream_and_bounds_per_stanza() -> None:
    refused: list[tuple[str, str]] = []
    seen: list[str] = []
    client = HardenedClient("gw@localhost", "x", max_stanza=4096, on_refused=lambda c, t: refused.append((c, t)))
    client.add_event_handler("message", lambda m: seen.append(str(m["body"])))
    client.init_parser()
    client.data_received(HEADER)
    for i in range(5):  # 5 x 3 KB: more than max_stanza in total, each stanza below it
        client.data_received(f"<message type='chat' from='a@localhost/x'><body>{i}{'z' * 3000}</body></message>"
                             .encode())
    assert not refused
    assert [s[0] for s in seen] == ["0", "1", "2", "3", "4"]
