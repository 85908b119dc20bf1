"""The pure mapping between XMPP message stanzas and envelopes (the options are in
:mod:`connectors.xmpp.config`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from slixmpp import JID
from slixmpp.plugins.xep_0184.stanza import Request
from slixmpp.plugins.xep_0203.stanza import Delay
from slixmpp.stanza import Message
from slixmpp.xmlstream import ET, register_stanza_plugin

from gateway.sdk import Envelope, tracecontext

# What the client's xep_0184/xep_0203 plugins register; done here too so the mapping works alone.
register_stanza_plugin(Message, Request)
register_stanza_plugin(Message, Delay)

#: XEP-0131 Stanza Headers and Internet Metadata (SHIM): the trace context travels as
#: ``<headers xmlns='http://jabber.org/protocol/shim'><header name='traceparent'>…</header></headers>``.
SHIM = "http://jabber.org/protocol/shim"
_SHIM_HEADERS = f"{{{SHIM}}}headers"
_SHIM_HEADER = f"{{{SHIM}}}header"
#: SHIM header elements looked at in a received stanza: a hostile one with thousands costs no more.
_MAX_SHIM_HEADERS = 32

#: Characters a value substituted into a JID template may not contain: they would change the
#: JID's shape (RFC 7622 §3.3.1 forbids them in a localpart; '@' and '/' move the domain).
#: XML 1.0 cannot carry these characters at all; a body with them cannot be sent.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


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
    #: The trace context attributes of its SHIM ``traceparent``/``tracestate`` headers, when valid.
    trace: dict[str, str] = field(default_factory=dict)

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
        trace=trace_of(msg),
    )


def trace_of(msg: Message) -> dict[str, str]:
    """The trace context attributes of a stanza's SHIM headers (the first ``traceparent`` and
    ``tracestate``), or none. Read from the XML itself: slixmpp's ``xep_0131`` plugin needs not
    be loaded, and its reading of a repeated header fails."""
    shim = msg.xml.find(_SHIM_HEADERS)
    if shim is None:
        return {}
    found: dict[str, str] = {}
    for n, header in enumerate(shim.iterfind(_SHIM_HEADER)):
        if n >= _MAX_SHIM_HEADERS:
            break
        name = header.get("name", "").lower()
        if name in (tracecontext.TRACEPARENT, tracecontext.TRACESTATE) and name not in found:
            found[name] = header.text or ""
    return tracecontext.inbound_attributes(found) if found else {}


def add_trace(msg: Message, env: Envelope) -> None:
    """Put the trace context of ``env`` (this attempt's) on an outgoing stanza as SHIM headers."""
    fields = tracecontext.outbound_fields(env)
    if not fields:
        return
    shim = ET.SubElement(msg.xml, _SHIM_HEADERS)
    for name, value in fields.items():
        header = ET.SubElement(shim, _SHIM_HEADER, {"name": name})
        header.text = value


def to_envelope(inc: Incoming, *, source: str, content_type: str) -> Envelope:
    """subject = the conversation: the sender's bare JID (chat) or the room's JID (groupchat);
    the SHIM trace context, when the stanza had a valid one, as the ``traceparent``/``tracestate``
    attributes."""
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
    attributes.update(inc.trace)
    return Envelope(source=source, protocol="xmpp", subject=inc.sender_bare, body=inc.body.encode("utf-8"),
                    content_type=content_type, attributes=attributes,
                    reply_to=inc.room or inc.sender_bare)
