"""The schema of routes.yaml: pydantic v2 models, unknown keys rejected everywhere.

Connector sections are validated by each connector kind's own ``Config`` model (see
:mod:`gateway.config.loader`); the models here cover the gateway's own settings and routes.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator

from gateway.config.yamlsrc import FromEnv

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``5m`` → 300.0; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '500ms', '10s', '5m', '1h'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"invalid duration {value!r}: use a number of seconds or '500ms', '10s', '5m', '1h', '1d'")


Duration = Annotated[float, BeforeValidator(parse_duration)]

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 10**6, "mib": 1024**2, "gb": 10**9, "gib": 1024**3}


def parse_size(value: Any) -> int:
    """``10MiB`` → 10485760; bare numbers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]
    raise ValueError(f"invalid size {value!r}: use bytes or '64KiB', '10MiB', '1GB'")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


class FileSecret(SecretStr):
    """A secret from ``{file: path}``: the value read at load, and the path to read it again.

    A connector whose peer takes short-lived credentials (an access token that a sidecar or a
    mounted Kubernetes Secret renews) calls :func:`current_secret` where it uses the secret
    (every login, every request) instead of holding the value it was configured with. Compares
    equal by the value read at load, as any ``SecretStr``.
    """

    def __init__(self, value: str, path: str) -> None:
        super().__init__(value)
        self.path = path
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) of the last read
        self._current = value

    def current(self) -> str:
        """The file's content now; one ``stat`` when it has not changed since the last read. The
        last good value when the file cannot be read or is empty (say, while being replaced)."""
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
            if seen != self._seen:
                with open(self.path, encoding="utf-8") as fh:
                    value = fh.read().strip()
                if value:
                    self._current, self._seen = value, seen
        except OSError:
            pass
        return self._current


@overload
def current_secret(secret: SecretStr) -> str: ...
@overload
def current_secret(secret: SecretStr | None) -> str | None: ...
def current_secret(secret: SecretStr | None) -> str | None:
    """The secret as it is now: a file secret's file (see :meth:`FileSecret.current`); any other
    secret's value, which cannot change while the gateway runs; None for an unset one."""
    if isinstance(secret, FileSecret):
        return secret.current()
    return None if secret is None else secret.get_secret_value()


def _secret_by_reference(value: Any) -> Any:
    """Secrets may only come from the environment (``${VAR}``) or a file (``{file: path}``)."""
    if isinstance(value, dict) and set(value) == {"file"}:
        path = str(value["file"])
        try:
            with open(path, encoding="utf-8") as fh:
                return FileSecret(fh.read().strip(), path)
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path!r}: {exc.strerror}") from None
    if isinstance(value, FromEnv):
        return str(value)
    if value is None:
        return value
    raise ValueError("secrets are never written inline: use \"${ENV_VAR}\" or {file: /path/to/secret}")


#: A secret field: resolved from ``${VAR}`` or ``{file: path}``, never shown in logs or reprs.
Secret = Annotated[SecretStr, BeforeValidator(_secret_by_reference)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdminToken(Strict):
    name: str
    #: sha256 hex digest of the token (``gateway token hash``), or the token itself by reference.
    sha256: str | None = None
    token: Secret | None = None
    role: Literal["viewer", "editor"] = "viewer"
    #: Base32 TOTP secret (RFC 6238) by reference: editors then also give a 6-digit code.
    totp: Secret | None = None


class AdminSettings(Strict):
    listen: str = "127.0.0.1:8081"
    #: Bearer tokens for /api; /metrics, /healthz and /readyz stay open for probes and scrapers.
    tokens: list[AdminToken] = Field(default_factory=list)
    #: Largest routes.yaml the config API takes (PUT /api/routes, validate, test): 413 past it.
    max_config_bytes: ByteSize = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    #: Signs session tokens (HMAC-SHA256), by reference; replicas behind one admin Service need the
    #: same key. Unset: each process signs with a random key of its own, so a session holds only on
    #: the replica that made it, until that replica restarts.
    session_key: Secret | None = None
    #: Life of a session from POST /api/login. A logout is known only to the replica that
    #: answered it; the others accept the session until this runs out.
    session_ttl: Duration = Field(default=8 * 3600.0, gt=0)

    def model_post_init(self, _: Any) -> None:
        if self.session_key is not None and len(self.session_key.get_secret_value()) < 32:
            raise ValueError("session_key must have at least 32 characters (openssl rand -base64 32)")


class SpoolSettings(Strict):
    #: ``sqlite`` (one file, per replica) or ``rabbitmq`` (quorum queues shared by replicas).
    type: Literal["sqlite", "rabbitmq"] = "sqlite"
    path: str = "var/spool.db"
    #: Refuse new messages (temporary error) when the spool's disk has less free space than this.
    min_free_bytes: ByteSize = 64 * 1024 * 1024
    #: ``type: rabbitmq``: the broker (``amqp://user:pass@host:5672/vhost``, by reference).
    url: Secret | None = None
    queue_prefix: str = "gateway"
    #: Back pressure: refuse new messages for a connector with this many deliveries waiting.
    max_pending: int = Field(default=100_000, ge=1)
    #: Admission: beyond this many deliveries waiting for a connector, a new message for it is
    #: admitted only as a delivery makes room (it waits up to ``admit_wait``, else is refused).
    admit_depth: int = Field(default=10_000, ge=1)
    #: Admission by age: the same once the oldest delivery waiting is this old (0: off).
    admit_age: Duration = Field(default=0.0, ge=0)
    #: How long a message waits for room before it is refused with retry-later.
    admit_wait: Duration = Field(default=1.0, ge=0)
    #: Deliveries in flight per connector.
    concurrency: int = Field(default=16, ge=1, le=1024)
    #: Jobs one send may carry, for a connector that sends in batches (the file sink).
    batch: int = Field(default=256, ge=1, le=4096)
    #: How long an ``Idempotency-Key`` is remembered.
    idempotency_window: Duration = 86400.0

    def model_post_init(self, _: Any) -> None:
        if self.type == "rabbitmq" and self.url is None:
            raise ValueError("spool type rabbitmq needs url: \"${SPOOL_AMQP_URL}\"")


class ProvenanceSettings(Strict):
    """What the gateway remembers of each message (``gateway trace ID``, ``GET /api/messages/{id}``):
    received, routes, every attempt with the peer's answer, dead letter, replay. Best-effort: a
    full or failing store never refuses a message."""

    enabled: bool = True
    #: Records older than this are deleted.
    retention: Duration = Field(default=7 * 86400.0, gt=0)
    #: Live data in the store at most; past it the oldest records are deleted.
    max_size: ByteSize = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    #: The SQLite file. Omitted: ``provenance.db`` in the spool file's directory.
    path: str | None = None


class LogSettings(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


class ServerTls(Strict):
    """A listener's certificate chain and its key (PEM files). They are read again when they change
    on disk (a renewal): the next connection gets the new certificate, without a restart."""

    cert: str
    key: str


class HttpListenerSettings(Strict):
    """Bounds of one HTTP listen address (REST, SOAP, admin): what a client may send and how long
    it may take. Every listen address has them; ``gateway.http`` changes them per address."""

    #: The request line and headers must arrive within this time of the connection (or of the first
    #: byte of a later request on it): 408, or a silent close when nothing came.
    head_timeout: Duration = Field(default=10.0, gt=0)
    #: The whole request body must arrive within this time of its head: 408 and close.
    body_timeout: Duration = Field(default=60.0, gt=0)
    #: A kept-alive connection with no request for this long is closed.
    idle_timeout: Duration = Field(default=5.0, gt=0)
    #: Longest request target (path and query): 414.
    max_url: ByteSize = Field(default=8 * 1024, ge=256)
    #: Header section size (names and values): 431.
    max_header_bytes: ByteSize = Field(default=16 * 1024, ge=1024)
    #: Header fields in one request: 431.
    max_headers: int = Field(default=100, ge=10, le=10_000)
    #: Requests in progress (head received, answer not finished); past it: 503 + Retry-After.
    max_requests: int = Field(default=1000, ge=1)
    #: Open connections. A new one past it closes the oldest connection without a request in
    #: progress (idle, or its head still coming); if every one is busy, the new one is closed.
    max_connections: int = Field(default=1000, ge=1)
    #: Open connections from one client address, the same way; 0: no per-address bound (behind
    #: a proxy every connection has the proxy's address).
    max_connections_per_client: int = Field(default=256, ge=0)
    #: Serve HTTPS on this address: ``{cert: /path/tls.crt, key: /path/tls.key}``. Omitted: plain HTTP.
    tls: ServerTls | None = None


class TemplateSettings(Strict):
    """Bounds of one render of a route's templates (body, headers, options). A render that breaks
    one fails for that message: the target is dead-lettered with the reason."""

    #: The rendered text, and each string or list a template builds on the way (characters);
    #: everything one render builds together may take 4 times this.
    max_output: ByteSize = Field(default=1024 * 1024, ge=1024)
    #: Loop iterations, calls and includes in one render, counted across all loops, so nested
    #: loops multiply; also the longest ``range()``.
    max_iterations: int = Field(default=100_000, ge=100)
    #: How long one render may take.
    render_timeout: Duration = Field(default=0.05, gt=0)


class TracingSettings(Strict):
    """OpenTelemetry spans (docs/tracing.md). Needs the ``otel`` extra when enabled; the W3C trace
    context itself is carried whether this is on or not. A reload cannot change it (restart)."""

    enabled: bool = False
    #: ``otlp``: OTLP/HTTP (protobuf) to ``endpoint``; ``none``: spans are made but not sent.
    exporter: Literal["otlp", "none"] = "otlp"
    #: The collector's traces URL. Unset: ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, else
    #: ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/traces``, else http://localhost:4318/v1/traces.
    endpoint: str | None = None
    #: HTTP headers of every export (an API key...), by reference like every secret.
    headers: dict[str, Secret] = Field(default_factory=dict)
    #: Share of new traces recorded (ParentBased(TraceIdRatio)): a message whose sender gave a
    #: context follows the sender's sampled flag.
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = Field(default="gateway", min_length=1)
    #: Finished spans waiting for export; past it new ones are dropped (and counted in
    #: ``gateway_tracing_spans_dropped_total``), never waited for.
    max_queue: int = Field(default=8192, ge=64)
    #: Spans per OTLP request, and how long one request may take.
    max_batch: int = Field(default=512, ge=1)
    export_timeout: Duration = Field(default=10.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+", v):
            raise ValueError("endpoint must be an http:// or https:// URL (the collector's /v1/traces)")
        return v


class GatewaySettings(Strict):
    admin: AdminSettings = Field(default_factory=AdminSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    #: What happens to a message no route matches: refuse it, keep it as a dead letter, or drop it
    #: (counted in gateway_messages_routed_total{outcome="dropped"}).
    unmatched: Literal["reject", "dead_letter", "drop"] = "reject"
    #: How long SIGTERM waits for in-flight messages before exiting.
    drain: Duration = 10.0
    #: Directory for connectors' durable state (sessions, checkpoints).
    state_dir: str = "var/state"
    #: Log ``loop.blocked`` (with the stack that holds it) when the event loop is held this long.
    loop_warn_after: Duration = Field(default=0.1, gt=0)
    #: Per HTTP listen address (``"0.0.0.0:8080"``, as the connector's ``listen`` says it): the
    #: bounds of :class:`HttpListenerSettings`. An address not named here gets the defaults.
    http: dict[str, HttpListenerSettings] = Field(default_factory=dict)
    #: Bounds of every template render (:class:`TemplateSettings`).
    templates: TemplateSettings = Field(default_factory=TemplateSettings)
    #: OpenTelemetry spans (:class:`TracingSettings`).
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    #: Worker processes, each a whole gateway on its own core (docs/workers.md): a number, or
    #: ``auto`` for the cores this process may use (CPU affinity bounded by the cgroup's CPU
    #: quota, i.e. a pod's CPU limit). 1 (the default) is one process and no parent.
    #: ``gateway run --workers`` overrides it.
    workers: int | Literal["auto"] = 1

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("workers must be between 1 and 256, or auto")
        return v
    #: The record of each message's way through the gateway (:class:`ProvenanceSettings`).
    provenance: ProvenanceSettings = Field(default_factory=ProvenanceSettings)

    def provenance_path(self) -> str:
        """Where the provenance store is: its own ``path``, else beside the spool file."""
        return self.provenance.path or os.path.join(os.path.dirname(self.spool.path) or ".", "provenance.db")
    #: A config with at most this many routes has every per-route counter series exported at 0 from
    #: the start (about 22 series a route), so an alert's ``increase()`` sees a route's first event. A
    #: larger config's route series appear with their first event instead: 10,000 routes at 0 would be
    #: 220,000 series, ~150 MiB, and a /metrics scrape that holds the event loop for seconds.
    metrics_routes_at_zero: int = Field(default=1000, ge=0)

    @field_validator("http")
    @classmethod
    def _http_addresses(cls, v: dict[str, HttpListenerSettings]) -> dict[str, HttpListenerSettings]:
        for address in v:
            _, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"gateway.http key {address!r} must be a listen address HOST:PORT")
        return v


class RetryPolicy(Strict):
    attempts: int = Field(default=8, ge=1, le=1000)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial: Duration = 1.0
    max: Duration = 600.0
    max_age: Duration = 86400.0


class FailurePolicy(Strict):
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    dead_letter: bool = True


class Match(Strict):
    #: Pattern(s) on the envelope subject: MQTT ``+``/``#`` for MQTT sources, AMQP ``*``/``#``
    #: for AMQP sources, shell globs (``/orders/*``) otherwise. Omitted: every subject.
    subject: str | list[str] | None = None
    #: A condition in the gateway's expression language, e.g. ``data.temperature > 90``.
    when: str | None = None

    def subjects(self) -> list[str]:
        if self.subject is None:
            return []
        return [self.subject] if isinstance(self.subject, str) else list(self.subject)


class TargetSpec(BaseModel):
    """One ``to:`` entry. The keys here belong to the core; all others to the connector."""

    model_config = ConfigDict(extra="allow", frozen=True)
    connector: str
    #: Template for the new body, or ``{file: templates/x.j2}``. Omitted: the body passes unchanged.
    body: str | dict[str, str] | None = None
    content_type: str | None = None
    #: Headers to set (templates). Existing headers pass unchanged.
    headers: dict[str, str] = Field(default_factory=dict)
    #: This target's answer is the reply to a request/reply caller.
    reply: bool = False

    @field_validator("body")
    @classmethod
    def _body_file(cls, v: Any) -> Any:
        if isinstance(v, dict) and set(v) != {"file"}:
            raise ValueError("body is a template string or {file: path/to/template}")
        return v


class DedupeSpec(Strict):
    """The same key within the window passes once."""

    key: str = "{{ subject }}"
    window: Duration = 300.0


class ThrottleSpec(Strict):
    """At most ``limit`` per key per window; the rest are dropped or folded into the digest."""

    key: str = "{{ subject }}"
    limit: int = Field(default=1, ge=1)
    window: Duration = 300.0
    then: Literal["drop", "digest"] = "drop"


class DigestSpec(Strict):
    """Collect a window's messages per key into one message."""

    key: str = "{{ subject }}"
    window: Duration = 300.0
    #: How many of a window's messages the digest lists in ``data.digest.events`` (the count
    #: goes on past it); bounds the stored window and the digest message's size.
    max_listed: int = Field(default=1000, ge=0, le=10_000)


class AlarmSpec(Strict):
    """Fire once when ``raise_when`` becomes true and once when ``clear_when`` does."""

    key: str = "{{ subject }}"
    raise_when: str
    clear_when: str


class RouteConfig(Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    from_: str | list[str] = Field(alias="from")
    match: Match = Field(default_factory=Match)
    to: list[TargetSpec] = Field(min_length=1)
    #: ``spooled`` writes to the durable spool and acknowledges; ``direct`` holds the
    #: acknowledgement until every target answered. Request/reply routes are always direct.
    mode: Literal["spooled", "direct"] | None = None
    #: Direct mode and request/reply: how long the caller waits for the targets.
    timeout: Duration = 30.0
    #: Keep evaluating later routes after this one matched (default: the first match wins).
    continue_: bool = Field(default=False, alias="continue")
    on_failure: FailurePolicy = Field(default_factory=FailurePolicy)
    #: Alert-storm control (see gateway/routing/storm.py), applied in the order alarm, dedupe,
    #: throttle, digest.
    alarm: AlarmSpec | None = None
    dedupe: DedupeSpec | None = None
    throttle: ThrottleSpec | None = None
    digest: DigestSpec | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def sources(self) -> list[str]:
        return [self.from_] if isinstance(self.from_, str) else list(self.from_)

    @property
    def wants_reply(self) -> bool:
        return any(t.reply for t in self.to)

    @property
    def effective_mode(self) -> str:
        if self.wants_reply:
            return "direct"
        return self.mode or "spooled"


class FileModel(Strict):
    """The whole routes.yaml. ``connectors`` values are checked by each kind's own model."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    connectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    routes: list[RouteConfig] = Field(default_factory=list)

    @field_validator("connectors")
    @classmethod
    def _names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"connector name {name!r} may only use letters, digits, '_', '.', '-'")
        return v
