"""XMPP config, target options and the pure mapping between message stanzas and envelopes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from slixmpp import JID
from slixmpp.jid import InvalidJID
from slixmpp.plugins.xep_0184.stanza import Request
from slixmpp.plugins.xep_0203.stanza import Delay
from slixmpp.stanza import Message
from slixmpp.xmlstream import register_stanza_plugin

from gateway.sdk import (
    ByteSize,
    ConnectorConfig,
    Duration,
    Envelope,
    Secret,
    SubstitutionCheck,
    TargetOptions,
    TemplateText,
)

# What the client's xep_0184/xep_0203 plugins register; done here too so the mapping works alone.
register_stanza_plugin(Message, Request)
register_stanza_plugin(Message, Delay)

#: Characters a value substituted into a JID template may not contain: they would change the
#: JID's shape (RFC 7622 §3.3.1 forbids them in a localpart; '@' and '/' move the domain).
#: XML 1.0 cannot carry these characters at all; a body with them cannot be sent.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


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


def outgoing_text(body: bytes, limit: int) -> str:
    """The message text for an envelope body; ``ValueError`` when XMPP cannot carry it."""
    if len(body) > limit:
        raise ValueError(f"body of {len(body)} bytes is over max_body ({limit} bytes)")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("body is not UTF-8 text; XMPP messages carry text only") from None
    if _NOT_XML.search(text):
        raise ValueError("body contains control characters that XML cannot carry")
    return text


@dataclass(frozen=True)
class Incoming:
    """The parts of a received message stanza the gateway uses."""

    stanza_id: str
    sender: str  # full JID as the server gave it
    recipient: str
    type: str
    body: str
    thread: str = ""
    subject: str = ""
    room: str = ""
    nick: str = ""
    #: XEP-0203 delay stamp (offline storage, room history), ISO 8601.
    delayed: str = ""
    wants_receipt: bool = False

    @property
    def sender_bare(self) -> str:
        return self.room or JID(self.sender).bare

    @property
    def size(self) -> int:
        return len(self.body.encode("utf-8"))


def incoming(msg: Message, rooms: frozenset[str], own_nick: str) -> Incoming | None:
    """The message to hand to the router, or ``None`` for stanzas that carry none.

    ``None``: no body (chat states, receipts, room subjects), errors, our own echo in a room,
    and groupchat messages from rooms we did not join.
    """
    mtype = msg["type"] or "normal"
    if mtype == "error":
        return None
    body = msg["body"]
    if not body:
        return None
    sender = msg["from"]
    room = nick = ""
    if mtype == "groupchat":
        if sender.bare not in rooms or not sender.resource or sender.resource == own_nick:
            return None
        room, nick = sender.bare, sender.resource
    delay = msg.get_plugin("delay", check=True)
    if mtype == "groupchat" and delay is not None:
        return None  # room history: not a new message
    stamp = delay["stamp"] if delay is not None else None
    return Incoming(
        stanza_id=msg["id"] or "", sender=str(sender), recipient=str(msg["to"]), type=mtype, body=body,
        thread=msg["thread"] or "", subject=msg["subject"] or "", room=room, nick=nick,
        delayed=stamp.isoformat() if stamp is not None else "",
        wants_receipt=mtype != "groupchat" and msg.get_plugin("request_receipt", check=True) is not None,
    )


def to_envelope(inc: Incoming, *, source: str, content_type: str) -> Envelope:
    """subject = the conversation: the sender's bare JID (chat) or the room's JID (groupchat)."""
    attributes: dict[str, Any] = {
        "xmpp.from": inc.sender_bare,
        "xmpp.from_full": inc.sender,
        "xmpp.to": inc.recipient,
        "xmpp.type": inc.type,
        "xmpp.id": inc.stanza_id,
    }
    for key, value in (("xmpp.thread", inc.thread), ("xmpp.subject", inc.subject), ("xmpp.room", inc.room),
                       ("xmpp.nick", inc.nick), ("xmpp.delayed", inc.delayed)):
        if value:
            attributes[key] = value
    return Envelope(source=source, protocol="xmpp", subject=inc.sender_bare, body=inc.body.encode("utf-8"),
                    content_type=content_type, attributes=attributes,
                    reply_to=inc.room or inc.sender_bare)
