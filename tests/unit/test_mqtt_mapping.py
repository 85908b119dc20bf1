"""MQTT mapping and acknowledgement mechanics on real PUBLISH packets (captured from Mosquitto 2.0
with ``mosquitto_pub -V 5 -D publish ...``), decoded by paho itself. No broker, no sockets."""

from __future__ import annotations

import json
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from connectors.mqtt.client import GatewayClient, MalformedPublish, Received, decode_publish
from connectors.mqtt.config import MqttConfig, MqttTarget, topic_error
from connectors.mqtt.inbound import _incoming
from connectors.mqtt.mapping import Incoming, to_envelope, to_publish
from gateway.contract import PermanentError
from gateway.envelope import Envelope

# QoS 1 PUBLISH to sample/plant/7/boiler/alert, mid 1, with user properties site=north, site=n2,
# content type, correlation data req-42, response topic, message expiry 120, payload format 1.
ALERT = bytes.fromhex(
    "001b73616d706c652f706c616e742f372f626f696c65722f616c65727400014d2600047369746500056e6f727468260004"
    "7369746500026e320300106170706c69636174696f6e2f6a736f6e0900067265712d343208000e73616d706c652f726570"
    "6c696573010102000000787b2274656d7065726174757265223a2039332e352c202273697465223a20226e6f727468227d")
# QoS 1 PUBLISH to sample/ce in CloudEvents binary mode (user properties specversion, id, source,
# type, traceparent).
CE = bytes.fromhex(
    "000973616d706c652f636500027c26000b7370656376657273696f6e0003312e30260002696400056576742d31260006736f"
    "75726365000a2f73656e736f72732f37260004747970650013636f6d2e6578616d706c652e72656164696e6726000b747261"
    "6365706172656e74000930302d6162632d30310300106170706c69636174696f6e2f6a736f6e7b2261223a317d")
QOS1, QOS2 = 0x32, 0x34


def feed(client: GatewayClient, command: int, packet: bytes) -> None:
    client._in_packet = {"command": command, "have_remaining": 1, "remaining_count": [], "remaining_mult": 1,
                         "remaining_length": len(packet), "packet": bytearray(packet), "to_process": 0, "pos": 0}
    client._packet_handle()


def make_client(received: list[Received]) -> GatewayClient:
    client = GatewayClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True)
    client.on_received = received.append
    return client


def sent(client: GatewayClient) -> list[bytes]:
    return [bytes(p["packet"]) for p in client._out_packet]


def test_real_mqtt5_publish_maps_to_envelope() -> None:
    got: list[Received] = []
    client = make_client(got)
    feed(client, QOS1, ALERT)
    assert sent(client) == []  # manual ack: nothing acknowledged yet
    env = to_envelope("plant", _incoming(got[0]), "application/octet-stream")
    assert env.subject == "sample/plant/7/boiler/alert"
    assert env.protocol == "mqtt" and env.source == "plant"
    assert env.content_type == "application/json"
    assert env.data == {"temperature": 93.5, "site": "north"}
    assert dict(env.headers) == {"site": "north, n2"}
    assert env.correlation_id == "req-42"
    assert env.reply_to == "sample/replies"
    assert env.attributes["mqtt.qos"] == 1 and env.attributes["mqtt.retain"] is False
    assert env.attributes["mqtt.message_expiry"] == 120
    assert env.attributes["mqtt.payload_format"] == 1
    client.ack(got[0].mid, 1)
    assert sent(client) == [bytes([0x40, 0x02, 0x00, 0x01])]  # PUBACK mid 1


def test_real_cloudevents_binary_mode_gives_event_id() -> None:
    got: list[Received] = []
    feed(make_client(got), QOS1, CE)
    env = to_envelope("plant", _incoming(got[0]), "application/octet-stream")
    assert env.id == "evt-1"
    assert env.attributes["ce_source"] == "/sensors/7" and env.attributes["ce_type"] == "com.example.reading"
    # "00-abc-01" is no valid trace context: dropped, the message starts a new trace
    assert "ce-traceparent" not in env.headers and "traceparent" not in env.attributes
    assert env.subject == "sample/ce"


def test_qos2_is_handed_over_before_pubrec_and_pubrec_waits_for_ack() -> None:
    got: list[Received] = []
    client = make_client(got)
    feed(client, QOS2, ALERT)
    assert len(got) == 1 and got[0].qos == 2  # handed over at once (paho would wait for PUBREL)
    assert sent(client) == []  # and not acknowledged: no PUBREC yet
    client.ack(got[0].mid, 2)
    assert sent(client) == [bytes([0x50, 0x02, 0x00, 0x01])]  # PUBREC
    feed(client, 0x62, bytes([0x00, 0x01]))  # PUBREL
    assert sent(client)[-1] == bytes([0x70, 0x02, 0x00, 0x01])  # PUBCOMP
    assert len(got) == 1  # PUBREL did not deliver it a second time


def test_refuse_sends_a_failure_reason_code() -> None:
    got: list[Received] = []
    client = make_client(got)
    feed(client, QOS1, ALERT)
    client.refuse(1, 1, 0x97)
    assert sent(client) == [bytes([0x40, 0x03, 0x00, 0x01, 0x97])]


def test_decoder_agrees_with_paho_and_refuses_malformed_packets() -> None:
    from paho.mqtt import _packet  # paho's own decoder, as the reference

    for command, packet in ((QOS1, ALERT), (QOS1, CE), (QOS2, ALERT)):
        ours = decode_publish(command, packet, v5=True)
        ref = _packet.decode_publish(command, packet, mqtt.MQTTv5)
        assert (ours.topic_raw, ours.mid, ours.qos, ours.payload) == (ref.topic, ref.mid, ref.qos, ref.payload)
        for name, value in ours.properties.items():
            assert getattr(ref.properties, name) == value
    v3 = decode_publish(0x31, b"\x00\x03a/bhello", v5=False)  # QoS 0, retain
    assert (v3.topic, v3.qos, v3.retain, v3.mid, v3.payload) == ("a/b", 0, True, 0, b"hello")
    for bad in (b"\x00", b"\x00\x09a", ALERT[:30], ALERT[:32] + b"\x7f" + ALERT[33:]):
        with pytest.raises(MalformedPublish):
            decode_publish(QOS1, bad, v5=True)
    with pytest.raises(MalformedPublish, match="not allowed"):
        decode_publish(QOS1, b"\x00\x01a\x00\x01\x02\x11\x00", v5=True)  # session expiry in a PUBLISH


def test_malformed_publish_is_a_protocol_error() -> None:
    client = make_client([])
    client._in_packet = {"command": QOS1, "packet": bytearray(b"\x00\x09a")}
    from paho.mqtt.enums import MQTTErrorCode

    assert client._handle_publish() == MQTTErrorCode.MQTT_ERR_PROTOCOL


def test_structured_cloudevent_is_unpacked() -> None:
    event = {"specversion": "1.0", "id": "e-9", "source": "/x", "type": "t", "data": {"v": 1},
             "datacontenttype": "application/json"}
    env = to_envelope("plant", Incoming(topic="a/b", payload=json.dumps(event).encode(), qos=1,
                                        content_type="application/cloudevents+json"), "application/octet-stream")
    assert env.id == "e-9" and env.data == {"v": 1} and env.subject == "a/b"
    assert env.attributes["mqtt.topic"] == "a/b"


@pytest.mark.parametrize(("topic", "levels", "problem"), [
    ("plant/7/alert", 3, None),
    ("plant/7/x/alert", 3, "number of topic levels"),
    ("plant/7/x/alert", "any", None),
    ("plant/+/alert", None, "wildcard"),
    ("plant/#", None, "wildcard"),
    ("plant/\x00/a", None, "control"),
    ("plant/\x1b/a", None, "control"),
    ("plant/\ud800/a", None, "UTF-8"),
    ("", None, "empty"),
    ("a" * 70000, None, "65535"),
])
def test_topic_checks(topic: str, levels: Any, problem: str | None) -> None:
    err = topic_error(topic, levels)
    assert (err is None) if problem is None else (err is not None and problem in err)


def test_target_counts_template_levels_and_checks_static_topics() -> None:
    assert MqttTarget(topic="plant/{{ data.site }}/{{ data.kind }}/alert").topic_levels == 4
    assert MqttTarget(topic="{{ data.a / 2 }}/x").topic_levels == 2
    assert MqttTarget(topic="p/{{ x }}", topic_levels="any").topic_levels == "any"
    with pytest.raises(ValidationError, match="topic_levels"):
        MqttTarget(topic="p/{% if x %}a{% endif %}")
    with pytest.raises(ValidationError, match="wildcard"):
        MqttTarget(topic="plant/+/alert")
    # the spool stores rendered options; validating them again keeps the computed level count
    again = MqttTarget.model_validate({**MqttTarget(topic="p/{{ x }}").model_dump(), "topic": "p/7"})
    assert again.topic_levels == 2


def test_to_publish_maps_envelope_and_refuses_what_cannot_be_published() -> None:
    env = Envelope(source="api", protocol="rest", subject="/x", body=b'{"a":1}', content_type="application/json",
                   headers={"x-trace": "t1", "ce-partitionkey": "p-1"}, correlation_id="c-1", reply_to="r/1")
    out = to_publish(env, MqttTarget(topic="a/b", qos=2, retain=True, message_expiry=30), 1, 1024)
    assert (out.topic, out.qos, out.retain, out.payload) == ("a/b", 2, True, b'{"a":1}')
    assert out.content_type == "application/json"
    assert out.user_properties == [("x-trace", "t1"), ("ce-partitionkey", "p-1")]
    assert out.correlation_data == b"c-1" and out.response_topic == "r/1" and out.message_expiry == 30
    ce = dict(to_publish(env, MqttTarget(topic="a/b", cloudevents=True), 1, 1024).user_properties)
    assert ce["specversion"] == "1.0" and ce["id"] == env.id and ce["partitionkey"] == "p-1"
    assert ce["x-trace"] == "t1" and "ce-partitionkey" not in ce
    rendered = MqttTarget(topic="p/{{ x }}").model_copy(update={"topic": "p/a/b"})
    with pytest.raises(PermanentError, match="levels"):
        to_publish(env, rendered, 1, 1024)
    with pytest.raises(PermanentError, match="over the limit"):
        to_publish(env.evolve(body=b"x" * 1025), MqttTarget(topic="a"), 1, 1024)
    with pytest.raises(PermanentError, match="response topic"):
        to_publish(env.evolve(reply_to="r/#"), MqttTarget(topic="a"), 1, 1024)


def test_config_is_secure_and_strict() -> None:
    cfg = MqttConfig(subscribe=["a/+", {"filter": "b/#", "qos": 2}], share="g1")
    assert cfg.subscriptions() == [("$share/g1/a/+", 1), ("$share/g1/b/#", 2)]
    assert cfg.max_packet == 2 * cfg.max_payload + 64 * 1024
    assert MqttConfig(url="mqtts://broker").port == 8883
    for bad in ({"url": "mqtt://u:p@h:1883"}, {"url": "http://h"}, {"share": "a/b"},
                {"subscribe": ["a/#/b"]}, {"subscribe": ["a+/b"]}, {"subscribe": ["$share/g/a"]},
                {"password": "inline"}, {"max_payload": 0}):
        with pytest.raises(ValidationError):
            MqttConfig(**bad)


@pytest.mark.parametrize(("packet", "code"), [(b"\x00\x01", 0), (b"\x00\x01\x00", 0), (b"\x00\x01\x10", 0x10),
                                              (b"\x00\x01\x87\x00", 0x87)])
def test_puback_reason_reaches_on_publish_and_frees_the_message(packet: bytes, code: int) -> None:
    client = make_client([])
    seen: list[tuple[int, int, bool]] = []
    client.on_publish = lambda c, u, mid, reason, props: seen.append((mid, reason.value, reason.is_failure))
    info = client.publish("a/b", b"x", qos=1)
    assert info.mid == 1 and 1 in client._out_messages
    feed(client, 0x40, packet)
    assert seen == [(1, code, code >= 0x80)]
    assert client._out_messages == {}
    feed(client, 0x40, packet)  # a duplicate PUBACK is ignored
    assert len(seen) == 1
