"""Building the message a mail target describes, with every header value checked first.

See :mod:`connectors.mail_common` for the contract.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, getaddresses
from typing import Any, ClassVar

from pydantic import Field

from connectors.mail_common.parse import MESSAGE_RFC822
from gateway.sdk import (
    ONE_LINE,
    Envelope,
    Strict,
    SubstitutionCheck,
    Target,
    TargetOptions,
    TemplateText,
    media_type,
    one_line,
    tracecontext,
)


class HeaderInjection(ValueError):
    """A header value would contain CR, LF or NUL."""


class MailError(ValueError):
    """The message cannot be built from these options for this envelope (permanent)."""


class Attachment(Strict):
    """One attachment: ``content`` is a template; omitted, the envelope body as it arrived."""

    filename: str
    content_type: str | None = None
    content: str | None = None


# The literal text after the last template part, when it fixes the domain ("@example.com",
# "@example.com>") or the whole address (" <alerts@example.com>").
_FIXED_TAIL = re.compile(r"(?:<(?P<local>[^<>@\s]+))?@(?P<domain>[^@<>\s]+)>?\s*$")


def _templated_address(rendered: str, text: TemplateText) -> str:
    """A templated address option yields one address (or nothing), in the domain the route's
    literal text fixed (``"{{ data.user }}@example.com"``): a value from a message can never
    add a recipient or move one to another domain."""
    one_line(rendered, text)
    if not rendered.strip():
        return rendered  # adds no address at all
    found = parse_addresses("address", rendered)
    if len(found) != 1:
        raise ValueError(f"a value from the message made {len(found)} addresses where the route has one")
    address = found[0][1]
    fixed = _FIXED_TAIL.search(text.suffix)
    if fixed is not None:
        local, _, domain = address.rpartition("@")
        if domain.lower() != fixed["domain"].lower():
            raise ValueError(f"a value from the message moved the address out of {fixed['domain']}")
        if fixed["local"] is not None and local != fixed["local"]:
            raise ValueError(f"a value from the message changed the address the route wrote "
                             f"({fixed['local']}@{fixed['domain']})")
    return rendered


#: For options holding one address or a list of them: each templated string, one address.
TEMPLATED_ADDRESS = SubstitutionCheck(result=_templated_address)


class MailOptions(TargetOptions):
    """What a mail target builds. Every string is a template rendered per message."""

    #: The From header (``"Ops <gw@example.com>"``); omitted: the connector's ``sender``.
    sender: str | None = None
    #: Recipients; each item may hold several addresses separated by commas.
    to: list[str] | str = Field(default_factory=list)
    cc: list[str] | str = Field(default_factory=list)
    #: Envelope recipients only; never written into the headers.
    bcc: list[str] | str = Field(default_factory=list)
    reply_to: str | None = None
    #: Omitted: the envelope subject (MQTT topic, mail recipient, HTTP path…).
    subject: str | None = None
    #: The text part; omitted (and no ``html``): the envelope body as UTF-8 text.
    text: str | None = None
    html: str | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    #: Omitted: ``<envelope-id.hash@sender-domain>``, the same on every retry.
    message_id: str | None = None
    #: Extra headers (``X-Priority: "1"``); structural headers cannot be set here.
    mail_headers: dict[str, str] = Field(default_factory=dict)
    #: Pass an inbound ``message/rfc822`` body through unchanged. Omitted: forward when the
    #: body is a message and nothing above asks for building a new one.
    forward: bool | None = None

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        **{name: TEMPLATED_ADDRESS for name in ("sender", "to", "cc", "bcc", "reply_to")},
        **{name: ONE_LINE for name in ("subject", "message_id", "mail_headers")},
    }


@dataclass(frozen=True)
class BuiltMail:
    """A message ready to send: wire bytes (CRLF), MAIL FROM and RCPT TO addresses."""

    data: bytes
    sender: str
    recipients: list[str]
    message_id: str
    forwarded: bool
    #: The built message (None when an inbound message is forwarded unchanged).
    message: EmailMessage | None = None
    #: The recipients only in ``bcc`` (not also in ``to`` or ``cc``): no copy that another
    #: recipient gets may name them, so an encrypted message is made for each on its own.
    hidden: tuple[str, ...] = ()


_ADDR = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
_MIME_TYPE = re.compile(r"^[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*$")
_MSG_ID = re.compile(r"^<[^<>\s@]+@[^<>\s@]+>$")
_RESERVED = {"from", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to", "sender", "mime-version",
             "content-type", "content-transfer-encoding", "content-disposition", "received", "return-path",
             "traceparent", "tracestate"}
_SMTP_POLICY = policy.SMTP
_MAIL_TRACE_NAMES = {tracecontext.TRACEPARENT: tracecontext.MAIL_HEADER,
                     tracecontext.TRACESTATE: tracecontext.MAIL_STATE_HEADER}


def check_header(name: str, value: str) -> str:
    """``value`` if it holds no CR, LF or NUL; raises :class:`HeaderInjection` otherwise."""
    for bad in ("\r", "\n", "\0"):
        if bad in value or bad in name:
            raise HeaderInjection(f"{name} would contain {bad!r} (header injection refused)")
    return value


def parse_addresses(field: str, items: list[str] | str | None) -> list[tuple[str, str]]:
    """(display name, address) pairs from option items; raises on injection or bad syntax."""
    if items is None:
        return []
    values = [items] if isinstance(items, str) else list(items)
    out: list[tuple[str, str]] = []
    for item in values:
        check_header(field, item)
        if not item.strip():
            continue
        for name, addr in getaddresses([item]):
            # getaddresses repairs some typos ("a@exa mple.com"); never send to a guess
            if not _ADDR.match(addr) or addr not in item:
                raise MailError(f"{field}: {addr or item!r} is not a valid address")
            out.append((name, addr))
    if len(out) > 500:
        raise MailError(f"{field}: more than 500 addresses")
    return out


def validated_options(target: Target) -> dict[str, Any]:
    """The target's rendered options as plain data, ready to validate.

    The router renders templated options with ``model_copy(update=…)``, which does not
    validate (a templated attachment stays a dict); validating again here closes that gap.
    """
    return target.options.model_dump(warnings=False)


def wants_forward(env: Envelope, opts: MailOptions) -> bool:
    if opts.forward is not None:
        return opts.forward
    if media_type(env.content_type) != MESSAGE_RFC822:
        return False
    return not (opts.subject or opts.text or opts.html or opts.attachments or opts.mail_headers)


def build_mail(env: Envelope, opts: MailOptions, *, route: str, default_sender: str | None,
               require_recipients: bool = True) -> BuiltMail:
    """The message ``opts`` describes for ``env``. Raises :class:`HeaderInjection` / :class:`MailError`."""
    sender_items = parse_addresses("sender", opts.sender or default_sender)
    to = parse_addresses("to", opts.to)
    cc = parse_addresses("cc", opts.cc)
    bcc = parse_addresses("bcc", opts.bcc)
    reply_to = parse_addresses("reply_to", opts.reply_to)
    recipients = list(dict.fromkeys(a for _, a in (*to, *cc, *bcc)))
    visible = {a.lower() for _, a in (*to, *cc)}
    hidden = tuple(dict.fromkeys(a for _, a in bcc if a.lower() not in visible))
    if wants_forward(env, opts):
        if media_type(env.content_type) != MESSAGE_RFC822:
            raise MailError(f"forward needs a message/rfc822 body, not {env.content_type!r}")
        if not recipients:
            rcpt = str(env.attributes.get("rcpt") or "")
            recipients = [a for _, a in parse_addresses("rcpt", rcpt)] if rcpt else []
        sender = sender_items[0][1] if sender_items else str(env.attributes.get("mail_from") or "")
        if sender == "<>":
            sender = ""  # the null sender of a bounce stays null
        check_header("sender", sender)
        if require_recipients and not recipients:
            raise MailError("no recipients: set 'to' (or forward a message that came with one)")
        return BuiltMail(trace_headers(env) + env.body, sender, recipients, "", True, hidden=hidden)
    if not sender_items:
        raise MailError("no sender: set 'sender' on the target or the connector")
    if len(sender_items) != 1:
        raise MailError("sender must be exactly one address")
    if require_recipients and not recipients:
        raise MailError("no recipients: set 'to', 'cc' or 'bcc'")
    name, sender = sender_items[0]
    subject = check_header("subject", opts.subject if opts.subject is not None else env.subject)
    msg = EmailMessage(policy=_SMTP_POLICY)
    msg["From"] = formataddr((name, sender))
    if to:
        msg["To"] = ", ".join(formataddr(a) for a in to)
    if cc:
        msg["Cc"] = ", ".join(formataddr(a) for a in cc)
    if reply_to:
        msg["Reply-To"] = ", ".join(formataddr(a) for a in reply_to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(env.time)
    message_id = _message_id(env, opts, route, sender, recipients)
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Gateway-Envelope-Id"] = env.id
    for name, value in _trace_fields(env):
        msg[name] = value
    for key, value in opts.mail_headers.items():
        check_header(key, value)
        if not _HEADER_NAME.match(key) or key.lower() in _RESERVED or key.lower().startswith("content-"):
            raise MailError(f"mail_headers: {key!r} cannot be set here")
        msg[key] = value
    text = opts.text
    if text is None and opts.html is None:
        text = env.body.decode("utf-8", "replace")
    if text is not None:
        msg.set_content(text)
        if opts.html is not None:
            msg.add_alternative(opts.html, subtype="html")
    elif opts.html is not None:
        msg.set_content(opts.html, subtype="html")
    for att in opts.attachments:
        _attach(msg, env, att if isinstance(att, Attachment) else Attachment.model_validate(att))
    return BuiltMail(msg.as_bytes(), sender, recipients, message_id, False, msg, hidden)


def _trace_fields(env: Envelope) -> list[tuple[str, str]]:
    """The ``Traceparent``/``Tracestate`` header fields of the message sent for ``env`` (the
    context of this attempt). Written before sealing, so DKIM can sign them when a connector's
    ``dkim.headers`` lists them and S/MIME or PGP keeps them in the outer header."""
    return [(_MAIL_TRACE_NAMES[k], v) for k, v in tracecontext.outbound_fields(env).items()]


def trace_headers(env: Envelope) -> bytes:
    """The trace header fields to put on top of a forwarded message, in its own line endings.
    On top, as ``Received`` is: the sender's own ``Traceparent`` stays below, so a DKIM signature
    that covers it still verifies, and a reader takes the topmost."""
    fields = _trace_fields(env)
    if not fields:
        return b""
    eol = b"\r\n" if b"\r\n" in env.body[:8192] or b"\n" not in env.body[:8192] else b"\n"
    # The values are what tracecontext.parse accepted: hex and printable ASCII, one line.
    return b"".join(f"{name}: {value}".encode("ascii", "replace") + eol for name, value in fields)


def build_message(env: Envelope, opts: MailOptions, *, route: str, default_sender: str | None) -> EmailMessage:
    """The :class:`EmailMessage` the options describe (never a forward), every header checked."""
    built = build_mail(env, opts.model_copy(update={"forward": False}), route=route, default_sender=default_sender,
                       require_recipients=False)
    assert built.message is not None
    return built.message


def _message_id(env: Envelope, opts: MailOptions, route: str, sender: str, recipients: list[str]) -> str:
    if opts.message_id:
        mid = check_header("message_id", opts.message_id.strip())
        if not _MSG_ID.match(mid):
            raise MailError(f"message_id {mid!r} is not of the form <left@right>")
        return mid
    # Stable across retries (the envelope id is), distinct per route and recipient set.
    digest = hashlib.sha256(f"{route}|{','.join(sorted(recipients))}".encode()).hexdigest()[:10]
    return f"<{env.id}.{digest}@{sender.rpartition('@')[2]}>"


def _attach(msg: EmailMessage, env: Envelope, att: Attachment) -> None:
    filename = check_header("attachment filename", att.filename).replace("\\", "/").rsplit("/", 1)[-1]
    if not filename:
        raise MailError("attachment filename is empty")
    if att.content is None:
        data = env.body
        ctype = att.content_type or media_type(env.content_type) or "application/octet-stream"
    else:
        data = att.content.encode("utf-8")
        ctype = att.content_type or "text/plain"
    check_header("attachment content_type", ctype)
    ctype = media_type(ctype)
    if not _MIME_TYPE.match(ctype):
        raise MailError(f"attachment content_type {ctype!r} is not a MIME type")
    maintype, subtype = ctype.split("/", 1)
    if maintype == "text" and att.content is not None:
        # bytes, not str: the attachment keeps exactly the rendered content (no added newline)
        msg.add_attachment(data, maintype="text", subtype=subtype, filename=filename, params={"charset": "utf-8"})
    elif maintype in ("message", "multipart"):
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=filename)
    else:
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
