"""Each connector kind keeps a value from a message inside the part of an address the route left
open: the route's literal text decides what a rendered option may be. Pure: the router renders,
nothing is sent."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connectors.maildir import MaildirConfig, MaildirConnector, MaildirTarget
from gateway.config.loader import load_config
from gateway.contract import ConnectorContext, PermanentError, Target, TemplateText
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.registry import Registry
from gateway.routing.router import Planned, template_text
from gateway.routing.templates import make_environment

CONNECTORS = {
    "smtp": '{type: smtp, url: "smtp://127.0.0.1:25", sender: "Gateway <gw@example.com>"}',
    "maildir": '{type: maildir, path: "%(tmp)s/Maildir", sender: "Gateway <gw@example.com>"}',
    "imap": '{type: imap, host: mail.example.com, username: gw, password: "${GW_TEST_PW}"}',
    "mqtt": "{type: mqtt}",
    "amqp": '{type: amqp, url: "amqp://127.0.0.1:5672/", username: guest, password: "${GW_TEST_PW}"}',
    "xmpp": '{type: xmpp, jid: gw@example.com, password: "${GW_TEST_PW}"}',
    "rest": '{type: rest, base_url: "http://127.0.0.1:9"}',
}

Plan = Callable[[dict[str, Any]], "Planned | str"]


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], Plan]:
    """``target(kind, options)`` → ``plan(data)``: the target's Planned, or the refusal's reason."""
    monkeypatch.setenv("GW_TEST_PW", "secret-password")

    def make(kind: str, options: str) -> Plan:
        path = tmp_path / f"{kind}.yaml"
        path.write_text(f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:18080", auth: {{type: none}}}}
  out: {CONNECTORS[kind] % {"tmp": tmp_path}}
routes:
  - name: r
    from: api
    to: [{{connector: out, {options}}}]
""")
        router = load_config(str(path), Registry()).router

        def plan(data: dict[str, Any]) -> Planned | str:
            env = Envelope(source="api", protocol="rest", subject="/x", body=json.dumps(data).encode(),
                           content_type="application/json")
            [result] = router.reshape(env, router.routes[0])
            return result if isinstance(result, Planned) else result[1]

        return plan

    return make


def refused(result: Planned | str, *words: str) -> bool:
    return isinstance(result, str) and all(w in result for w in words)


def test_the_literal_text_of_a_template_is_split_by_jinja() -> None:
    env = make_environment()
    assert template_text(env, "{{ user }}@example.com") == TemplateText("{{ user }}@example.com",
                                                                        (None, "@example.com"))
    text = template_text(env, "Ops <{{ u }}@{% if x %}a{% endif %}.com>{# note #}")
    assert text.pieces == ("Ops <", None, "@", None, "a", None, ".com>", None)
    assert (text.prefix, text.suffix, text.literal) == ("Ops <", "", "Ops <@a.com>")


@pytest.mark.parametrize("kind", ["smtp", "maildir", "imap"])
def test_a_templated_mail_address_is_one_address_in_the_domain_the_route_wrote(
        target: Callable[[str, str], Plan], kind: str) -> None:
    plan = target(kind, 'to: "{{ data.user }}@example.com", cc: ["{{ data.cc }}"], '
                        'reply_to: "Desk <{{ data.desk }}@example.com>", sender: "{{ data.name }} <gw@example.com>"')
    base = {"user": "alice", "cc": "bob@partner.test", "desk": "help", "name": "Alerts"}
    ok = plan(base)
    assert isinstance(ok, Planned), ok
    assert ok.spec.options.to == "alice@example.com" and ok.spec.options.cc == ["bob@partner.test"]  # type: ignore[attr-defined]
    assert isinstance(plan({**base, "cc": ""}), Planned)  # an empty value adds no recipient
    for user in ("evil@example.net, ops", "evil@example.net (", "a@evil.test>, <b", "<evil@example.net>"):
        assert refused(plan({**base, "user": user}), "to:"), user
    assert refused(plan({**base, "cc": "a@x.test, b@y.test"}), "cc[0]", "2 addresses")
    assert refused(plan({**base, "desk": "x@evil.test> (", "user": "alice"}), "reply_to", "example.com")
    assert refused(plan({**base, "name": "x <evil@evil.test>, y"}), "sender")
    assert refused(plan({**base, "name": "x <evil@example.com> ("}), "sender", "gw@example.com")


@pytest.mark.parametrize("bad", ["x\r\nBcc: evil@example.net", "x\nBcc: e@x", "x\u2028Bcc: e@x", "x\x85y", "x\0"])
def test_no_line_break_reaches_a_templated_mail_header(target: Callable[[str, str], Plan], bad: str) -> None:
    plan = target("smtp", 'to: "ops@example.com", subject: "Alert {{ data.s }}", '
                          'mail_headers: {X-Site: "{{ data.s }}"}, envelope_from: "{{ data.s }}@example.com"')
    result = plan({"s": bad})
    assert refused(result, "header injection refused"), result
    assert isinstance(plan({"s": "7"}), Planned)


def test_a_templated_envelope_sender_is_one_address(target: Callable[[str, str], Plan]) -> None:
    plan = target("smtp", 'to: "ops@example.com", envelope_from: "{{ data.s }}@example.com"')
    assert isinstance(plan({"s": "bounces"}), Planned)
    assert refused(plan({"s": "a@evil.test, b"}), "envelope_from")


def test_a_templated_mqtt_topic_starts_with_dollar_only_where_the_route_wrote_it(
        target: Callable[[str, str], Plan]) -> None:
    plan = target("mqtt", 'topic: "{{ data.t }}", topic_levels: any')
    assert isinstance(plan({"t": "plant/7/alert"}), Planned)
    for t in ("$SYS/broker/x", "$share/g/plant/7", "$anything"):
        assert refused(plan({"t": t}), "topic", "'$'"), t
    for t in ("plant/+/x", "plant/#", "a\0b"):
        assert refused(plan({"t": t}), "topic"), t
    written = target("mqtt", 'topic: "$SYS/gw/{{ data.t }}"')
    assert isinstance(written({"t": "load"}), Planned)
    response = target("mqtt", 'topic: "replies", response_topic: "{{ data.t }}"')
    assert refused(response({"t": "$SYS/x"}), "response_topic")


def test_a_templated_amqp_exchange_and_routing_key_keep_what_the_route_wrote(
        target: Callable[[str, str], Plan]) -> None:
    plan = target("amqp", 'exchange: "{{ data.ex }}", routing_key: "orders.{{ data.id }}"')
    assert isinstance(plan({"ex": "events", "id": 7}), Planned)
    assert refused(plan({"ex": "", "id": 7}), "exchange", "empty")
    assert refused(plan({"ex": "amq.topic", "id": 7}), "exchange", "amq.")
    assert refused(plan({"ex": "a b", "id": 7}), "exchange", "not valid")
    assert refused(plan({"ex": "events", "id": "7.urgent"}), "routing_key", "'.'")
    assert refused(plan({"ex": "events", "id": "7\0"}), "routing_key", "NUL")
    assert refused(plan({"ex": "events", "id": "x" * 300}), "routing_key", "255")
    amq = target("amqp", 'exchange: "amq.{{ data.kind }}", routing_key: "{{ data.key }}"')
    assert isinstance(amq({"kind": "topic", "key": "a.b.c"}), Planned)  # the route wrote amq. and no dots
    assert refused(amq({"kind": "topic", "key": "amq.gen-JzTY20BRgKO"}), "routing_key", "amq.")


def test_a_templated_xmpp_recipient_is_one_jid_in_the_domain_the_route_wrote(
        target: Callable[[str, str], Plan]) -> None:
    fixed = target("xmpp", 'to: "{{ data.user }}@example.com"')
    assert isinstance(fixed({"user": "alice"}), Planned)
    for user in ("a@example.com/x", "a/x", "eve@evil.example", "a b", "a,b@evil.test, c"):
        assert refused(fixed({"user": user}), "to:", "shape of the JID"), user
    whole = target("xmpp", 'to: "{{ data.jid }}"')
    assert isinstance(whole({"jid": "bob@chat.example.org/phone"}), Planned)
    for jid in ("bob@chat.example.org, eve@evil.test", "chat.example.org", "<bob@x.test>"):
        assert refused(whole({"jid": jid}), "shape of the JID"), jid
    room = target("xmpp", 'to: "ops@conference.example.com/{{ data.nick }}"')
    assert isinstance(room({"nick": "gw"}), Planned)


def test_a_templated_rest_path_stays_segments_and_headers_stay_one_line(
        target: Callable[[str, str], Plan]) -> None:
    plan = target("rest", 'path: "/orders/{{ data.id }}", query: {q: "{{ data.id }}"}, '
                          'headers: {X-Order: "{{ data.id }}"}')
    ok = plan({"id": "7"})
    assert isinstance(ok, Planned)
    assert ok.spec.options.path == "/orders/7"  # type: ignore[attr-defined]
    quoted = plan({"id": "../admin?x=1#@evil.test"})
    assert isinstance(quoted, Planned)
    assert quoted.spec.options.path == "/orders/..%2Fadmin%3Fx%3D1%23%40evil.test"  # type: ignore[attr-defined]
    assert refused(plan({"id": "7\r\nHost: evil.test"}), "X-Order", "header injection refused")


async def test_a_line_break_in_an_untemplated_subject_dead_letters_instead_of_retrying(tmp_path: Path) -> None:
    """The subject defaults to the envelope's subject (an MQTT topic, an HTTP path): Python's email
    refuses U+2028 there with a bare ValueError, which must dead-letter, not retry for ever."""
    cfg = MaildirConfig.model_validate({"type": "maildir", "path": str(tmp_path / "Maildir"),
                                        "sender": "gw@example.com"})
    ctx = ConnectorContext("box", logging.getLogger("t"), HttpHub(logging.getLogger("h")), str(tmp_path))
    box = MaildirConnector(cfg, ctx)
    await box.open()
    try:
        env = Envelope(source="api", protocol="rest", subject="/alerts\u2028Bcc: evil@example.net", body=b"hi",
                       content_type="text/plain")
        with pytest.raises(PermanentError, match="cannot build the message"):
            await box.send(env, Target(route="r", connector="box", options=MaildirTarget(to="ops@example.com")))
    finally:
        await box.close()
