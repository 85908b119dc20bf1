"""W3C trace context in and out of each protocol's own field (the mappings, no sockets).

Inbound: a valid ``traceparent``/``tracestate`` in the protocol's field becomes the envelope's
``traceparent``/``tracestate`` attributes; an invalid or huge one is ignored (the message starts a
new trace), never refused. Outbound: the envelope's context (the attempt's own) is written into
the protocol's field, once, whatever stale copy the envelope's headers hold.
"""

from __future__ import annotations

import email
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pamqp.commands import Basic
from slixmpp.stanza import Message

from connectors.amqp.config import AmqpTarget
from connectors.amqp.mapping import to_envelope as amqp_in
from connectors.amqp.mapping import to_publish as amqp_out
from connectors.imap.mapping import mail_envelope
from connectors.mail_common import MailOptions, build_mail, parse_message, trace_attributes
from connectors.mqtt.client import decode_properties
from connectors.mqtt.config import MqttTarget
from connectors.mqtt.mapping import Incoming
from connectors.mqtt.mapping import to_envelope as mqtt_in
from connectors.mqtt.mapping import to_publish as mqtt_out
from connectors.mqtt.outbound import MqttOutbound, _PackedProperties, _TracedProperties
from connectors.rest.inbound import RestInbound, trace_header
from connectors.rest.mapping import request_headers
from connectors.rest.mapping import to_envelope as rest_in
from connectors.soap.asgi import trace_header as soap_trace_header
from connectors.xmpp.mapping import add_trace, incoming
from connectors.xmpp.mapping import to_envelope as xmpp_in
from gateway.contract import Outcome, Status
from gateway.envelope import Envelope
from tests.contract import make_connector
from tests.unit.test_amqp_mapping import wire

TID = "4bf92f3577b34da6a3ce929d0e0e4736"
TP = f"00-{TID}-00f067aa0ba902b7-01"
TS = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
#: What a sender may put in the field that must be ignored, cheaply, and never refused.
HOSTILE = ["", "00-1", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", TP.upper(), "ff" + TP[2:],
           TP + "-extra", "00-" + "a" * 100_000, "x" * 1_000_000]


def env(**kw: object) -> Envelope:
    base: dict[str, object] = {"source": "src", "protocol": "rest", "subject": "s", "body": b"{}",
                               "content_type": "application/json"}
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


#: An envelope as the delivery hands it to an outbound connector: its own attempt's context in the
#: attributes, and a stale copy of the sender's fields in its headers.
ATTEMPT = f"00-{TID}-1111111111111111-01"
SENT = env(headers={"traceparent": TP, "tracestate": "stale=1", "ce-traceparent": TP, "x-site": "7"},
           attributes={"traceparent": ATTEMPT, "tracestate": TS})


# --- REST ------------------------------------------------------------------------------------


def rest_request(headers: dict[str, str]) -> Envelope:
    scope = {"type": "http", "method": "POST", "path": "/events", "query_string": b"", "client": ("1.2.3.4", 5)}
    return rest_in(scope, headers, b"{}", source="api", secret_headers=set())


def test_rest_inbound_takes_the_callers_context() -> None:
    e = rest_request({"content-type": "application/json", "traceparent": TP, "tracestate": TS, "x-a": "1"})
    assert e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS
    assert e.headers == {"x-a": "1"}


@pytest.mark.parametrize("value", HOSTILE)
def test_rest_inbound_ignores_an_invalid_context(value: str) -> None:
    e = rest_request({"traceparent": value, "tracestate": TS})
    assert "traceparent" not in e.attributes and "tracestate" not in e.attributes


def test_rest_outbound_sends_the_attempts_context_once() -> None:
    headers = request_headers(SENT, {"traceparent": "00-route-set", "X-Route": "r"})
    assert headers["traceparent"] == ATTEMPT and headers["tracestate"] == TS
    assert headers["X-Route"] == "r" and headers["x-site"] == "7"
    assert [k for k in headers if k.lower() == "traceparent"] == ["traceparent"]


def test_rest_and_soap_answer_only_a_valid_context_in_canonical_form() -> None:
    ok = Outcome(Status.ACCEPTED, "id", traceparent=TP)
    for header in (trace_header, soap_trace_header):
        assert header(ok) == [(b"traceparent", TP.encode())]
        assert header(Outcome(Status.ACCEPTED, "id")) == []
        # never reflected unvalidated: an injected line break or junk gives no header at all
        assert header(Outcome(Status.ACCEPTED, "id", traceparent=TP + "\r\nSet-Cookie: a=b")) == []
        assert header(Outcome(Status.ACCEPTED, "id", traceparent="x" * 100_000)) == []
        # a later version's extra fields are not echoed
        assert header(Outcome(Status.ACCEPTED, "id", traceparent="01" + TP[2:] + "-more")) == [
            (b"traceparent", TP.encode())]


# --- MQTT ------------------------------------------------------------------------------------


def test_mqtt_inbound_takes_the_user_properties_context() -> None:
    msg = Incoming(topic="a/b", payload=b"{}", user_properties=[("traceparent", TP), ("tracestate", TS),
                                                                ("site", "7")])
    e = mqtt_in("plant", msg, "application/json")
    assert e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS
    assert e.headers == {"site": "7"}  # not kept twice


def test_mqtt_inbound_cloudevents_binary_mode_shares_the_name() -> None:
    props = [("specversion", "1.0"), ("id", "e1"), ("source", "/s"), ("type", "t"), ("traceparent", TP)]
    e = mqtt_in("plant", Incoming(topic="a", payload=b"{}", user_properties=props), "application/json")
    assert e.id == "e1" and e.attributes["traceparent"] == TP and "ce-traceparent" not in e.headers


@pytest.mark.parametrize("value", HOSTILE)
def test_mqtt_inbound_ignores_an_invalid_context(value: str) -> None:
    e = mqtt_in("plant", Incoming(topic="a", payload=b"", user_properties=[("traceparent", value)]), "text/plain")
    assert "traceparent" not in e.attributes and "traceparent" not in e.headers


@pytest.mark.parametrize("cloudevents", [False, True])
def test_mqtt_outbound_writes_the_attempts_context_once(cloudevents: bool) -> None:
    out = mqtt_out(SENT, MqttTarget(topic="a/b", cloudevents=cloudevents), 1, 1024)
    names = [k for k, _ in out.user_properties + out.trace]
    assert names.count("traceparent") == 1 and names.count("tracestate") == 1
    assert "ce-traceparent" not in names
    assert out.trace == [("traceparent", ATTEMPT), ("tracestate", TS)]


def test_mqtt_outbound_packs_the_trace_after_the_shared_properties() -> None:
    """The hand-packed properties decode (as a broker reads them) to the shared ones plus the
    trace user properties."""
    shared = _PackedProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    shared.ContentType = "application/json"
    shared.UserProperty = [("site", "7")]
    shared.freeze()
    packed = _TracedProperties.of(shared, [("traceparent", ATTEMPT), ("tracestate", TS)]).pack()
    decoded = decode_properties(packed[1:] if packed[0] < 0x80 else packed[2:])
    assert decoded["ContentType"] == "application/json"
    assert list(decoded["UserProperty"]) == [("site", "7"), ("traceparent", ATTEMPT), ("tracestate", TS)]
    empty = _PackedProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    empty.freeze()
    again = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    again.UserProperty = [("traceparent", ATTEMPT)]
    assert _TracedProperties.of(empty, [("traceparent", ATTEMPT)]).pack() == again.pack()  # type: ignore[no-untyped-call]


# --- AMQP ------------------------------------------------------------------------------------


def test_amqp_inbound_takes_the_headers_context() -> None:
    props = Basic.Properties(headers={"traceparent": TP, "tracestate": TS, "site": "7"})
    e = amqp_in("bus", wire(props, b"{}"), "application/json")
    assert e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS
    assert e.headers == {"site": "7"}


def test_amqp_inbound_takes_the_cloudevents_tracing_extension() -> None:
    props = Basic.Properties(headers={"cloudEvents:specversion": "1.0", "cloudEvents:id": "e1",
                                      "cloudEvents:source": "/s", "cloudEvents:type": "t",
                                      "cloudEvents:traceparent": TP})
    e = amqp_in("bus", wire(props, b"{}"), "application/json")
    assert e.attributes["traceparent"] == TP and "ce-traceparent" not in e.headers


@pytest.mark.parametrize("value", HOSTILE)
def test_amqp_inbound_ignores_an_invalid_context(value: str) -> None:
    e = amqp_in("bus", wire(Basic.Properties(headers={"traceparent": value}), b""), "text/plain")
    assert "traceparent" not in e.attributes and "traceparent" not in e.headers


def test_amqp_outbound_writes_the_attempts_context() -> None:
    h = amqp_out(SENT, AmqpTarget(), persistent=True, mandatory=True, max_body=100).properties["headers"]
    assert h["traceparent"] == ATTEMPT and h["tracestate"] == TS and h["x-site"] == "7"
    assert "ce-traceparent" not in h
    ce = amqp_out(SENT, AmqpTarget(cloudevents=True), persistent=True, mandatory=True, max_body=100)
    h = ce.properties["headers"]
    # the W3C AMQP field, and the CloudEvents tracing extension of the binary mode: the same context
    assert h["traceparent"] == h["cloudEvents:traceparent"] == ATTEMPT
    assert h["tracestate"] == h["cloudEvents:tracestate"] == TS


# --- mail (SMTP, IMAP, POP3, Maildir) ------------------------------------------------------------

MAIL = (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\nTraceparent: {TP}\r\n"
        f"Tracestate: {TS}\r\n\r\nbody\r\n").encode()


def test_mail_inbound_reads_the_traceparent_header() -> None:
    assert trace_attributes(parse_message(MAIL)) == {"traceparent": TP, "tracestate": TS}
    # IMAP and POP3 build their envelopes here
    e = mail_envelope(MAIL, source="box", protocol="imap", mailbox="b@example.com", extra={}, idempotency_key="k")
    assert e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS


@pytest.mark.parametrize("value", HOSTILE[:-2])  # the huge ones: a header line that long is cut
def test_mail_inbound_ignores_an_invalid_header(value: str) -> None:
    raw = f"From: a@example.com\r\nTraceparent: {value}\r\n\r\nbody\r\n".encode()
    assert trace_attributes(parse_message(raw)) == {}


def test_mail_outbound_writes_the_header_into_a_built_message() -> None:
    built = build_mail(SENT, MailOptions(to="b@example.com", sender="gw@example.com"), route="r",
                       default_sender=None)
    msg = email.message_from_bytes(built.data)
    assert msg.get_all("Traceparent") == [ATTEMPT] and msg.get_all("Tracestate") == [TS]


def test_mail_outbound_puts_its_header_above_a_forwarded_messages_own() -> None:
    received = env(protocol="smtp", body=MAIL, content_type="message/rfc822",
                   attributes={"traceparent": ATTEMPT, "rcpt": "b@example.com", "mail_from": "a@example.com"})
    built = build_mail(received, MailOptions(forward=True), route="r", default_sender=None)
    assert built.data == f"Traceparent: {ATTEMPT}\r\n".encode() + MAIL
    # a reader (the next gateway) takes the topmost
    assert trace_attributes(parse_message(built.data))["traceparent"] == ATTEMPT
    # nothing to add: the message goes unchanged
    assert build_mail(received.evolve(attributes={"rcpt": "b@example.com"}), MailOptions(forward=True), route="r",
                      default_sender=None).data == MAIL


def test_a_route_cannot_set_the_trace_headers_itself() -> None:
    with pytest.raises(Exception, match="cannot be set"):
        build_mail(SENT, MailOptions(to="b@example.com", sender="gw@example.com",
                                     mail_headers={"Traceparent": TP}), route="r", default_sender=None)


# --- XMPP ------------------------------------------------------------------------------------

SHIM_CHAT = f"""<message xmlns="jabber:client" type="chat" from="alice@localhost/phone" to="gw@localhost" id="m1">
  <body>hi</body><headers xmlns="http://jabber.org/protocol/shim"><header name="urgency">high</header>
  <header name="traceparent">{TP}</header><header name="tracestate">{TS}</header></headers></message>"""


def test_xmpp_inbound_reads_shim_headers() -> None:
    inc = incoming(Message(xml=ET.fromstring(SHIM_CHAT)), frozenset(), "gw")
    assert inc is not None
    e = xmpp_in(inc, source="chat", content_type="text/plain")
    assert e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS


@pytest.mark.parametrize("value", HOSTILE)
def test_xmpp_inbound_ignores_an_invalid_context(value: str) -> None:
    text = SHIM_CHAT.replace(TP, value)
    inc = incoming(Message(xml=ET.fromstring(text)), frozenset(), "gw")
    assert inc is not None and "traceparent" not in xmpp_in(inc, source="c", content_type="text/plain").attributes


def test_xmpp_inbound_looks_at_a_bounded_number_of_shim_headers() -> None:
    many = "".join(f'<header name="h{i}">v</header>' for i in range(10_000))
    text = SHIM_CHAT.replace('<header name="urgency">high</header>', many)
    inc = incoming(Message(xml=ET.fromstring(text)), frozenset(), "gw")
    assert inc is not None and inc.trace == {}


def test_xmpp_outbound_writes_shim_headers() -> None:
    msg = Message()
    msg["to"] = "bob@localhost"
    msg["body"] = "hi"
    add_trace(msg, SENT)
    back = incoming(Message(xml=ET.fromstring(str(msg).replace("<message ", '<message from="x@localhost/r" ', 1))),
                    frozenset(), "gw")
    assert back is not None and back.trace == {"traceparent": ATTEMPT, "tracestate": TS}
    assert 'xmlns="http://jabber.org/protocol/shim"' in str(msg)
    plain = Message()
    add_trace(plain, env())
    assert "shim" not in str(plain)


def test_mqtt_3_1_1_carries_no_trace_context(tmp_path: Path) -> None:
    """MQTT 3.1.1 has no properties: the context does not cross a 3.1.1 hop (documented)."""
    v311 = make_connector("mqtt", {"protocol": "3.1.1"}, tmp_path, name="old")
    v5 = make_connector("mqtt", {}, tmp_path, name="new")
    assert isinstance(v311, MqttOutbound) and isinstance(v5, MqttOutbound)
    out = mqtt_out(SENT, MqttTarget(topic="a/b"), 1, 1024)
    assert v311._properties(out) is None
    packed = v5._properties(out)
    assert packed is not None and ATTEMPT.encode() in packed.pack()  # type: ignore[no-untyped-call]


def test_rest_openapi_names_the_trace_headers(tmp_path: Path) -> None:
    api = make_connector("rest", {"listen": "127.0.0.1:1", "auth": {"type": "none"}, "endpoints": [{"path": "/e"}]},
                         tmp_path, name="api")
    assert isinstance(api, RestInbound)
    op = api.openapi()["paths"]["/e"]["post"]
    assert op["parameters"][0]["name"] == "traceparent"
    assert "traceparent" in op["responses"]["202"]["headers"]


STRUCTURED = ('{"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", "partitionkey": "p", '
              f'"traceparent": "{TP}", "tracestate": "{TS}", "data": {{"v": 1}}}}').encode()


def test_a_structured_cloudevents_tracing_extension_is_the_context_when_the_protocol_gave_none() -> None:
    """REST, MQTT and AMQP: the event's ``traceparent``/``tracestate`` extension (CloudEvents
    distributed tracing) is the context unless the protocol's own field gave one."""
    ct = "application/cloudevents+json"
    scope = {"type": "http", "method": "POST", "path": "/e", "query_string": b"", "client": None}
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    envs = [
        rest_in(scope, {"content-type": ct}, STRUCTURED, source="api", secret_headers=set()),
        mqtt_in("plant", Incoming(topic="a", payload=STRUCTURED, content_type=ct), "text/plain"),
        amqp_in("bus", wire(Basic.Properties(content_type=ct), STRUCTURED), "text/plain"),
    ]
    for e in envs:
        assert e.id == "e1" and e.attributes["traceparent"] == TP and e.attributes["tracestate"] == TS
        assert e.headers["ce-partitionkey"] == "p" and "ce-traceparent" not in e.headers
    given = [
        rest_in(scope, {"content-type": ct, "traceparent": other}, STRUCTURED, source="api", secret_headers=set()),
        mqtt_in("plant", Incoming(topic="a", payload=STRUCTURED, content_type=ct,
                                  user_properties=[("traceparent", other)]), "text/plain"),
        amqp_in("bus", wire(Basic.Properties(content_type=ct, headers={"traceparent": other}), STRUCTURED),
                "text/plain"),
    ]
    for e in given:
        assert e.attributes["traceparent"] == other and "tracestate" not in e.attributes
