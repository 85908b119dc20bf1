"""The XMPP connector's configuration: its options and a route target's, with the JID checks
they share with the outbound side (see :mod:`connectors.xmpp`)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from slixmpp import JID
from slixmpp.jid import InvalidJID

from gateway.sdk import (
    ByteSize,
    ConnectorConfig,
    Duration,
    Secret,
    SubstitutionCheck,
    TargetOptions,
    TemplateText,
)

__all__ = ["XmppConfig", "XmppTarget", "parse_jid"]


def parse_jid(value: str, *, what: str = "JID") -> JID:
    try:
        jid = JID(value)
    except InvalidJID as exc:
        raise ValueError(f"{what} {value!r} is not a valid JID: {exc}") from None
    if not jid.domain:
        raise ValueError(f"{what} {value!r} has no domain")
    return jid


class XmppConfig(ConnectorConfig):
    type: Literal["xmpp"] = "xmpp"
    #: The gateway's account, ``user@domain`` (a ``/resource`` is optional; the server picks one).
    jid: str
    password: Secret
    #: Server to connect to; default: the JID's domain (port 5222, or 5223 for direct TLS).
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    #: ``starttls`` (required, never falls back to plain) or ``direct`` (XEP-0368 TLS from the first byte).
    tls: Literal["starttls", "direct"] = "starttls"
    #: CA bundle to verify the server's certificate with (default: the system's).
    ca_file: str | None = None
    #: Multi-user chat rooms (``room@conference.example.com``) to join: their messages are
    #: received (inbound) and targets may post to them with ``type: groupchat``.
    rooms: list[str] = Field(default_factory=list)
    nick: str = Field(default="gateway", min_length=1, max_length=64)
    #: Content type of inbound envelopes (the body is the message text, UTF-8).
    content_type: str = "text/plain; charset=utf-8"
    #: Largest message body taken in (refused with ``not-acceptable``) or sent (permanent error).
    max_body: ByteSize = 64 * 1024
    #: Largest stanza read from the server; a bigger one ends the stream (memory stays bounded).
    max_stanza: ByteSize = 1024 * 1024
    #: Inbound messages waiting for their outcome at once; beyond it the socket is not read.
    max_inflight: int = Field(default=16, ge=1, le=400)
    connect_timeout: Duration = 10.0
    #: How long ``send`` waits for the server to acknowledge a stanza.
    ack_timeout: Duration = 10.0

    @field_validator("jid")
    @classmethod
    def _jid(cls, v: str) -> str:
        jid = parse_jid(v, what="jid")
        if not jid.user:
            raise ValueError(f"jid {v!r} needs a user part (user@domain)")
        return v

    @field_validator("rooms")
    @classmethod
    def _rooms(cls, v: list[str]) -> list[str]:
        out = []
        for room in v:
            jid = parse_jid(room, what="room")
            if not jid.user or jid.resource:
                raise ValueError(f"room {room!r} must be a bare room JID (room@conference.example.com)")
            out.append(jid.bare)
        return out


def _templated_jid(rendered: str, text: TemplateText) -> str:
    """A rendered ``to`` is exactly one JID with a user part, in the domain the route's text
    fixed (``"{{ data.user }}@example.com"``), with a resource only where the route wrote a
    ``/`` or left the whole JID to the message."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"a value from the message would change the shape of the JID {rendered[:80]!r} ({why})")

    try:
        jid = JID(rendered)
    except InvalidJID as exc:
        raise refuse(f"not a valid JID: {exc}") from None
    if not jid.user or not jid.domain:
        raise refuse("it needs user@domain")
    suffix, prefix = text.suffix, text.prefix
    if "@" in suffix:
        fixed_domain = suffix.rpartition("@")[2].partition("/")[0].lower()
        if jid.domain != fixed_domain:
            raise refuse(f"the route fixed the domain {fixed_domain}")
    if "@" in prefix and "/" in prefix.partition("@")[2]:
        fixed_bare = prefix.partition("/")[0].lower()
        if jid.bare != fixed_bare:
            raise refuse(f"the route fixed {fixed_bare}")
    if jid.resource and text.literal and "/" not in text.literal:
        raise refuse("a resource the route did not write")
    return rendered


class XmppTarget(TargetOptions):
    #: Recipient: a user's JID, or a room's JID with ``type: groupchat`` (the room must be in ``rooms``).
    to: str
    type: Literal["chat", "normal", "headline", "groupchat"] = "chat"
    #: Optional message subject.
    subject: str | None = None

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {"to": SubstitutionCheck(result=_templated_jid)}

    @model_validator(mode="after")
    def _room_subject(self) -> XmppTarget:
        if self.type == "groupchat" and self.subject is not None:
            raise ValueError("a groupchat message has no subject (in a room it would change the room's topic)")
        return self
