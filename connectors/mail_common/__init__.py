"""mail_common — reading and writing RFC 5322 messages for the mail connectors.

Shared by ``smtp`` and ``maildir`` (and by IMAP/POP3 later); pure functions, no IO.

Reading: :func:`parse_message` turns raw message bytes into the parsed view routes see (``data`` of
a ``message/rfc822`` envelope, and ``attributes.email``): decoded headers, the text part, the HTML
part and attachment metadata (names, types, sizes). It never raises: broken MIME (no closing
boundary, bad base64, unknown charsets, hostile nesting) yields what could be read plus ``defects``;
the raw bytes stay the truth. Every value is a plain str/int/list/dict (JSON-ready) with CR, LF and
NUL replaced, so a decoded ``=?utf-8?q?x=0D=0ABcc:…?=`` can never become a header anywhere else.

Writing: :func:`build_mail` makes the message a target's :class:`MailOptions` describe (From,
To, Cc, Bcc, Reply-To, Subject, text and HTML parts, attachments, Message-ID, Date) as wire
bytes with its MAIL FROM and RCPT TO, or passes an inbound ``message/rfc822`` body through
unchanged (``forward``); :func:`build_message` returns the :class:`EmailMessage` itself. Every header value is
checked for CR, LF and NUL first (:class:`HeaderInjection`): Python 3.11's ``email`` does not
refuse them on every path.

Taking mail from a mailbox (``imap``, ``pop3``): :mod:`connectors.mail_common.mailbox` builds the
``auth_check`` verifier and holds :class:`~connectors.mail_common.mailbox.RetryLater`, the signal
that the gateway wants a message offered again later (imported from there: it needs mailauth).
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from connectors.mail_common.build import (
    Attachment,
    BuiltMail,
    HeaderInjection,
    MailError,
    MailOptions,
    build_mail,
    build_message,
    check_header,
    parse_addresses,
    validated_options,
    wants_forward,
)
from connectors.mail_common.parse import (
    ENVELOPE_HEADERS,
    MAX_DEPTH,
    MAX_HEADER_CHARS,
    MAX_HEADERS,
    MAX_PARTS,
    MAX_TEXT_CHARS,
    MESSAGE_RFC822,
    addresses,
    clean,
    decode_header,
    envelope_headers,
    parse_message,
    trace_attributes,
)

__all__ = [
    "ENVELOPE_HEADERS",
    "MAX_DEPTH",
    "MAX_HEADERS",
    "MAX_HEADER_CHARS",
    "MAX_PARTS",
    "MAX_TEXT_CHARS",
    "MESSAGE_RFC822",
    "PARSERS",
    "Attachment",
    "BuiltMail",
    "HeaderInjection",
    "MailError",
    "MailOptions",
    "addresses",
    "build_mail",
    "build_message",
    "check_header",
    "clean",
    "decode_header",
    "envelope_headers",
    "parse_addresses",
    "parse_message",
    "trace_attributes",
    "validated_options",
    "wants_forward",
]

#: The mail kinds' :attr:`~gateway.sdk.Connector.parsers`: envelopes of mail (``message/rfc822``)
#: get their parsed view as ``data``, so routes and templates read data.subject, data.text…
PARSERS: Mapping[str, Callable[[bytes], Any]] = MappingProxyType({MESSAGE_RFC822: parse_message})
