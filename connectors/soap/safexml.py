"""Hardened XML parsing for everything that arrives from outside (requests and replies).

Checked *before* the parser sees a byte: the size, the encoding (UTF-8 only), any markup
declaration (``<!DOCTYPE``, ``<!ENTITY``: refused, so no XXE and no entity expansion can
happen) and the nesting depth (a regex scan over the tags). Then lxml parses with entities,
DTD loading and network access off and libxml2's own limits on (``huge_tree`` stays off).
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

#: Tag-ish tokens: comments, CDATA and processing instructions are skipped whole; other markup
#: declarations (``<!DOCTYPE``, ``<!ENTITY``…) are reported; start/end/empty tags move the depth.
_TOKENS = re.compile(
    rb"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>|(<!)|<(/?)[^\s/>!?](?:[^>\"']|\"[^\"]*\"|'[^']*')*?(/?)>",
    re.S,
)
_DECLARED_ENCODING = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_UTF8_NAMES = {b"utf-8", b"utf8", b"us-ascii", b"ascii"}


class XmlRejected(ValueError):
    """The input is not acceptable XML. ``status`` is the HTTP-style class (400 or 413)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def precheck(body: bytes, *, max_bytes: int, max_depth: int) -> None:
    """Refuse what must never reach the parser. Linear in the body; no tree is built."""
    if len(body) > max_bytes:
        raise XmlRejected(f"the XML is {len(body)} bytes; the limit is {max_bytes}", 413)
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]:
        raise XmlRejected("only UTF-8 XML is accepted")
    declared = _DECLARED_ENCODING.match(body[:200].lstrip(b"\xef\xbb\xbf"))
    if declared and declared.group(1).lower() not in _UTF8_NAMES:
        raise XmlRejected(f"only UTF-8 XML is accepted (declared {declared.group(1).decode('ascii')!r})")
    if b"<!" in body or body.count(b"<") > max_depth:
        _scan(body, max_depth)


def _scan(body: bytes, max_depth: int) -> None:
    depth = 0
    for m in _TOKENS.finditer(body):
        if m.group(1):
            raise XmlRejected("DTDs and entity declarations are not allowed")
        closing, empty = m.group(2), m.group(3)
        if closing is None:
            continue  # comment, CDATA or processing instruction
        if closing:
            depth -= 1
            continue
        if depth + 1 > max_depth:
            raise XmlRejected(f"the XML is nested deeper than {max_depth} levels")
        if not empty:
            depth += 1


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False)


def parse(body: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """The root element of ``body``, or :class:`XmlRejected`."""
    precheck(body, max_bytes=max_bytes, max_depth=max_depth)
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as exc:
        raise XmlRejected(f"not well-formed XML: {exc.msg}") from None
    if root is None:
        raise XmlRejected("empty XML document")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XmlRejected("DTDs and entity declarations are not allowed")
    return root


def parse_fragment(text: str, *, max_bytes: int = 1024 * 1024, max_depth: int = 64) -> Any:
    """One element given as a string (``_any`` content in JSON), parsed as hardened as a request."""
    try:
        return parse(text.encode("utf-8"), max_bytes=max_bytes, max_depth=max_depth)
    except XmlRejected as exc:
        raise ValueError(exc.reason) from None
