"""The one internal message shape every connector produces and consumes.

An :class:`Envelope` is frozen: routes never mutate one, they derive a new one with
:meth:`Envelope.evolve`. ``body`` is the raw bytes as they arrived and is never re-encoded
behind the user's back; ``data`` is a lazily parsed, cached view of it (JSON → dict/list,
XML → dict, text → str) that routes match and template on.

The CloudEvents mapping (:func:`to_cloudevent` / :func:`from_cloudevent`) follows the
CloudEvents 1.0 JSON format; protocol bindings (HTTP binary mode, AMQP ``cloudEvents:*``
properties, MQTT 5 user properties) build on :data:`CE_ATTRIBUTES`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any

#: Largest body the lazy parser will turn into ``data``; larger bodies stay raw bytes.
MAX_PARSE_BYTES = 16 * 1024 * 1024
#: Deepest JSON/XML nesting the parser accepts before giving up (hostile input guard).
MAX_PARSE_DEPTH = 64
#: Largest XML body, and most tags (``<``) in it, that get a ``data`` view. The view is built
#: in one go on the event loop (expat at about 100 ms a MB of attributes, the conversion at 1-2 µs
#: an element), so these keep the worst body within a few tens of ms.
MAX_PARSE_XML_BYTES = 128 * 1024
MAX_PARSE_XML_TAGS = 40_000
#: JSON bodies larger than this are parsed in steps (:meth:`Envelope.parse_steps`) so that the
#: event loop runs between them: ``json.loads`` holds the GIL for the whole document, about 60 ms a
#: megabyte of small values, so neither the loop nor a worker thread may run it on megabytes.
PARSE_INLINE_BYTES = 64 * 1024
#: Bytes parsed in one step: a few milliseconds for the costliest JSON (millions of tiny values).
PARSE_STEP_BYTES = 16 * 1024
#: Most values a large JSON body may hold to get a ``data`` view. Each becomes a Python object of
#: 50-100 bytes that the garbage collector walks, so sixteen megabytes of ``[1],`` would take half
#: a gigabyte and collector pauses of a quarter second; routing needs nowhere near this many.
MAX_PARSE_VALUES = 250_000

CE_ATTRIBUTES = ("id", "source", "type", "specversion", "subject", "time", "datacontenttype")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)  # 10 bits → 2 characters
_RANDOM_MAX = (1 << 80) - 1
_id_lock = threading.Lock()
_id_last = [0, 0]  # milliseconds and randomness of the last id
_POOL_BYTES = 10 * 400
_id_pool = bytearray()  # random bytes not used yet


def new_id() -> str:
    """A unique, time-sortable id (ULID, 26 Crockford base32 characters).

    Within one millisecond the ids count up from the first one's random part, as python-ulid's
    monotonic generator does (at half its cost: this runs once per message). The random parts
    come from ``os.urandom`` a few hundred at a time: one system call per id was a measurable
    part of a busy gateway's time."""
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        if ms == _id_last[0] and _id_last[1] < _RANDOM_MAX:
            randomness = _id_last[1] + 1
        else:
            pool = _id_pool
            if not pool:
                pool.extend(os.urandom(_POOL_BYTES))
            randomness = int.from_bytes(pool[-10:], "big")
            del pool[-10:]
        _id_last[0], _id_last[1] = ms, randomness
    n = (ms << 80) | randomness
    p = _PAIRS
    return (_CROCKFORD[n >> 125] + p[(n >> 115) & 1023] + p[(n >> 105) & 1023] + p[(n >> 95) & 1023]
            + p[(n >> 85) & 1023] + p[(n >> 75) & 1023] + p[(n >> 65) & 1023] + p[(n >> 55) & 1023]
            + p[(n >> 45) & 1023] + p[(n >> 35) & 1023] + p[(n >> 25) & 1023] + p[(n >> 15) & 1023]
            + p[(n >> 5) & 1023] + _CROCKFORD[n & 31])


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class ParseError(ValueError):
    """The body could not be parsed as its content type says."""


@dataclass(frozen=True, slots=False, eq=False)
class Envelope:
    """One message inside the gateway. Ids are kept across retries and replays."""

    source: str
    protocol: str
    subject: str
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    correlation_id: str | None = None
    reply_to: str | None = None

    def __post_init__(self) -> None:
        if type(self.body) is not bytes:
            if not isinstance(self.body, bytes | bytearray | memoryview):
                raise TypeError("Envelope.body must be bytes")
            object.__setattr__(self, "body", bytes(self.body))
        headers = self.headers
        object.__setattr__(self, "headers", _frozen({str(k): str(v) for k, v in headers.items()}) if headers
                           else _NO_HEADERS)
        object.__setattr__(self, "attributes", _frozen(self.attributes))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Envelope):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(self.id)

    def evolve(self, **changes: Any) -> Envelope:
        """A copy with ``changes`` applied; the id stays unless given."""
        return dataclasses.replace(self, **changes)

    def with_attributes(self, attributes: dict[str, Any]) -> Envelope:
        """A copy whose attributes are ``attributes`` (a new dict the caller hands over and no
        longer changes), all else shared with this one, the parsed ``data`` included: what
        :meth:`evolve` does for that one field without copying and checking the others again.
        The delivery gives every message and every target attempt its own trace context so."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        object.__setattr__(new, "attributes", MappingProxyType(attributes))
        return new

    @cached_property
    def data(self) -> Any:
        """The parsed view of ``body``, computed once. Raises :class:`ParseError` (also computed
        once: a body that does not parse is not parsed again on every read)."""
        failed: ParseError | None = self.__dict__.get("_data_error")
        if failed is not None:
            raise failed
        try:
            return parse_body(self.body, self.content_type)
        except ParseError as exc:
            self.__dict__["_data_error"] = exc
            raise

    def parse_steps(self) -> Generator[None, None, None]:
        """Compute ``data`` in bounded steps: each ``next()`` parses at most
        :data:`PARSE_STEP_BYTES` of a JSON body over :data:`PARSE_INLINE_BYTES`; the caller yields
        to the event loop between steps. Afterwards ``data`` is cached (or its
        :class:`ParseError`). Other bodies parse in one step."""
        d = self.__dict__
        if "data" in d or "_data_error" in d:
            return
        if len(self.body) <= PARSE_INLINE_BYTES or len(self.body) > MAX_PARSE_BYTES \
                or not is_json_type(self.content_type):
            with _suppress_parse_error():
                _ = self.data
            return
        try:
            d["data"] = yield from json_steps(self.body)
        except ParseError as exc:
            d["_data_error"] = exc

    def data_or_none(self) -> Any:
        """``data``, or ``None`` when the body does not parse."""
        try:
            return self.data
        except ParseError:
            return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with every field; the body is base64 unless it is UTF-8 text."""
        out = self._fields()
        out["attributes"] = _jsonable(out["attributes"])
        return out

    def _fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "source": self.source,
            "protocol": self.protocol,
            "subject": self.subject,
            "content_type": self.content_type,
            "headers": dict(self.headers),
            "attributes": dict(self.attributes),
            "time": self.time.isoformat(),
            "correlation_id": self.correlation_id,
            "reply_to": self.reply_to,
        }
        try:
            out["body"] = self.body.decode("utf-8")
            out["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            out["body"] = base64.b64encode(self.body).decode("ascii")
            out["body_encoding"] = "base64"
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Envelope:
        """Inverse of :meth:`as_dict`."""
        body_text = raw.get("body", "")
        if raw.get("body_encoding") == "base64":
            body = base64.b64decode(body_text)
        else:
            body = str(body_text).encode("utf-8")
        return cls(
            id=str(raw["id"]),
            source=str(raw["source"]),
            protocol=str(raw["protocol"]),
            subject=str(raw.get("subject", "")),
            body=body,
            content_type=str(raw.get("content_type", "application/octet-stream")),
            headers=dict(raw.get("headers") or {}),
            attributes=dict(raw.get("attributes") or {}),
            time=datetime.fromisoformat(str(raw["time"])),
            correlation_id=raw.get("correlation_id"),
            reply_to=raw.get("reply_to"),
        )

    def to_json(self) -> str:
        """:meth:`as_dict` as compact JSON, computed once (the spool and the file sink both need it)."""
        cached: str | None = self.__dict__.get("_json")
        if cached is None:
            out = self._fields()
            try:  # JSON types go straight through the C encoder; ``_json_default`` takes the rest
                cached = json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=_json_default)
            except TypeError:  # e.g. a key that is neither a string nor a number
                out["attributes"] = _jsonable(out["attributes"])
                cached = json.dumps(out, separators=(",", ":"), ensure_ascii=False)
            self.__dict__["_json"] = cached  # frozen: cache beside the fields, like ``data``
        return cached

    @classmethod
    def from_json(cls, text: str | bytes) -> Envelope:
        return cls.from_dict(json.loads(text))


def _json_default(value: Any) -> Any:
    """What ``json.dumps`` cannot encode itself, as :func:`_jsonable` would make it."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _jsonable(value: Any) -> Any:
    if value is None or type(value) in _JSON_SCALARS:  # the common case first: cheap exact types
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


_JSON_SCALARS = frozenset({str, int, float, bool})


# --- the parsed view -------------------------------------------------------------------


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_json_type(content_type: str) -> bool:
    mt = media_type(content_type)
    return mt == "application/json" or mt.endswith("+json") or mt == "text/json"


def is_xml_type(content_type: str) -> bool:
    mt = media_type(content_type)
    return mt in ("application/xml", "text/xml") or mt.endswith("+xml")


_PARSERS: dict[str, Callable[[bytes], Any]] = {}


def register_parser(media: str, parse: Callable[[bytes], Any]) -> None:
    """Supply the ``data`` view of a media type (``message/rfc822`` → headers, text, HTML,
    attachments). Called by the registry for each parser of a kind it loads
    (``Connector.parsers``), never at import. ``parse`` must not raise anything but
    :class:`ParseError` for bad input; it is called at most once per envelope."""
    _PARSERS[media.lower()] = parse


def parse_body(body: bytes, content_type: str) -> Any:
    """Parse ``body`` by its content type: JSON, XML, a registered parser, or text; else bytes."""
    if len(body) > MAX_PARSE_BYTES:
        raise ParseError(f"body of {len(body)} bytes is larger than the parse limit {MAX_PARSE_BYTES}")
    if is_json_type(content_type):
        return parse_json(body)
    if is_xml_type(content_type):
        return parse_xml(body)
    mt = media_type(content_type)
    registered = _PARSERS.get(mt)
    if registered is not None:
        try:
            return registered(body)
        except ParseError:
            raise
        except Exception as exc:  # a parser bug must not crash routing: the body just has no view
            raise ParseError(f"{mt} parser failed: {type(exc).__name__}: {exc}") from None
    if mt.startswith("text/"):
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"text body is not valid UTF-8: {exc}") from None
    if mt == "application/octet-stream":
        # Sniff: sensors often publish JSON without saying so.
        stripped = body.lstrip()[:1]
        if stripped in (b"{", b"["):
            try:
                return parse_json(body)
            except ParseError:
                pass
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return body
    return body


def parse_json(body: bytes) -> Any:
    if json_depth_exceeds(body, MAX_PARSE_DEPTH):
        raise ParseError(f"JSON nested deeper than {MAX_PARSE_DEPTH} levels")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"invalid JSON: {exc}") from None


#: A mapping's "parse the body yourself" default for a structured CloudEvent it was not handed
#: parsed (small bodies; tests): connectors parse large ones with :func:`json_or_none` first.
UNPARSED: Any = type("Unparsed", (), {"__repr__": lambda self: "UNPARSED"})()


async def json_or_none(body: bytes) -> Any:
    """``body`` as JSON, or None when it is not JSON (or breaks the depth and value bounds), parsed
    without holding the event loop: in one go up to :data:`PARSE_INLINE_BYTES`, above that in steps
    of :data:`PARSE_STEP_BYTES` with the loop running between them (``json.loads`` keeps the GIL
    for the whole document, so a thread would not help). For a connector that must read a body
    as JSON before it has an envelope (a structured CloudEvent)."""
    if len(body) <= PARSE_INLINE_BYTES:
        try:
            return parse_json(body)
        except ParseError:
            return None
    if len(body) > MAX_PARSE_BYTES:
        return None
    steps = json_steps(body)
    try:
        while True:
            next(steps)
            await asyncio.sleep(0)
    except StopIteration as done:
        return done.value
    except ParseError:
        return None


async def structured_event(body: bytes, content_type: str) -> Any:
    """The JSON of a structured CloudEvent (``application/cloudevents+json``), by
    :func:`json_or_none`, for a connector's mapping to take as ``event``; :data:`UNPARSED` for
    any other content type (the mapping does not read it then)."""
    if media_type(content_type) != "application/cloudevents+json":
        return UNPARSED
    return await json_or_none(body)


class _suppress_parse_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: Any) -> bool:
        return et is not None and issubclass(et, ParseError)


def json_steps(body: bytes) -> Generator[None, None, Any]:
    """Parse JSON in steps of :data:`PARSE_STEP_BYTES` (the generator's return value is the
    document), with the nesting bound of :func:`parse_json`. ijson's C backend builds the objects
    incrementally, its numbers as ``json.loads`` makes them (int, float); it stops at integers
    beyond 64 bits, which ijson's pure-Python backend reads, in smaller steps as it is slower."""
    import ijson  # only large bodies need it

    try:
        return (yield from _ijson_steps(body, ijson.get_backend("yajl2_c"), PARSE_STEP_BYTES))
    except _IntegerOverflow:
        return (yield from _ijson_steps(body, ijson.get_backend("python"), PARSE_STEP_BYTES // 8))


class _IntegerOverflow(Exception):
    pass


def _ijson_steps(body: bytes, backend: Any, step: int) -> Generator[None, None, Any]:
    import ijson

    depth = _DepthScan(MAX_PARSE_DEPTH, MAX_PARSE_VALUES)
    out: list[Any] = ijson.sendable_list()
    parser = backend.items_coro(out, "", use_float=True)
    try:
        for start in range(0, len(body), step):
            chunk = body[start:start + step]
            depth.feed(chunk)
            parser.send(chunk)
            yield
        parser.close()
    except ijson.JSONError as exc:
        # yajl's message goes on with a picture of the input: keep its first line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "integer overflow" in reason:
            raise _IntegerOverflow from None
        raise ParseError(f"invalid JSON: {reason}") from None
    if len(out) != 1:
        raise ParseError("invalid JSON: " + ("no value" if not out else "more than one value"))
    return out[0]


class _DepthScan:
    """:func:`json_depth_exceeds` fed in chunks, also counting values (the commas and openings
    outside strings): raises :class:`ParseError` past either bound before the parser builds it."""

    __slots__ = ("depth", "escaped", "in_string", "limit", "max_values", "values")

    def __init__(self, limit: int, max_values: int):
        self.limit = limit
        self.max_values = max_values
        self.depth = self.values = 0
        self.in_string = self.escaped = False

    def feed(self, chunk: bytes) -> None:
        depth, in_string, escaped, limit, values = self.depth, self.in_string, self.escaped, self.limit, self.values
        for byte in chunk:
            if in_string:
                if escaped:
                    escaped = False
                elif byte == 0x5C:
                    escaped = True
                elif byte == 0x22:
                    in_string = False
            elif byte == 0x22:
                in_string = True
            elif byte == 0x2C:
                values += 1
            elif byte in (0x5B, 0x7B):
                depth += 1
                values += 1
                if depth > limit:
                    raise ParseError(f"JSON nested deeper than {limit} levels")
            elif byte in (0x5D, 0x7D):
                depth -= 1
        if values > self.max_values:
            raise ParseError(f"JSON with more than {self.max_values} values is not parsed for routing")
        self.depth, self.in_string, self.escaped, self.values = depth, in_string, escaped, values


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Cheap pre-scan so hostile nesting never reaches the recursive parser: True when ``body``
    nests deeper than ``limit``. Linear in the body; brackets inside strings do not count."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def parse_xml(body: bytes) -> Any:
    """XML → dict with a hardened parser: no DTD, no entities, no network, bounded depth, size
    and tag count. Expat and the conversion are linear in the body."""
    if len(body) > MAX_PARSE_XML_BYTES:
        raise ParseError(f"XML bodies larger than {MAX_PARSE_XML_BYTES} bytes are not parsed")
    if body.count(b"<") > MAX_PARSE_XML_TAGS:
        raise ParseError(f"XML with more than {MAX_PARSE_XML_TAGS} tags is not parsed")
    try:
        from defusedxml import ElementTree as SafeET  # the soap extra brings it
    except ImportError:  # pragma: no cover - only without the soap extra
        raise ParseError("XML parsing needs the 'soap' extra (defusedxml)") from None
    try:
        root = SafeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except Exception as exc:  # defusedxml raises several unrelated types
        raise ParseError(f"invalid or forbidden XML: {type(exc).__name__}: {exc}") from None
    return {_local(root.tag): _xml_to_obj(root, 1)}


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_to_obj(elem: Any, depth: int) -> Any:
    if depth > MAX_PARSE_DEPTH:
        raise ParseError(f"XML nested deeper than {MAX_PARSE_DEPTH} levels")
    children = list(elem)
    if not children and not elem.attrib:
        return (elem.text or "").strip()
    out: dict[str, Any] = {f"@{_local(k)}": v for k, v in elem.attrib.items()}
    for child in children:
        key = _local(child.tag)
        value = _xml_to_obj(child, depth + 1)
        if key in out:
            existing = out[key]
            if not isinstance(existing, list):
                out[key] = [existing]
            out[key].append(value)
        else:
            out[key] = value
    text = (elem.text or "").strip()
    if text:
        out["#text"] = text
    return out


# --- CloudEvents -----------------------------------------------------------------------


def to_cloudevent(env: Envelope, ce_type: str | None = None) -> dict[str, Any]:
    """The CloudEvents 1.0 structured (JSON) form of ``env``."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": env.id,
        "source": env.attributes.get("ce_source", f"/gateway/{env.source}"),
        "type": ce_type or str(env.attributes.get("ce_type", f"gateway.{env.protocol}.message")),
        "time": env.time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": env.content_type,
    }
    if env.subject:
        event["subject"] = env.subject
    for key, value in env.headers.items():
        ext = key.lower()
        if ext.startswith("ce-") and ext[3:].isalnum():
            event[ext[3:]] = value
    if is_json_type(env.content_type):
        try:
            event["data"] = env.data
            return event
        except ParseError:
            pass
    try:
        event["data"] = env.body.decode("utf-8")
    except UnicodeDecodeError:
        event["data_base64"] = base64.b64encode(env.body).decode("ascii")
    return event


def from_cloudevent(event: Mapping[str, Any], *, source: str, protocol: str) -> Envelope:
    """Build an envelope from a structured CloudEvent; raises ``ValueError`` if it is not one."""
    missing = [k for k in ("specversion", "id", "source", "type") if not event.get(k)]
    if missing:
        raise ValueError(f"not a CloudEvent: missing {', '.join(missing)}")
    if str(event["specversion"]) != "1.0":
        raise ValueError(f"unsupported CloudEvents specversion {event['specversion']!r}")
    content_type = str(event.get("datacontenttype") or "application/json")
    if "data_base64" in event:
        body = base64.b64decode(str(event["data_base64"]))
    elif "data" in event:
        data = event["data"]
        if isinstance(data, str) and not is_json_type(content_type):
            body = data.encode("utf-8")
        else:
            body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    else:
        body = b""
    known = {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64"}
    headers = {f"ce-{k}": str(v) for k, v in event.items() if k not in known}
    time = datetime.now(UTC)
    if event.get("time"):
        time = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
    return Envelope(
        id=str(event["id"]),
        source=source,
        protocol=protocol,
        subject=str(event.get("subject") or ""),
        body=body,
        content_type=content_type,
        headers=headers,
        attributes={"ce_source": str(event["source"]), "ce_type": str(event["type"])},
        time=time,
    )
