"""Reading RFC 5322 messages into the parsed view routes see (``attributes.email``); never raises.

See :mod:`connectors.mail_common` for what the view holds and what it guarantees.
"""

from __future__ import annotations

import codecs
import email.header
import functools
import re
from email import policy
from email.message import Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any

from gateway.sdk import tracecontext

#: Parts examined per message; the rest is reported as ``truncated``.
MAX_PARTS = 500
#: Deepest multipart nesting walked.
MAX_DEPTH = 32
#: Characters of the text and HTML parts kept in the parsed view.
MAX_TEXT_CHARS = 256 * 1024
#: Headers kept in the parsed view, and characters per header value.
MAX_HEADERS = 200
MAX_HEADER_CHARS = 8 * 1024
#: Headers of an inbound message copied into the envelope's ``headers``
#: (with every ``x-*`` header), lower-cased.
ENVELOPE_HEADERS = ("subject", "from", "to", "cc", "reply-to", "date", "message-id", "in-reply-to", "references")

MESSAGE_RFC822 = "message/rfc822"

_PARSER = BytesParser(policy=policy.compat32)
_HEADER_PARSER = BytesHeaderParser(policy=policy.compat32)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]+")
_FOLD = re.compile(r"\r?\n[ \t]+")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``a@b.c``, ``<a@b.c>`` or ``Plain Name <a@b.c>``: one address, no quotes, comments or groups.
_SIMPLE_ADDRESS = re.compile(
    rf"^[ \t]*(?:[A-Za-z0-9 \t.'-]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    rf"|({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))[ \t]*$")


def clean(text: str, limit: int = MAX_HEADER_CHARS) -> str:
    """One line of valid Unicode: CR, LF, NUL and other control characters become a space.

    Raw 8-bit bytes that the parser kept as surrogates are decoded as UTF-8 (or replaced), so
    the result always encodes (JSON, the spool, logs).
    """
    if not text.isascii():
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    if text.isprintable():  # no control character at all (the common case): nothing to replace
        return text[:limit].strip()
    return _CONTROL.sub(" ", text)[:limit].strip()


def decode_header(name: str, value: Any) -> str:
    """A header value as readable text (RFC 2047 words and raw UTF-8 decoded), on one line."""
    raw = str(value)
    if raw.isascii() and "=?" not in raw:
        return clean(_FOLD.sub(" ", raw) if "\n" in raw else raw)
    try:
        decoded = str(policy.default.header_factory(name, clean(raw)))
    except Exception:  # e.g. an encoded word that decodes to CR LF in an address header
        decoded = _decode_words(clean(raw))
    return clean(decoded)


def _decode_words(raw: str) -> str:
    try:
        parts = email.header.decode_header(raw)
    except Exception:
        return raw
    out = []
    for chunk, charset in parts:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "raw-unicode-escape", "replace"))
        except LookupError:
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def addresses(value: str) -> list[str]:
    """The addr-specs in a raw address header (display names dropped, empties skipped).

    Parsed from the raw value: encoded words belong in display names only, so decoding first
    could only let a display name pose as an address.
    """
    if not value:
        return []
    simple = _SIMPLE_ADDRESS.match(value)
    if simple is not None:  # the common case, without the general parser's cost
        return [simple.group(1) or simple.group(2)]
    return [clean(addr, 320) for _, addr in getaddresses([_FOLD.sub(" ", value)]) if "@" in addr][:100]


def parse_message(raw: bytes) -> dict[str, Any]:
    """The parsed view of one RFC 5322 message; never raises."""
    defects: list[str] = []
    truncated = False
    try:
        msg: Message = _PARSER.parsebytes(raw)
    except Exception as exc:  # RecursionError on hostile nesting, or a parser bug
        defects.append(f"unparsable structure ({type(exc).__name__})")
        try:
            msg = _HEADER_PARSER.parsebytes(raw)
        except Exception:
            msg = Message()
        msg.set_payload("")
    headers: dict[str, str] = {}
    raw_headers: dict[str, str] = {}
    for count, (name, value) in enumerate(msg.raw_items()):
        if count >= MAX_HEADERS:
            truncated = True
            break
        key = clean(name, 100).lower()
        if key and key not in headers:
            headers[key] = decode_header(key, value)
            raw_headers[key] = str(value)
    view: dict[str, Any] = {
        "subject": headers.get("subject", ""),
        "from": next(iter(addresses(raw_headers.get("from", ""))), ""),
        "to": addresses(raw_headers.get("to", "")),
        "cc": addresses(raw_headers.get("cc", "")),
        "reply_to": addresses(raw_headers.get("reply-to", "")),
        "message_id": headers.get("message-id", "").strip("<>"),
        "date": _iso_date(headers.get("date", "")),
        "headers": headers,
        "text": None,
        "html": None,
        "attachments": [],
        "size": len(raw),
    }
    parts = 0
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        parts += 1
        if parts > MAX_PARTS:
            truncated = True
            break
        ctype = _content_type(part)
        if ctype == MESSAGE_RFC822 or (part.is_multipart() and not ctype.startswith("multipart/")):
            view["attachments"].append(_attachment(part, ctype, _embedded_size(part)))
            continue
        if part.is_multipart():
            defects.extend(type(d).__name__ for d in getattr(part, "defects", ()))
            if depth >= MAX_DEPTH:
                truncated = True
                continue
            children = [p for p in part.get_payload() if isinstance(p, Message)]
            stack.extend((child, depth + 1) for child in reversed(children))
            continue
        try:
            payload = part.get_payload(decode=True)
        except Exception:
            payload = None
            defects.append("undecodable payload")
        defects.extend(type(d).__name__ for d in getattr(part, "defects", ()))  # decoding adds some
        data = payload if isinstance(payload, bytes) else b""
        disposition = part.get_content_disposition()
        if disposition != "attachment" and ctype in ("text/plain", "text/html"):
            key = "text" if ctype == "text/plain" else "html"
            if view[key] is None:
                text = _decode_text(data, _charset(part))
                if len(text) > MAX_TEXT_CHARS:
                    text, truncated = text[:MAX_TEXT_CHARS], True
                view[key] = text
                continue
        if part is msg and disposition is None:
            disposition = "inline"  # a single-part message that is not text: the body itself
        view["attachments"].append(_attachment(part, ctype, len(data), disposition))
    view["defects"] = sorted(set(defects))[:20]
    view["truncated"] = truncated
    return view


def trace_attributes(view: dict[str, Any]) -> dict[str, str]:
    """The envelope's trace context attributes for an inbound message: its ``Traceparent`` (and
    ``Tracestate``) header when valid, else none (the message starts a new trace). The topmost
    one counts: a gateway that forwards a message adds its own above the sender's."""
    return tracecontext.inbound_attributes(view.get("headers") or {})


def envelope_headers(view: dict[str, Any]) -> dict[str, str]:
    """The envelope ``headers`` for an inbound message: the common ones plus every ``x-*``."""
    headers: dict[str, str] = view.get("headers") or {}
    return {k: v for k, v in headers.items() if k in ENVELOPE_HEADERS or k.startswith("x-")}


def _content_type(part: Message) -> str:
    try:
        return clean(part.get_content_type(), 200).lower()
    except Exception:
        return "application/octet-stream"


def _attachment(part: Message, ctype: str, size: int, disposition: str | None = None) -> dict[str, Any]:
    try:
        filename = part.get_filename()
    except Exception:
        filename = None
    name = ""
    if filename:
        name = decode_header("filename", filename)
        name = name.replace("\\", "/").rsplit("/", 1)[-1]  # metadata, never a path
    return {"filename": name, "content_type": ctype, "size": size,
            "disposition": disposition or part.get_content_disposition() or "attachment"}


def _embedded_size(part: Message) -> int:
    try:
        return sum(len(p.as_bytes()) for p in part.get_payload() if isinstance(p, Message))
    except Exception:
        return 0


def _decode_text(data: bytes, charset: str | None) -> str:
    name = charset or "utf-8"
    try:
        codecs.lookup(name)
    except LookupError:
        name = "utf-8"
    try:
        text = data.decode(name)
    except (UnicodeDecodeError, LookupError):
        text = data.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def _charset(part: Message) -> str | None:
    """``part.get_content_charset()``, which parses the Content-Type parameters each time (about
    20 µs): the same few Content-Type values come again and again, so their charsets are kept."""
    value = part.get("content-type")
    if value is None:
        return None
    text = str(value)
    # Only short values are kept: a hostile sender's megabyte-long headers must not fill memory.
    return _charset_of(text) if len(text) <= _KEPT_VALUE_CHARS else _read_charset(text)


#: Longest header value whose parsed form is kept (Content-Type charsets, Date values).
_KEPT_VALUE_CHARS = 256


def _read_charset(content_type: str) -> str | None:
    probe = Message()
    probe["Content-Type"] = content_type
    return probe.get_content_charset()


_charset_of = functools.lru_cache(maxsize=512)(_read_charset)


def _iso_date(value: str) -> str | None:
    """The Date header in ISO 8601, or None. A burst of mail mostly shares its Date values (one
    per second), so short ones are kept."""
    return _kept_iso_date(value) if len(value) <= _KEPT_VALUE_CHARS else _read_iso_date(value)


def _read_iso_date(value: str) -> str | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).isoformat()
    except (TypeError, ValueError, IndexError):
        return None


_kept_iso_date = functools.lru_cache(maxsize=512)(_read_iso_date)
