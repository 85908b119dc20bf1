"""AMQP 0-9-1 config, target options and the envelope mapping both ways. Pure: no sockets here."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from connectors.broker_common.config import BrokerConfig, BrokerTls
from gateway.sdk import (
    ByteSize,
    Duration,
    Envelope,
    PermanentError,
    Strict,
    SubstitutionCheck,
    TargetOptions,
    TemplateText,
    from_cloudevent,
    media_type,
)

_EXCHANGE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{0,127}$")
_CE_PREFIXES = ("cloudEvents:", "cloudEvents_")
_MAX_ID = 200
ArgValue = str | int | float | bool


class AmqpTls(BrokerTls):
    pass  # the fields are BrokerTls's; the name is what validation errors and the JSON schema show


class ExchangeSpec(Strict):
    name: str
    type: Literal["direct", "topic", "fanout", "headers"] = "topic"
    durable: bool = True


class Binding(Strict):
    exchange: str
    routing_key: str | list[str] = "#"

    def keys(self) -> list[str]:
        return [self.routing_key] if isinstance(self.routing_key, str) else list(self.routing_key)


class QueueSpec(Strict):
    """The queue an inbound connector consumes."""

    name: str = Field(min_length=1, max_length=255)
    #: False: use the queue as it exists (checked passively, nothing changed).
    declare: bool = True
    durable: bool = True
    #: Quorum queues replicate and count deliveries (x-delivery-limit); classic is the old default.
    queue_type: Literal["quorum", "classic"] = "quorum"
    #: Where rejected messages go (x-dead-letter-exchange). Without it RabbitMQ discards them.
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    #: Other x-arguments, e.g. {x-max-length: 100000, x-overflow: reject-publish}.
    arguments: dict[str, ArgValue] = Field(default_factory=dict)
    bindings: list[Binding] = Field(default_factory=list)

    def declare_arguments(self, delivery_limit: int) -> dict[str, ArgValue]:
        args: dict[str, ArgValue] = {"x-queue-type": self.queue_type}
        if self.dead_letter_exchange is not None:
            args["x-dead-letter-exchange"] = self.dead_letter_exchange
        if self.dead_letter_routing_key is not None:
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.queue_type == "quorum":
            args["x-delivery-limit"] = delivery_limit
        args.update(self.arguments)
        return args


class AmqpConfig(BrokerConfig):
    # from BrokerConfig: connect_timeout, reconnect_min, reconnect_max, username, password
    type: Literal["amqp"] = "amqp"
    #: ``amqp://host:5672/vhost`` or ``amqps://host:5671/vhost``. Credentials never go in the URL.
    url: str = "amqp://127.0.0.1:5672/"
    tls: AmqpTls | None = None
    heartbeat: int = Field(default=30, ge=0, le=600)
    #: Exchanges to declare on every connect (and re-declare after a reconnect).
    exchanges: list[ExchangeSpec] = Field(default_factory=list)
    #: Inbound: the queue to consume.
    queue: QueueSpec | None = None
    #: Unacknowledged deliveries at once: the back-pressure bound (never 0 = unlimited).
    prefetch: int = Field(default=256, ge=1, le=65535)
    #: Deliveries of one message after which a retry outcome rejects it to the dead-letter exchange.
    delivery_limit: int = Field(default=10, ge=1, le=1000)
    #: Longest wait before a retry outcome's nack(requeue) (the outcome's retry_after, capped).
    max_retry_delay: Duration = 5.0
    #: Largest body accepted (inbound, larger → reject to the DLX) or published.
    max_body: ByteSize = 16 * 1024 * 1024
    #: Content type of inbound messages that carry none.
    content_type: str = "application/octet-stream"
    #: Outbound defaults (a target may override): persistent delivery, mandatory routing.
    persistent: bool = True
    mandatory: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("url must look like amqp://host:5672/vhost or amqps://host:5671/vhost")
        if parts.username or parts.password:
            raise ValueError("credentials never go in the url: use username and password: \"${AMQP_PASSWORD}\"")
        return v

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "amqps" or self.tls is not None


def _templated_exchange(rendered: str, text: TemplateText) -> str:
    """A rendered exchange name is a valid name, never empty (the default exchange) and never a
    broker-reserved ``amq.`` exchange unless the route's own text starts with ``amq.``."""
    if not rendered:
        raise ValueError("a value from the message left the exchange name empty (the default exchange)")
    if rendered.startswith("amq.") and not text.prefix.startswith("amq."):
        raise ValueError(f"a value from the message made the exchange {rendered[:60]!r}; "
                         "only the route's own text may name an amq. exchange")
    if not _EXCHANGE_NAME.match(rendered):
        raise ValueError(f"exchange name {rendered[:60]!r} is not valid (letters, digits, - _ . :, ≤ 127)")
    return rendered


def _templated_routing_key(rendered: str, text: TemplateText) -> str:
    """A rendered routing key fits AMQP (≤ 255 bytes, no NUL), names no server-named ``amq.``
    queue the route did not write, and, where the route wrote dotted words
    (``orders.{{ data.region }}``), a value adds no words of its own."""
    if "\0" in rendered:
        raise ValueError("the routing key would contain NUL")
    if len(rendered.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError("the routing key would be longer than 255 bytes")
    if rendered.startswith("amq.") and not text.prefix.startswith("amq."):
        raise ValueError(f"a value from the message made the routing key {rendered[:60]!r}; "
                         "only the route's own text may start it with amq.")
    dots = text.literal.count(".")
    if dots and rendered.count(".") > dots:
        raise ValueError(f"a value from the message added words to the routing key ({rendered[:60]!r}); "
                         "values may not contain '.'")
    return rendered


class AmqpTarget(TargetOptions):
    """Where and how one route target publishes. String values are templates."""

    #: Exchange name ("" is the default exchange: the routing key names the queue).
    exchange: str = ""
    #: Routing key; default: the envelope subject (an MQTT topic's ``/`` become ``.``).
    routing_key: str | None = None
    persistent: bool | None = None
    mandatory: bool | None = None
    priority: int | None = Field(default=None, ge=0, le=255)
    #: Per-message TTL (AMQP ``expiration``).
    expiration: Duration | None = None
    #: AMQP ``type`` property.
    message_type: str | None = None
    #: Default: the envelope's reply_to / correlation_id.
    reply_to: str | None = None
    correlation_id: str | None = None
    #: CloudEvents binary mode: ``cloudEvents:*`` application properties.
    cloudevents: bool = False

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        "exchange": SubstitutionCheck(result=_templated_exchange),
        "routing_key": SubstitutionCheck(result=_templated_routing_key),
    }


# --- inbound ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One consumed message as plain values."""

    body: bytes
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    content_type: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_mode: int | None = None
    priority: int | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    expiration: str | None = None
    message_id: str | None = None
    timestamp: datetime | None = None
    type: str | None = None
    user_id: str | None = None
    app_id: str | None = None


def header_text(value: Any) -> str:
    """An AMQP field value as the envelope's str header value."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=_jsonable, ensure_ascii=False, separators=(",", ":"))
    return "" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def to_envelope(source: str, msg: Delivery, default_content_type: str) -> Envelope:
    """The envelope for one consumed message.

    Subject is the routing key. Attributes ``amqp.exchange``, ``amqp.routing_key``,
    ``amqp.redelivered`` and each property that is set (``amqp.message_id``, ``amqp.type``,
    ``amqp.app_id``, ``amqp.priority``, ``amqp.delivery_mode``, ``amqp.expiration``,
    ``amqp.timestamp``, ``amqp.user_id``); headers = AMQP application headers as text. The
    envelope id is the message id when it has one (stable across redeliveries) or the
    CloudEvents id in binary mode (``cloudEvents:*`` headers, which become ``ce-*`` headers).
    """
    attributes: dict[str, Any] = {"amqp.exchange": msg.exchange, "amqp.routing_key": msg.routing_key,
                                  "amqp.redelivered": msg.redelivered}
    for key in ("message_id", "type", "app_id", "priority", "delivery_mode", "expiration", "user_id"):
        value = getattr(msg, key)
        if value is not None:
            attributes[f"amqp.{key}"] = value
    if msg.timestamp is not None:
        attributes["amqp.timestamp"] = msg.timestamp.isoformat()
    if "x-delivery-count" in msg.headers:
        attributes["amqp.delivery_count"] = msg.headers["x-delivery-count"]
    headers: dict[str, str] = {}
    ce: dict[str, str] = {}
    for key, value in msg.headers.items():
        prefix = next((p for p in _CE_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            ce[key[len(prefix):]] = header_text(value)
        else:
            headers[key] = header_text(value)
    content_type = msg.content_type or default_content_type
    kwargs: dict[str, Any] = {}
    if msg.message_id:
        kwargs["id"] = msg.message_id[:_MAX_ID]
    if media_type(content_type) == "application/cloudevents+json":
        try:
            event = json.loads(msg.body)
            env = from_cloudevent(event, source=source, protocol="amqp") if isinstance(event, dict) else None
        except ValueError:
            env = None
        if env is not None:
            return env.evolve(subject=msg.routing_key, headers={**headers, **env.headers},
                              attributes={**env.attributes, **attributes}, correlation_id=msg.correlation_id,
                              reply_to=msg.reply_to)
    if all(ce.get(k) for k in ("specversion", "id", "source", "type")):
        attributes.update(ce_source=ce["source"], ce_type=ce["type"])
        kwargs["id"] = ce["id"][:_MAX_ID]
    headers.update({f"ce-{k}": v for k, v in ce.items()})
    return Envelope(source=source, protocol="amqp", subject=msg.routing_key, body=msg.body,
                    content_type=content_type, headers=headers, attributes=attributes,
                    correlation_id=msg.correlation_id, reply_to=msg.reply_to, **kwargs)


# --- outbound --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    exchange: str
    routing_key: str
    body: bytes
    mandatory: bool
    properties: dict[str, Any]


def to_publish(env: Envelope, opts: AmqpTarget, *, persistent: bool, mandatory: bool, max_body: int) -> Publish:
    """What to publish for ``env``; raises :class:`PermanentError` when it cannot be published."""
    exchange = opts.exchange
    if not _EXCHANGE_NAME.match(exchange):
        raise PermanentError(f"exchange name {exchange!r} is not valid (letters, digits, - _ . :, ≤ 127)", code=422)
    routing_key = opts.routing_key if opts.routing_key is not None else default_routing_key(env)
    if len(routing_key.encode("utf-8", "surrogatepass")) > 255:
        raise PermanentError("routing key is longer than 255 bytes", code=422)
    if "\0" in routing_key:
        raise PermanentError("routing key contains NUL", code=422)
    if len(env.body) > max_body:
        raise PermanentError(f"body of {len(env.body)} bytes is over the limit of {max_body}", code=413)
    headers: dict[str, Any] = dict(env.headers)
    if opts.cloudevents:
        headers = {k: v for k, v in headers.items() if not k.lower().startswith("ce-")}
        headers.update({f"cloudEvents:{k}": v for k, v in ce_attributes(env).items()})
    props: dict[str, Any] = {
        "content_type": env.content_type,
        "headers": headers,
        "delivery_mode": 2 if (persistent if opts.persistent is None else opts.persistent) else 1,
        "message_id": env.id,
        "timestamp": env.time,
        "app_id": "gateway",
    }
    correlation = opts.correlation_id if opts.correlation_id is not None else env.correlation_id
    if correlation:
        props["correlation_id"] = correlation
    reply_to = opts.reply_to if opts.reply_to is not None else env.reply_to
    if reply_to:
        props["reply_to"] = reply_to
    if opts.expiration is not None:
        props["expiration"] = str(int(opts.expiration * 1000))
    if opts.priority is not None:
        props["priority"] = opts.priority
    if opts.message_type:
        props["type"] = opts.message_type
    return Publish(exchange=exchange, routing_key=routing_key, body=env.body,
                   mandatory=mandatory if opts.mandatory is None else opts.mandatory, properties=props)


def default_routing_key(env: Envelope) -> str:
    """The envelope subject; an MQTT topic becomes dotted (``a/b/c`` → ``a.b.c``) as RabbitMQ's
    MQTT plugin does."""
    if env.protocol == "mqtt":
        return env.subject.replace("/", ".")
    return env.subject


def ce_attributes(env: Envelope) -> dict[str, str]:
    out = {
        "specversion": "1.0", "id": env.id,
        "source": str(env.attributes.get("ce_source", f"/gateway/{env.source}")),
        "type": str(env.attributes.get("ce_type", f"gateway.{env.protocol}.message")),
        "time": env.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
    }
    if env.subject:
        out["subject"] = env.subject
    for key, value in env.headers.items():
        name = key.lower()
        if name.startswith("ce-") and name[3:].isalnum() and name[3:] not in out:
            out[name[3:]] = value
    return out
