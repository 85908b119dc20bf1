"""The public contract between the core and every connector.

This is the only module (with :mod:`gateway.envelope`) a connector imports from the core.

The outcome chain
-----------------
An inbound connector hands each message to ``deliver(envelope)`` and gets an :class:`Outcome`
back. It acknowledges its protocol *only* as the outcome says:

==================  ===========================  ===============================================
``Status``          meaning                       protocol answer (examples)
==================  ===========================  ===============================================
``ACCEPTED``        delivered, or durably spooled  MQTT PUBACK, AMQP ack, SMTP 250, HTTP 202/200
``DEAD_LETTERED``   not deliverable, but stored    ack (the gateway holds it in the dead letters)
                    in the dead letters
``DROPPED``         a configured, counted drop     ack
``RETRY``           the gateway could not take     no PUBACK, nack+requeue, SMTP 451, HTTP 503
                    responsibility *now*
``REJECTED``        retrying cannot help           AMQP reject, SMTP 550/552/554, HTTP 4xx
==================  ===========================  ===============================================

``Outcome.reply`` carries the answer of a request/reply route (REST/SOAP/AMQP RPC).

Outbound connectors signal failures only with :class:`TransientError` (the core retries) or
:class:`PermanentError` (the core dead-letters at once); they translate their driver's
exceptions at the boundary (``raise TransientError(...) from exc``).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from gateway.envelope import Envelope


class Status(enum.Enum):
    ACCEPTED = "accepted"
    DEAD_LETTERED = "dead_lettered"
    DROPPED = "dropped"
    RETRY = "retry"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Reply:
    """The answer of a request/reply target, mapped back to the caller."""

    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass(frozen=True)
class Outcome:
    """What the gateway decided about one inbound message."""

    status: Status
    envelope_id: str = ""
    reason: str = ""
    reply: Reply | None = None
    #: For RETRY: how long the sender should wait (seconds), when known.
    retry_after: float | None = None
    #: For REJECTED: the HTTP-style class of the problem (400, 404, 413, 422...), when known.
    code: int | None = None
    #: Failure detail carried from a request/reply target (e.g. a SOAP fault), if any.
    detail: Mapping[str, Any] | None = None
    #: The W3C ``traceparent`` of the gateway's own hop for this message (its inbound span), set by
    #: the delivery: connectors whose answer has headers (REST, SOAP) answer with it.
    traceparent: str | None = None

    @property
    def acknowledge(self) -> bool:
        """True when the inbound side may acknowledge the message to its sender."""
        return self.status in (Status.ACCEPTED, Status.DEAD_LETTERED, Status.DROPPED)

    @classmethod
    def accepted(cls, envelope_id: str, reply: Reply | None = None) -> Outcome:
        return cls(Status.ACCEPTED, envelope_id, reply=reply)

    @classmethod
    def retry(cls, envelope_id: str, reason: str, retry_after: float | None = None) -> Outcome:
        return cls(Status.RETRY, envelope_id, reason=reason, retry_after=retry_after)

    @classmethod
    def rejected(
        cls, envelope_id: str, reason: str, code: int | None = None, detail: Mapping[str, Any] | None = None
    ) -> Outcome:
        return cls(Status.REJECTED, envelope_id, reason=reason, code=code, detail=detail)


#: The callable an inbound connector is given. Never raises; always returns an Outcome.
Deliver = Callable[[Envelope], Awaitable[Outcome]]


class GatewayError(Exception):
    """Base of the two errors an outbound connector may raise."""

    def __init__(self, message: str, *, detail: Mapping[str, Any] | None = None, code: int | None = None):
        super().__init__(message)
        self.detail = dict(detail or {})
        self.code = code


class TransientError(GatewayError):
    """Delivery failed but may succeed later (5xx, timeout, connection refused, broker nack)."""


class PermanentError(GatewayError):
    """Delivery can never succeed as is (4xx, SMTP 5xx, bad template output). Dead-letter it."""


@dataclass(frozen=True)
class Health:
    up: bool
    detail: str = ""


class ConnectorConfig(BaseModel):
    """Base of every connector's config model. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str


@dataclass(frozen=True)
class TemplateText:
    """A templated option as the route wrote it: its literal text and where templates go.

    ``pieces`` alternates literal text (``str``) with ``None`` for each template part (a
    ``{{ }}`` substitution, a ``{% %}`` block or a comment). ``"{{ user }}@example.com"`` is
    ``(None, "@example.com")``: the route fixed the domain, the message fills the rest.
    """

    source: str
    pieces: tuple[str | None, ...]

    @property
    def prefix(self) -> str:
        """The literal text before the first template part: every rendering starts with it."""
        return self.pieces[0] if self.pieces and self.pieces[0] is not None else ""

    @property
    def suffix(self) -> str:
        """The literal text after the last template part: every rendering ends with it."""
        return self.pieces[-1] if self.pieces and self.pieces[-1] is not None else ""

    @property
    def literal(self) -> str:
        """All literal text, template parts left out."""
        return "".join(p for p in self.pieces if p is not None)


@dataclass(frozen=True)
class SubstitutionCheck:
    """A connector's rule for one option whose value a route renders from message content.

    Both parts return the (possibly escaped) value or raise ``ValueError`` with a reason; the
    core then dead-letters that target for that message (permanent: the same message renders
    the same way again).
    """

    #: Applied to every value a template substitutes (Jinja's ``finalize``), before it joins the
    #: literal text: e.g. percent-quoting a path segment so a value stays one segment.
    each: Callable[[Any], Any] | None = None
    #: Applied to the whole rendered string with the route's :class:`TemplateText`, so the rule
    #: can keep what the route fixed: e.g. one recipient, in the domain the route wrote.
    result: Callable[[str, TemplateText], str] | None = None


#: The characters that end a line somewhere: CR, LF and NUL, and those ``str.splitlines`` (and so
#: Python's ``email`` package) also breaks at.
LINE_BREAKS = "\r\n\0\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(rendered: str, _: TemplateText) -> str:
    """``rendered`` if it holds no line break; ``ValueError`` otherwise."""
    bad = next((c for c in rendered if c in LINE_BREAKS), None)
    if bad is not None:
        raise ValueError(f"the value would contain {bad!r} (a line break: header injection refused)")
    return rendered


#: For an option that becomes one protocol line (a mail header, an HTTP header): no line breaks.
ONE_LINE = SubstitutionCheck(result=one_line)


class TargetOptions(BaseModel):
    """Base of the per-target options a connector accepts in a route's ``to:`` entry.

    String fields (and strings inside lists and dicts) are Jinja2 templates: the core renders
    them for each message before calling :meth:`Connector.send`. ``Target.options`` holds the
    rendered values, validated by this model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Per option field: how a value rendered from a message is kept from changing the shape of
    #: an address (a recipient, a topic, a path), see :class:`SubstitutionCheck`. Applies to
    #: every templated string of the field, in lists and dict values too; a value the route
    #: wrote without a template is never checked.
    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {}


@dataclass(frozen=True)
class Target:
    """One destination of one route, as an outbound connector receives it."""

    route: str
    connector: str
    options: TargetOptions
    #: The route waits for this target's reply (request/reply).
    want_reply: bool = False
    #: Seconds the caller may still wait for a reply.
    timeout: float = 30.0


class HttpMount(Protocol):
    """Shared data-plane HTTP listeners: several connectors (REST, SOAP) can serve one port."""

    def mount(self, listen: str, prefix: str, app: Any, *, owner: str) -> None: ...
    def unmount(self, listen: str, prefix: str) -> None: ...


@dataclass
class ConnectorContext:
    """What the runtime hands a connector instead of globals."""

    name: str
    logger: logging.Logger
    http: HttpMount
    #: Directory for the connector's own durable state (sessions, checkpoints).
    state_dir: str
    #: Compiled templates for this connector's config, if any need rendering at run time.
    extras: dict[str, Any] = field(default_factory=dict)
    #: True while the gateway can take responsibility for new messages (spool writable with free
    #: space, no back pressure, not shutting down). Lets a protocol refuse early (SMTP 452 at
    #: MAIL) instead of after the transfer; the outcome of ``deliver`` stays authoritative.
    accepting: Callable[[], bool] = field(default=lambda: True)
    #: Keep a message the connector itself refuses (over its size limit, undecodable) as a dead
    #: letter: ``await ctx.dead_letter(envelope, reason, error)`` answers DEAD_LETTERED once it is
    #: durably stored (then acknowledge), or RETRY when it could not be (do not acknowledge).
    #: ``reason`` is a short label (``too_large``); ``error`` the human-readable detail.
    dead_letter: Callable[[Envelope, str, str], Awaitable[Outcome]] | None = None
    #: This process's index among the gateway's worker processes (``gateway.workers``), and how
    #: many there are: a connector whose inbound side is shared (:attr:`Connector.shares_inbound`)
    #: gives each worker its own identity at the peer (an MQTT client id) and binds ports with
    #: ``SO_REUSEPORT`` when ``workers > 1``.
    worker: int = 0
    workers: int = 1


class Connector:
    """Base class of every connector. One configured connector may be inbound, outbound or both.

    Lifecycle, all idempotent and driven by the supervisor:

    1. :meth:`open` — connect what sending needs. Called for every connector before any inbound
       starts. May raise :class:`TransientError` (peer down): the supervisor retries with
       backoff and reports the connector unhealthy meanwhile.
    2. :meth:`listen` — start receiving and call ``deliver`` for each message. Returns once
       listening has started (not when it ends).
    3. :meth:`stop_listening` — stop taking new messages, wait up to ``drain`` seconds for those
       in flight to get their outcome; anything unacknowledged is left for the sender to retry.
    4. :meth:`close` — release everything. Called after all inbound connectors stopped.

    :meth:`send` may be called concurrently; it blocks until the peer confirmed (or refused)
    the message and raises only :class:`TransientError` or :class:`PermanentError`.
    """

    #: The ``type:`` name in routes.yaml.
    kind: ClassVar[str] = ""
    Config: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    Options: ClassVar[type[TargetOptions]] = TargetOptions
    #: Which directions this kind supports.
    supports_inbound: ClassVar[bool] = False
    supports_outbound: ClassVar[bool] = False
    #: Spooled jobs for this connector go to :meth:`send_batch` several at a time (when more than
    #: one is due), not to :meth:`send` one by one.
    batches: ClassVar[bool] = False
    #: Several worker processes (``gateway.workers``) may take this kind's inbound messages at
    #: once: a port shared with ``SO_REUSEPORT``, an MQTT shared subscription, competing AMQP
    #: consumers. A kind that is not shared (a mailbox poller, one XMPP session) listens in worker
    #: 0 only; every worker still sends with it.
    shares_inbound: ClassVar[bool] = False
    #: Subject matching style for routes reading from this kind: "topic" (MQTT + and #),
    #: "dotted" (AMQP * and #) or "glob" (paths, mail addresses).
    subject_syntax: ClassVar[str] = "glob"
    #: Parsers this kind supplies for the ``data`` view of its media types (``message/rfc822`` →
    #: headers, text, attachments): the registry installs them when it loads the kind. Each must
    #: raise nothing but :class:`~gateway.envelope.ParseError` for bad input.
    parsers: ClassVar[Mapping[str, Callable[[bytes], Any]]] = {}

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = ctx.name
        self.log = ctx.logger

    async def open(self) -> None:
        return None

    async def listen(self, deliver: Deliver) -> None:
        raise NotImplementedError(f"connector kind {self.kind!r} cannot receive")

    async def stop_listening(self, drain: float) -> None:
        return None

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        raise PermanentError(f"connector kind {self.kind!r} cannot send")

    async def send_batch(self, items: Sequence[tuple[Envelope, Target]]) -> Sequence[Reply | BaseException | None]:
        """Send several envelopes at once (called only when :attr:`batches` is set): one answer per
        item, in order — what :meth:`send` would return, or the exception that failed that item.
        Raising fails them all. Delivered means the same as for :meth:`send`."""
        raise NotImplementedError(f"connector kind {self.kind!r} does not send in batches")

    async def close(self) -> None:
        return None

    def health(self) -> Health:
        return Health(True)
