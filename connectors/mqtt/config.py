"""The MQTT connector's configuration: its options and a route target's, with the topic and
filter rules they check (see :mod:`connectors.mqtt`). The publish side checks rendered topics
with the same :func:`topic_error`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from connectors.broker_common.config import BrokerConfig, BrokerTls
from gateway.sdk import (
    ByteSize,
    Duration,
    Strict,
    SubstitutionCheck,
    TargetOptions,
    TemplateText,
)

__all__ = ["MqttConfig", "MqttTarget", "MqttTls", "StatusTopic", "Subscription", "filter_error", "topic_error"]

#: MQTT allows 268,435,455 bytes per packet.
MQTT_MAX_PACKET = 268_435_455
_TEMPLATE_EXPR = re.compile(r"\{\{.*?\}\}", re.DOTALL)


class MqttTls(BrokerTls):
    pass  # the fields are BrokerTls's; the name is what validation errors and the JSON schema show


class Subscription(Strict):
    filter: str
    qos: Literal[0, 1, 2] | None = None


class StatusTopic(Strict):
    """Retained presence: ``online`` after each connect, ``offline`` as the last will."""

    topic: str
    online: str = "online"
    offline: str = "offline"
    qos: Literal[0, 1, 2] = 1
    retain: bool = True


class MqttConfig(BrokerConfig):
    # from BrokerConfig: connect_timeout, reconnect_min, reconnect_max, username, password
    type: Literal["mqtt"] = "mqtt"
    #: ``mqtt://host:1883`` or ``mqtts://host:8883`` (TLS). Credentials never go in the URL.
    url: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["3.1.1", "5"] = "5"
    #: Fixed client id so the broker keeps the session across restarts. Default:
    #: ``gateway-<connector name>``; give each replica its own (and use ``share``). With several
    #: worker processes (``gateway.workers``) each adds ``-w<index>`` to it.
    client_id: str | None = None
    tls: MqttTls | None = None
    #: Topic filters (``+``/``#`` wildcards) to receive from, as strings or {filter, qos}.
    subscribe: list[str | Subscription] = Field(default_factory=list)
    #: Shared-subscription group: subscribe as ``$share/<group>/<filter>`` so replicas split the load.
    #: With several worker processes and no group here, they share ``gateway-<connector name>``.
    share: str | None = None
    #: Default QoS for subscriptions and publishes.
    qos: Literal[0, 1, 2] = 1
    #: False (default) keeps a persistent session: messages queued while the gateway is away
    #: are delivered when it comes back.
    clean_start: bool = False
    #: MQTT 5 session expiry after a disconnect (3.1.1 sessions never expire).
    session_expiry: Duration = 86400.0
    keepalive: int = Field(default=30, ge=5, le=65535)
    #: In-flight bound both ways: MQTT 5 Receive Maximum for deliveries to the gateway, and the
    #: number of unacknowledged publishes from it.
    max_inflight: int = Field(default=256, ge=1, le=65535)
    #: Largest payload the gateway accepts or publishes; larger inbound ones go to the dead letters.
    max_payload: ByteSize = 1024 * 1024
    #: Content type of inbound payloads that carry none (MQTT 3.1.1, or no MQTT 5 content type).
    content_type: str = "application/octet-stream"
    status: StatusTopic | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("url must look like mqtt://host:1883 or mqtts://host:8883")
        if parts.username or parts.password:
            raise ValueError("credentials never go in the url: use username and password: \"${MQTT_PASSWORD}\"")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("an MQTT url has no path or query")
        return v

    @field_validator("share")
    @classmethod
    def _share(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/+#\0")):
            raise ValueError("a share group is a non-empty name without '/', '+', '#'")
        return v

    @field_validator("subscribe")
    @classmethod
    def _filters(cls, v: list[str | Subscription]) -> list[str | Subscription]:
        for item in v:
            f = item if isinstance(item, str) else item.filter
            err = filter_error(f)
            if err:
                raise ValueError(f"subscribe {f!r}: {err}")
        return v

    @field_validator("max_payload")
    @classmethod
    def _max_payload(cls, v: int) -> int:
        if not 0 < v <= 256 * 1024 * 1024:
            raise ValueError("max_payload must be between 1 byte and 256MiB")
        return v

    @property
    def use_tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.tls is not None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.use_tls else 1883)

    def subscriptions(self, share: str | None = None) -> list[tuple[str, int]]:
        """(full filter incl. ``$share/...``, qos) for every configured subscription; ``share`` is
        the group when ``share:`` is not configured (the worker processes of one gateway)."""
        out: list[tuple[str, int]] = []
        group = self.share or share
        for item in self.subscribe:
            f, q = (item, None) if isinstance(item, str) else (item.filter, item.qos)
            if group:
                f = f"$share/{group}/{f}"
            out.append((f, self.qos if q is None else q))
        return out

    @property
    def max_packet(self) -> int:
        """MQTT 5 Maximum Packet Size we announce: twice the payload limit plus room for the
        topic and properties, so an oversized payload still reaches us (and the dead letters)
        while memory stays bounded."""
        return min(MQTT_MAX_PACKET, 2 * self.max_payload + 64 * 1024)


def filter_error(f: str) -> str | None:
    if not f:
        return "a topic filter cannot be empty"
    if "\0" in f:
        return "NUL is not allowed in a topic filter"
    if f.startswith("$share/"):
        return "use the 'share' option instead of writing $share/ yourself"
    if len(f.encode("utf-8", "surrogatepass")) > 65535:
        return "a topic filter is at most 65535 bytes"
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one (e.g. 'plant/#')"
        if "+" in level and level != "+":
            return "'+' must be a whole level (e.g. 'plant/+/alert')"
    return None


def _templated_topic(rendered: str, text: TemplateText) -> str:
    """A rendered topic starts with ``$`` (``$SYS/…``, ``$share/…``: the broker's own topics)
    only when the route wrote the ``$``, and never holds a wildcard, NUL or a control character."""
    if rendered.startswith("$") and not text.prefix.startswith("$"):
        raise ValueError(f"a value from the message made the topic start with '$' ({rendered[:60]!r}); "
                         "only the route's own text may name a $ topic")
    err = topic_error(rendered)
    if err:
        raise ValueError(err)
    return rendered


class MqttTarget(TargetOptions):
    """Where and how one route target publishes. String values are templates."""

    #: Topic template, e.g. ``plant/{{ data.site }}/alert``. Each ``{{ }}`` value must stay
    #: within its level: no ``/``, ``+``, ``#`` or NUL (see ``topic_levels``).
    topic: str
    qos: Literal[0, 1, 2] | None = None
    retain: bool = False
    #: MQTT 5 response topic (default: the envelope's reply_to).
    response_topic: str | None = None
    #: MQTT 5 correlation data (default: the envelope's correlation_id).
    correlation_data: str | None = None
    #: MQTT 5 message expiry.
    message_expiry: Duration | None = None
    #: How many levels the rendered topic has: computed from the template when omitted
    #: (so a value cannot add levels); ``any`` lets values contain ``/``.
    topic_levels: int | Literal["any"] | None = None
    #: Send CloudEvents binary mode: context attributes as MQTT 5 user properties.
    cloudevents: bool = False

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        "topic": SubstitutionCheck(result=_templated_topic),
        "response_topic": SubstitutionCheck(result=_templated_topic),
    }

    @model_validator(mode="before")
    @classmethod
    def _levels(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("topic"), str):
            return data
        topic = data["topic"]
        templated = "{{" in topic or "{%" in topic
        if templated and data.get("topic_levels") is None:
            if "{%" in topic:
                raise ValueError("a topic with {% %} blocks needs topic_levels (a number, or 'any')")
            data = {**data, "topic_levels": _TEMPLATE_EXPR.sub("x", topic).count("/") + 1}
        elif not templated:
            err = topic_error(topic)
            if err:
                raise ValueError(f"topic {topic!r}: {err}")
        return data


def topic_error(topic: str, levels: int | str | None = None) -> str | None:
    """Why ``topic`` cannot be published to, or None."""
    if len(topic) <= 512:  # most routes publish to a few short topics, again and again
        return _checked_topic(topic, levels)
    return _topic_error(topic, levels)


@functools.lru_cache(maxsize=4096)
def _checked_topic(topic: str, levels: int | str | None) -> str | None:
    return _topic_error(topic, levels)


def _topic_error(topic: str, levels: int | str | None) -> str | None:
    if not topic:
        return "the topic is empty"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "the topic is not valid UTF-8"
    if size > 65535:
        return "the topic is longer than 65535 bytes"
    if "+" in topic or "#" in topic:
        return "the topic contains a wildcard ('+' or '#')"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic):
        return "the topic contains NUL or a control character"
    if isinstance(levels, int) and topic.count("/") + 1 != levels:
        return (f"a substituted value changed the number of topic levels ({topic.count('/') + 1} instead of "
                f"{levels}); set topic_levels: any to allow '/' in values")
    return None
