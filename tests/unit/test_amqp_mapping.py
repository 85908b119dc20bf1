"""AMQP mapping on wire-format samples: content headers are marshalled and unmarshalled by pamqp
(the codec aiormq uses), so field types are what a real delivery carries. No broker."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pamqp import frame
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from pydantic import ValidationError

from connectors.amqp.config import AmqpConfig, AmqpTarget, QueueSpec
from connectors.amqp.mapping import Delivery, header_text, to_envelope, to_publish
from gateway.contract import PermanentError
from gateway.envelope import Envelope


def wire(props: Basic.Properties, body: bytes) -> Delivery:
    """Marshal a content header as RabbitMQ would send it and read it back."""
    raw = frame.marshal(ContentHeader(0, len(body), props), 1)
    _, _, header = frame.unmarshal(raw)
    p = header.properties
    return Delivery(body=body, exchange="orders", routing_key="orders.eu.created", redelivered=True,
                    content_type=p.content_type, headers=dict(p.headers or {}), delivery_mode=p.delivery_mode,
                    priority=p.priority, correlation_id=p.correlation_id, reply_to=p.reply_to,
                    expiration=p.expiration, message_id=p.message_id, timestamp=p.timestamp,
                    type=p.message_type, user_id=p.user_id, app_id=p.app_id)


def test_delivery_maps_to_envelope() -> None:
    props = Basic.Properties(
        content_type="application/json", delivery_mode=2, priority=4, correlation_id="c-1", reply_to="replies",
        expiration="60000", message_id="m-1", timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        message_type="order.created", app_id="shop",
        headers={"x-tenant": "t1", "attempt": 3, "flag": True, "amount": Decimal("9.50"),
                 "tags": ["a", "b"], "x-delivery-count": 2})
    env = to_envelope("bus", wire(props, b'{"id": 7}'), "application/octet-stream")
    assert env.id == "m-1"  # stable across redeliveries
    assert env.subject == "orders.eu.created" and env.protocol == "amqp"
    assert env.data == {"id": 7}
    assert env.correlation_id == "c-1" and env.reply_to == "replies"
    assert env.headers["x-tenant"] == "t1" and env.headers["attempt"] == "3" and env.headers["flag"] == "true"
    assert env.headers["amount"] == "9.50" and env.headers["tags"] == '["a","b"]'
    a = env.attributes
    assert a["amqp.exchange"] == "orders" and a["amqp.routing_key"] == "orders.eu.created"
    assert a["amqp.redelivered"] is True and a["amqp.delivery_mode"] == 2 and a["amqp.priority"] == 4
    assert a["amqp.type"] == "order.created" and a["amqp.app_id"] == "shop" and a["amqp.expiration"] == "60000"
    assert a["amqp.timestamp"].startswith("2026-01-02T03:04:05")
    assert a["amqp.delivery_count"] == 2


def test_cloudevents_binary_and_structured() -> None:
    props = Basic.Properties(content_type="application/json", headers={
        "cloudEvents:specversion": "1.0", "cloudEvents:id": "evt-1", "cloudEvents:source": "/s",
        "cloudEvents:type": "t.created", "cloudEvents_partitionkey": "p-1",
        "cloudEvents_traceparent": "00-1"})
    env = to_envelope("bus", wire(props, b"{}"), "application/octet-stream")
    assert env.id == "evt-1" and env.attributes["ce_type"] == "t.created"
    assert env.headers["ce-partitionkey"] == "p-1" and "cloudEvents:id" not in env.headers
    # an invalid trace context is dropped, not carried on: the message starts a new trace
    assert "ce-traceparent" not in env.headers and "traceparent" not in env.attributes
    structured = b'{"specversion":"1.0","id":"e2","source":"/s","type":"t","data":{"v":1}}'
    env2 = to_envelope("bus", wire(Basic.Properties(content_type="application/cloudevents+json"), structured),
                       "application/octet-stream")
    assert env2.id == "e2" and env2.data == {"v": 1} and env2.subject == "orders.eu.created"


def test_no_properties_gets_defaults() -> None:
    env = to_envelope("bus", wire(Basic.Properties(), b"raw"), "text/plain")
    assert env.content_type == "text/plain" and len(env.id) == 26 and dict(env.headers) == {}


def test_header_text() -> None:
    assert header_text(None) == "" and header_text(1.5) == "1.5" and header_text(False) == "false"
    assert header_text({"a": b"x"}) == '{"a":"x"}' and header_text(b"raw") == "raw"


def test_to_publish_properties_and_refusals() -> None:
    env = Envelope(source="plant", protocol="mqtt", subject="plant/7/alert", body=b"{}",
                   content_type="application/json", headers={"site": "7", "ce-partitionkey": "p-1"},
                   correlation_id="c-1", reply_to="plant/replies")
    pub = to_publish(env, AmqpTarget(exchange="ex", expiration=1.5, priority=2, message_type="alert"),
                     persistent=True, mandatory=True, max_body=100)
    assert pub.exchange == "ex" and pub.routing_key == "plant.7.alert"  # MQTT topic → dotted key
    p = pub.properties
    assert p["delivery_mode"] == 2 and p["message_id"] == env.id and p["content_type"] == "application/json"
    assert p["correlation_id"] == "c-1" and p["reply_to"] == "plant/replies" and p["expiration"] == "1500"
    assert p["priority"] == 2 and p["type"] == "alert" and p["headers"]["site"] == "7"
    assert pub.mandatory
    ce = to_publish(env, AmqpTarget(cloudevents=True, persistent=False, mandatory=False), persistent=True,
                    mandatory=True, max_body=100)
    h = ce.properties["headers"]
    assert h["cloudEvents:id"] == env.id and h["cloudEvents:partitionkey"] == "p-1" and "ce-partitionkey" not in h
    assert ce.properties["delivery_mode"] == 1 and not ce.mandatory
    rest = env.evolve(protocol="rest", subject="/a/b")
    assert to_publish(rest, AmqpTarget(), persistent=True, mandatory=True, max_body=100).routing_key == "/a/b"
    with pytest.raises(PermanentError, match="exchange name"):
        to_publish(env, AmqpTarget(exchange="bad name!"), persistent=True, mandatory=True, max_body=100)
    with pytest.raises(PermanentError, match="255"):
        to_publish(env, AmqpTarget(routing_key="k" * 256), persistent=True, mandatory=True, max_body=100)
    with pytest.raises(PermanentError, match="over the limit"):
        to_publish(env.evolve(body=b"x" * 101), AmqpTarget(), persistent=True, mandatory=True, max_body=100)


def test_queue_arguments_and_config() -> None:
    q = QueueSpec(name="in", dead_letter_exchange="dlx", arguments={"x-max-length": 10})
    assert q.declare_arguments(5) == {"x-queue-type": "quorum", "x-dead-letter-exchange": "dlx",
                                      "x-delivery-limit": 5, "x-max-length": 10}
    classic = QueueSpec(name="in", queue_type="classic")
    assert "x-delivery-limit" not in classic.declare_arguments(5)
    assert AmqpConfig(url="amqps://h/vh").use_tls
    for bad in ({"url": "amqp://guest:guest@h/"}, {"url": "http://h"}, {"prefetch": 0}, {"password": "x"}):
        with pytest.raises(ValidationError):
            AmqpConfig(**bad)


def test_redeliveries_without_message_id_are_counted_by_content() -> None:
    from connectors.amqp.inbound import _attempt_key

    a = Delivery(body=b"poison", exchange="x", routing_key="k")
    assert _attempt_key(a) == _attempt_key(Delivery(body=b"poison", exchange="x", routing_key="k", redelivered=True))
    assert _attempt_key(a) != _attempt_key(Delivery(body=b"other", exchange="x", routing_key="k"))
    assert _attempt_key(Delivery(body=b"poison", message_id="m1")) == "id:m1"
