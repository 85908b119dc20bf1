"""Hardened XML parsing for everything that arrives from outside (requests, replies, ``_any`` strings).

One linear pass, in this order, each refusal an :class:`XmlRejected` with the reason the caller
is told:

* before the parser sees a byte: the size (413), the encoding (UTF-8 only), the number of tags
  (413: the tree costs about 120 bytes a node, so this bounds the memory a body can claim), and
  any ``<!DOCTYPE`` in the prolog (no DTD, so no XXE and no entity expansion can happen);
* lxml (libxml2) parses with entities, DTD loading and network access off and libxml2's own
  limits on (``huge_tree`` stays off: names, text nodes and attribute values are capped and
  nesting stops at 256), all in C and without the GIL;
* on the tree: no doctype, and no element deeper than ``max_depth`` (one XPath step per level,
  in C; each element is visited once).

Nothing here backtracks: the cost is linear in the body, about 30 ms per MB of the densest
markup on the CI machine. :func:`off_loop` runs such work in a small bounded pool of threads
with a deadline once the body is larger than :data:`INLINE_BYTES`, so a large body never holds
the event loop; smaller ones are cheaper inline than the hop to a thread and back.
"""

from __future__ import annotations

import asyncio
import functools
import re
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lxml import etree

T = TypeVar("T")

#: Matched against the first 200 bytes only, so its backtracking is bounded.
_DECLARED_ENCODING = re.compile(rb"^\s*<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_UTF8_NAMES = {b"utf-8", b"utf8", b"us-ascii", b"ascii"}

#: Tags (``<`` characters) one document may hold; a million is 60-120 MB of tree, and more
#: than any real reply within the 16 MB default fits (real markup spends 20+ bytes a tag).
MAX_TAGS = 1_000_000
#: libxml2's own nesting limit without ``huge_tree``; ``max_depth`` may not exceed it.
LIBXML_MAX_DEPTH = 256
#: Bodies up to this size are parsed, checked and mapped on the event loop: at most about 2 ms
#: for the densest markup, while the hop to a worker thread and back costs about 0.1 ms plus a
#: wait behind whatever the loop is doing. Above it the work goes to :func:`off_loop`'s threads.
INLINE_BYTES = 64 * 1024
#: Worker threads for large XML bodies (the machine has two cores), and how many jobs may be
#: running or waiting in them at once; callers beyond that wait for a slot, not the threads.
WORKERS = 2
MAX_JOBS = 6
#: How long a caller waits for a slot and its job together before it is told the gateway is busy.
DEADLINE = 10.0


class XmlRejected(ValueError):
    """The input is not acceptable XML. ``status`` is the HTTP-style class (400 or 413)."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class XmlBusy(Exception):
    """The XML workers did not finish the job within the deadline: the gateway is overloaded, the
    body was not judged. Callers answer "retry later"."""


def precheck(body: bytes, *, max_bytes: int) -> None:
    """Refuse what must never reach the parser. Linear in the body; no tree is built."""
    if len(body) > max_bytes:
        raise XmlRejected(f"the XML is {len(body)} bytes; the limit is {max_bytes}", 413)
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]:
        raise XmlRejected("only UTF-8 XML is accepted")
    declared = _DECLARED_ENCODING.match(body[:200].lstrip(b"\xef\xbb\xbf"))
    if declared and declared.group(1).lower() not in _UTF8_NAMES:
        raise XmlRejected(f"only UTF-8 XML is accepted (declared {declared.group(1).decode('ascii')!r})")
    if body.count(b"<") > MAX_TAGS:
        raise XmlRejected(f"the XML has more than {MAX_TAGS} tags", 413)
    if b"<!DOCTYPE" in body and _prolog_has_doctype(body):
        raise XmlRejected("DTDs and entity declarations are not allowed")


def _prolog_has_doctype(body: bytes) -> bool:
    """A doctype may only stand before the root element, after comments and PIs: walk those
    (each ``find`` moves forward, so this is linear) and look at what comes first after them.
    ``<!`` further on is a comment, CDATA (whose text may say anything) or a syntax error."""
    at = 3 if body.startswith(b"\xef\xbb\xbf") else 0
    while True:
        at = body.find(b"<", at)
        if at < 0:
            return False
        if body.startswith(b"<?", at):
            end, skip = body.find(b"?>", at + 2), 2
        elif body.startswith(b"<!--", at):
            end, skip = body.find(b"-->", at + 4), 3
        else:
            return body.startswith(b"<!", at)
        if end < 0:
            return False  # unterminated: the parser refuses it
        at = end + skip


def _parser() -> etree.XMLParser:
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
                           huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False)


@functools.lru_cache(maxsize=8)
def _too_deep(max_depth: int) -> str:
    """XPath that is true when an element sits at level ``max_depth + 1`` (the root is level 1)."""
    return "boolean(/*" + "/*" * max_depth + ")"


def parse(body: bytes, *, max_bytes: int, max_depth: int) -> Any:
    """The root element of ``body``, or :class:`XmlRejected`. Linear in the body; thread-safe."""
    if not 1 <= max_depth <= LIBXML_MAX_DEPTH:
        raise ValueError(f"max_depth must be between 1 and {LIBXML_MAX_DEPTH}")
    precheck(body, max_bytes=max_bytes)
    too_deep = XmlRejected(f"the XML is nested deeper than {max_depth} levels")
    try:
        root = etree.fromstring(body, _parser())
    except etree.XMLSyntaxError as exc:
        message = (exc.msg or "").partition("\n")[0][:200]  # libxml2 may quote the input on later lines
        if message.startswith("Excessive depth"):
            raise too_deep from None
        if b"<!ENTITY" in body:  # a declaration outside a DTD is as refused as one inside
            raise XmlRejected("DTDs and entity declarations are not allowed") from None
        raise XmlRejected(f"not well-formed XML: {message}") from None
    if root is None:
        raise XmlRejected("empty XML document")
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise XmlRejected("DTDs and entity declarations are not allowed")
    if root.xpath(_too_deep(max_depth)):
        raise too_deep
    return root


def parse_fragment(text: str, *, max_bytes: int = 1024 * 1024, max_depth: int = 64) -> Any:
    """One element given as a string (``_any`` content in JSON), parsed as hardened as a request."""
    try:
        return parse(text.encode("utf-8"), max_bytes=max_bytes, max_depth=max_depth)
    except XmlRejected as exc:
        raise ValueError(exc.reason) from None


# --- off the event loop ----------------------------------------------------------------------

#: Its threads start on first use, so a gateway without large XML bodies never has them.
_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="xml")
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


async def off_loop(size: int, work: Callable[[], T], *, deadline: float = DEADLINE) -> T:
    """``work()`` (parsing, checking and mapping a body of ``size`` bytes): inline when the body
    is small, else in the XML worker threads. At most :data:`MAX_JOBS` jobs are handed to the
    threads at once; a job keeps its slot until it has really finished, even when its caller has
    stopped waiting, so abandoned work cannot pile up. :class:`XmlBusy` when the wait for a slot
    and the job together take longer than ``deadline``; ``work``'s own exceptions pass through."""
    if size <= INLINE_BYTES:
        return work()
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = _slots[loop] = asyncio.Semaphore(MAX_JOBS)
    started = loop.time()
    try:
        await asyncio.wait_for(slots.acquire(), deadline)
    except TimeoutError:
        raise XmlBusy(f"no XML worker was free within {deadline:g}s") from None
    job = loop.run_in_executor(_pool, work)
    job.add_done_callback(lambda _: slots.release())
    try:
        return await asyncio.wait_for(asyncio.shield(job), max(0.0, deadline - (loop.time() - started)))
    except TimeoutError:
        job.add_done_callback(_consume)
        raise XmlBusy(f"the XML work did not finish within {deadline:g}s") from None


def _consume(job: asyncio.Future[Any]) -> None:
    """Read the outcome of a job nobody waits for any more (no "exception never retrieved")."""
    if not job.cancelled():
        job.exception()
