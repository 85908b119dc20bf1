"""The AMQP connector's configuration: its options (exchanges, the queue consumed) and a route
target's, with the checks of templated exchange names and routing keys (see :mod:`connectors.amqp`).
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from connectors.broker_common.config import BrokerConfig, BrokerTls
from gateway.sdk import (
    ByteSize,
    Duration,
    Strict,
    SubstitutionCheck,
    TargetOptions,
    TemplateText,
)

__all__ = ["AmqpConfig", "AmqpTarget", "AmqpTls", "Binding", "ExchangeSpec", "QueueSpec"]

_EXCHANGE_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{0,127}$")
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
