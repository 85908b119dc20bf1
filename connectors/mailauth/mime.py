"""Byte-level MIME helpers shared by verification and sealing: header blocks, CRLF, 7-bit bodies.

Signatures cover exact bytes, so these functions touch only what they must: a message's header
fields are kept as they arrived (folding included), and a body is re-encoded only when it is
not 7-bit clean (RFC 8551 3.1.2, RFC 3156 3: signed content must survive any relay).
"""

from __future__ import annotations

import base64
import quopri
import re
import secrets
from email import policy
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser
from io import BytesIO

_NEWLINES = re.compile(rb"\r\n|\r|\n")
_COMPAT_CRLF = policy.compat32.clone(linesep="\r\n")
#: RFC 5322 2.1.1: lines of at most 998 octets (CRLF excluded).
MAX_LINE = 998


def to_crlf(data: bytes) -> bytes:
    """Every line ending (LF, CR or CRLF) as CRLF."""
    return _NEWLINES.sub(b"\r\n", data)


def split_head(raw: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each with its continuation lines and line endings; the rest of the
    message from the empty line on, or ``b""`` when there is no body)."""
    fields: list[bytes] = []
    pos, size = 0, len(raw)
    while pos < size:
        end = raw.find(b"\n", pos)
        line = raw[pos:] if end == -1 else raw[pos:end + 1]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
        pos += len(line)
    return fields, raw[pos:]


def field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    """The unfolded value of one header field."""
    value = field.split(b":", 1)[1] if b":" in field else b""
    return _NEWLINES.sub(b"", value).decode("utf-8", "replace").strip()


def is_content_field(field: bytes) -> bool:
    name = field_name(field)
    return name.startswith("content-") or name == "mime-version"


def split_entity(raw: bytes) -> tuple[list[bytes], list[bytes], bytes]:
    """A CRLF message as (outer header fields, its Content-* fields, body after the empty line).

    The Content-* fields and the body make the MIME entity that gets signed or encrypted; the
    other fields (From, To, Subject…) stay outside. MIME-Version belongs to neither: the sealed
    message gets its own.
    """
    fields, rest = split_head(raw)
    outer = [f for f in fields if not is_content_field(f)]
    content = [f for f in fields if is_content_field(f) and field_name(f) != "mime-version"]
    body = rest[2:] if rest.startswith(b"\r\n") else rest
    return outer, content, body


def _clean_7bit(body: bytes) -> bool:
    if any(b > 127 or b == 0 for b in body):
        return False
    return all(len(line) <= MAX_LINE for line in body.split(b"\r\n"))


def entity_7bit(content: list[bytes], body: bytes) -> bytes:
    """The MIME entity (CRLF, 7-bit) made of ``content`` header fields and ``body``.

    A 7-bit clean body passes byte for byte. Otherwise each leaf part in 8bit or binary is
    re-encoded: text as quoted-printable, anything else as base64. Content is unchanged.
    """
    if not content:
        content = [b"Content-Type: text/plain; charset=us-ascii\r\n"]
    if _clean_7bit(body):
        return b"".join(content) + b"\r\n" + body
    msg = BytesParser(policy=policy.compat32).parsebytes(b"".join(content) + b"\r\n" + body)
    for part in msg.walk():
        if part.is_multipart():
            continue
        _encode_leaf(part)
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=_COMPAT_CRLF).flatten(msg)
    return to_crlf(out.getvalue())


def _encode_leaf(part: Message) -> None:
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if cte in ("base64", "quoted-printable"):
        return
    data = part.get_payload(decode=True)
    raw = data if isinstance(data, bytes) else b""
    if cte == "7bit" and _clean_7bit(to_crlf(raw)):
        return
    del part["Content-Transfer-Encoding"]
    if part.get_content_maintype() == "text":
        encoded = quopri.encodestring(to_crlf(raw).replace(b"\r\n", b"\n"))
        part["Content-Transfer-Encoding"] = "quoted-printable"
    else:
        encoded = base64.encodebytes(raw)
        part["Content-Transfer-Encoding"] = "base64"
    part.set_payload(encoded.decode("ascii"))


def message_7bit(raw: bytes) -> bytes:
    """A CRLF message whose body is 7-bit clean (:func:`entity_7bit`), for a relay without
    8BITMIME (RFC 6152). A clean body passes unchanged; header fields are never touched
    (8-bit ones need SMTPUTF8, not a different transfer encoding)."""
    raw = to_crlf(raw)
    outer, content, body = split_entity(raw)
    if _clean_7bit(body):
        return raw
    return assemble(outer, entity_7bit(content, body))


def boundary(body: bytes) -> str:
    """A multipart boundary that occurs nowhere in ``body``."""
    while True:
        candidate = f"=_gw_{secrets.token_hex(12)}"
        if candidate.encode("ascii") not in body:
            return candidate


def base64_lines(data: bytes) -> bytes:
    """Base64 in 76-character CRLF lines (RFC 2045 6.8)."""
    return to_crlf(base64.encodebytes(data))


def multipart(content_type: str, parts: list[bytes], preamble: bytes = b"") -> bytes:
    """A multipart entity (header + body, CRLF) whose parts are the given entities, unchanged.

    ``content_type`` is the type with its parameters but no boundary.
    """
    joined = b"".join(parts)
    mark = boundary(joined)
    body = preamble
    for part in parts:
        body += f"--{mark}\r\n".encode("ascii") + part + b"\r\n"
    body += f"--{mark}--\r\n".encode("ascii")
    head = f"Content-Type: {content_type};\r\n\tboundary=\"{mark}\"\r\n".encode("ascii")
    return head + b"\r\n" + body


def assemble(outer: list[bytes], entity: bytes) -> bytes:
    """The message: the outer header fields, MIME-Version, then the entity's own header and body."""
    return b"".join(outer) + b"MIME-Version: 1.0\r\n" + entity
