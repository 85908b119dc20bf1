"""W3C Trace Context (``traceparent`` / ``tracestate``) as the gateway carries it.

Every envelope carries the trace context of the hop that delivered it in two attributes,
:data:`TRACEPARENT` and :data:`TRACESTATE` (strings, so the spool keeps them and routes can read
them as ``attributes.traceparent``). An inbound connector copies the protocol's own field into
them when the sender gave a valid one (:func:`inbound_attributes`); a message that arrives
without one starts a new trace when the delivery takes it. Outbound connectors write the
attributes of the envelope they are given into the protocol's field: the delivery hands them an
envelope whose context is the one of that attempt (a child of the received one), so every
outbound message carries the context of its own hop.

Parsing follows https://www.w3.org/TR/trace-context/: a ``traceparent`` that is not valid is
ignored (a new trace starts), a ``tracestate`` is kept only beside a valid ``traceparent`` and
only while it is within the size the recommendation lets a vendor drop at (512 characters).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.envelope import Envelope

#: The envelope attributes (and the HTTP header / property names) that carry the context.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: The mail header that carries the context in and out of SMTP, IMAP and POP3 messages.
MAIL_HEADER = "Traceparent"
MAIL_STATE_HEADER = "Tracestate"
#: Longest ``tracestate`` kept (the recommendation's limit for propagating it whole).
MAX_TRACESTATE = 512
#: The trace flag that says the caller records this trace.
SAMPLED = 0x01

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Ids need to be unique, not secret: what OpenTelemetry's own id generator uses.
_bits: Callable[[int], int] = random.getrandbits


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One hop's context: the trace it belongs to, its own span id, flags and vendor state."""

    trace_id: str
    span_id: str
    flags: int = SAMPLED
    state: str = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def child(self) -> TraceContext:
        """The context of a hop this one starts: same trace, flags and state, a new span id."""
        return TraceContext(self.trace_id, new_span_id(), self.flags, self.state)

    def attributes(self) -> dict[str, str]:
        """The envelope attributes that carry this context."""
        out = {TRACEPARENT: self.traceparent}
        if self.state:
            out[TRACESTATE] = self.state
        return out


def new_trace_id() -> str:
    return f"{_bits(128) or 1:032x}"


def new_span_id() -> str:
    return f"{_bits(64) or 1:016x}"


def new_trace() -> TraceContext:
    """A new trace (sampled: the gateway records what it starts)."""
    return TraceContext(new_trace_id(), new_span_id())


def parse(traceparent: object, tracestate: object = None) -> TraceContext | None:
    """The context in a ``traceparent`` (and ``tracestate``) value, or None when it is not valid.

    Accepts what the recommendation says a receiver must: version 00 exactly, a higher version
    with extra fields after the four known ones, lowercase hex only, no all-zero ids, never
    version ff."""
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("latin-1")
    if not isinstance(traceparent, str) or len(traceparent) > 512:
        return None
    m = _TRACEPARENT.match(traceparent.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or (rest and not rest.startswith("-")):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = ""
    if isinstance(tracestate, bytes):
        tracestate = tracestate.decode("latin-1")
    if isinstance(tracestate, str):
        state = tracestate.strip()
        if len(state) > MAX_TRACESTATE or not state.isprintable():
            state = ""
    return TraceContext(trace_id, span_id, int(flags, 16), state)


def inbound_attributes(get: Callable[[str], Any] | Mapping[str, Any]) -> dict[str, str]:
    """The envelope attributes for the context a sender gave, or ``{}`` when it gave none (or an
    invalid one). ``get`` looks a field up by its lowercase name (``traceparent``,
    ``tracestate``): a header mapping with lowercase keys, or a function for protocols whose
    names are case-insensitive."""
    lookup = get.get if isinstance(get, Mapping) else get
    ctx = parse(lookup(TRACEPARENT), lookup(TRACESTATE))
    return ctx.attributes() if ctx is not None else {}


def of(env: Envelope) -> TraceContext | None:
    """The context an envelope carries, or None."""
    attrs = env.attributes
    return parse(attrs.get(TRACEPARENT), attrs.get(TRACESTATE))


def trace_id_of(env: Envelope) -> str | None:
    """The 32-hex trace id of the trace an envelope belongs to, or None."""
    ctx = of(env)
    return ctx.trace_id if ctx is not None else None


def with_context(env: Envelope, ctx: TraceContext) -> Envelope:
    """``env`` carrying ``ctx`` (same id: it is the same message)."""
    attrs = dict(env.attributes)
    attrs.pop(TRACESTATE, None)
    attrs.update(ctx.attributes())
    return env.with_attributes(attrs)


def outbound_fields(env: Envelope) -> dict[str, str]:
    """The ``traceparent``/``tracestate`` fields an outbound connector writes for ``env``:
    the envelope's own context (the delivery gives each attempt its own), or none."""
    ctx = of(env)
    return ctx.attributes() if ctx is not None else {}
