"""Provenance: what happened to each message, kept in a bounded SQLite file beside the spool.

One record per envelope id, made of events: ``received`` (when, from which inbound connector,
protocol, subject, the message's own ids and the answer the sender got), ``route`` (each route
matched, or the message unmatched, dropped, suppressed, digested, rejected), ``attempt`` (each
send to a target: connector, route, attempt number, ``ok``/``retry``/``permanent`` and the peer's
answer or error, bounded), ``dead_letter`` (reason and error), ``dropped`` (a final failure on a
route with ``dead_letter: false``) and ``replay`` (who replayed it, when, to which connector).

Lookups go by envelope id, by trace id (W3C, :func:`gateway.tracecontext.trace_id_of`, or a
whole ``traceparent``), or by the message's own id: ``Message-ID``, the MQTT/AMQP correlation id,
the AMQP message id or the ``Idempotency-Key``; all of them are indexed.

Cost and failure: the delivery calls the recording methods on the event loop; each appends one
tuple to a list. Every 100 ms the list goes to one thread (:class:`~gateway.groupthread.GroupThread`)
that encodes and inserts it in one transaction, one row per envelope (WAL, ``synchronous=NORMAL``: a record survives a
crash of the process, the last fraction of a second may not survive a power cut). Provenance is
best-effort: a store that is full, slow or failing never refuses or delays a message; what it
could not keep is counted in ``gateway_provenance_failures_total`` and logged (at most once a
minute). Bounds: events older than ``retention`` are deleted, and while the live data is larger
than ``max_size`` the oldest are deleted until it is 90% of it; at most :data:`MAX_BACKLOG`
events wait for the thread (more are dropped and counted).

Readers (``gateway trace``, ``GET /api/messages/{id}``) open the file themselves: WAL lets them
read while the gateway writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import string
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from gateway import tracecontext
from gateway.contract import GatewayError, Outcome, PermanentError, Reply, TransientError
from gateway.groupthread import Closed, GroupThread
from gateway.logs import event
from gateway.metrics import Counter, Gauge

if TYPE_CHECKING:
    from gateway.delivery.store import DeadLetterFilter, Job, SpoolBackend
    from gateway.envelope import Envelope
    from gateway.routing.router import Planned

#: Longest subject, peer answer or error text kept (characters).
MAX_TEXT = 500
#: Longest id kept as a lookup key (longer ones are cut: the lookup cuts the same way).
MAX_KEY = 200
#: Events waiting for the store's thread before new ones are dropped (and counted).
MAX_BACKLOG = 100_000
#: Envelopes one lookup returns at most (a key several messages share: the newest), and events per envelope.
MAX_ENVELOPES = 20
MAX_EVENTS = 1000
#: How often the thread deletes what is past the retention or the size.
_MAINTAIN_EVERY = 30.0
#: A ``received`` event is dated when the connector took the message, at most this long before it is recorded.
_RECEIVED_SLACK = 3600.0
#: How long the loop collects events before handing them to the thread.
_FLUSH_AFTER = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS event (
    seq INTEGER PRIMARY KEY, envelope_id TEXT NOT NULL, at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS event_envelope ON event (envelope_id);
CREATE TABLE IF NOT EXISTS key (
    seq INTEGER PRIMARY KEY, value TEXT NOT NULL, kind TEXT NOT NULL, envelope_id TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS key_value ON key (value);
"""

#: (time, envelope id, kind, the values of FIELDS[kind], lookup keys as (kind, value) or None)
_Row = tuple[float, str, str, tuple[Any, ...], list[tuple[str, str]] | None]

#: The fields of each kind of event, in the order they are stored: positional, the encoding and
#: the bytes on disk are a third of named ones (``ids`` is a list of (kind, value); ``ms`` in µs).
FIELDS = {
    "received": ("connector", "protocol", "subject", "status", "reason", "ids", "duplicate_of"),
    "route": ("route", "outcome", "detail"),
    "attempt": ("route", "connector", "attempt", "outcome", "answer", "mode", "ms"),
    "dead_letter": ("route", "connector", "reason", "error"),
    "dropped": ("route", "connector", "reason", "error"),
    "replay": ("by", "connector"),
}


#: Why events were not kept: the write failed, the disk is short of the spool's ``min_free_bytes``,
#: too many waited for the thread, the store could not be opened.
FAILURE_REASONS = ("write", "disk", "backlog", "open")


class DiskLow(Exception):
    """The disk has less free space than the spool needs: provenance gives way."""


class ProvenanceMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.failures = Counter(
            "gateway_provenance_failures_total",
            "Provenance events not kept (reason: write, disk, backlog, open); messages flow regardless.",
            ["reason"], registry=registry)
        for reason in FAILURE_REASONS:  # at 0 from the start, for alerts on increase()
            self.failures.labels(reason)
        self.bytes = Gauge(
            "gateway_provenance_bytes", "Live data in the provenance store (bounded by gateway.provenance.max_size).",
            registry=registry)


class Provenance:
    """The recorder the delivery calls (on the loop) and the store behind it (one thread).

    ``Provenance.off()`` records nothing: every method returns at once.
    """

    def __init__(self, path: str | None, *, retention: float = 7 * 86400.0, max_size: int = 256 * 1024 * 1024,
                 min_free_bytes: int = 0, registry: CollectorRegistry | None = None,
                 log: logging.Logger | None = None):
        self.path = path
        self.retention = retention
        self.max_size = max_size
        #: Write nothing while the store's disk has less free space than this (the spool's
        #: ``min_free_bytes``: provenance never takes the room the spool needs for messages).
        self.min_free_bytes = min_free_bytes
        self._disk_checked = -1.0
        self._disk_low = False
        self.log = log or logging.getLogger("gateway.provenance")
        self.metrics = ProvenanceMetrics(registry) if registry is not None and path else None
        self._buf: list[_Row] = []
        self._backlog = 0  # events handed to the thread and not written yet
        self._flush_timer: asyncio.TimerHandle | None = None
        self._thread: GroupThread[list[_Row], None] | None = None
        self._db: sqlite3.Connection | None = None
        self._maintained = 0.0
        self._warned = 0.0

    @classmethod
    def off(cls) -> Provenance:
        return cls(None)

    @property
    def on(self) -> bool:
        return self._thread is not None

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the store; on failure provenance stays off for this run (logged, counted)."""
        if not self.path:
            return
        try:
            self._db = await asyncio.to_thread(self._open)
        except (sqlite3.Error, OSError) as exc:
            self._failed("open", exc, 1)
            return
        self._thread = GroupThread("provenance", self._write, idle=lambda: _MAINTAIN_EVERY, on_idle=self._maintain)
        self._thread.start()

    async def close(self) -> None:
        """Write what is waiting, then close the store."""
        self._flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            await thread.stop()
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    # --- recording (on the loop: cheap, never raises) ------------------------------------------

    def received(self, env: Envelope, outcome: Outcome) -> None:
        """An inbound message and the answer its sender got (recorded under the outcome's envelope
        id: a repeated ``Idempotency-Key`` joins the first message's record)."""
        if self._thread is None:
            return
        trace = tracecontext.trace_id_of(env)
        if trace is None and outcome.traceparent:
            ctx = tracecontext.parse(outcome.traceparent)
            trace = ctx.trace_id if ctx is not None else None
        keys = [("trace_id", trace)] if trace else []
        attrs = env.attributes
        if env.headers or env.correlation_id or attrs:
            for kind, value in (("message_id", env.headers.get("message-id")), ("correlation_id", env.correlation_id),
                                ("idempotency_key", attrs.get("idempotency_key")),
                                ("amqp_message_id", attrs.get("amqp.message_id"))):
                if isinstance(value, str) and value:
                    keys.append((kind, _key(value)))
        envelope_id = outcome.envelope_id or env.id
        now = time.time()
        at = env.time.timestamp()  # when the connector took it (a sender's own time if long ago: now)
        at = at if now - _RECEIVED_SLACK < at <= now else now
        self._buf.append((at, envelope_id, "received", (
            env.source, env.protocol, env.subject[:MAX_TEXT], outcome.status.value, outcome.reason[:MAX_TEXT],
            keys or None, env.id if envelope_id != env.id else None), keys or None))
        if self._flush_timer is None:
            self._schedule()

    def route(self, envelope_id: str, route: str, outcome: str, detail: str = "") -> None:
        """A route decision: matched, unmatched, dropped, suppressed, digested, rejected."""
        if self._thread is None:
            return
        self._buf.append((time.time(), envelope_id, "route", (route, outcome, detail[:MAX_TEXT]), None))
        if self._flush_timer is None:
            self._schedule()

    def direct(self, plans: Sequence[Planned], results: Sequence[Any], started: float) -> None:
        """The direct sends of one message (started at ``started``, epoch seconds), each with its
        result as ``gather(return_exceptions=True)`` gives it."""
        if self._thread is None:
            return
        for plan, result in zip(plans, results, strict=False):
            self._attempt(started, plan.envelope.id, plan.route.name, plan.spec.connector, 1, result, "direct")

    def sent(self, job: Job, result: Any, started: float) -> None:
        """One attempt of a spooled job: ``result`` is the connector's answer or its exception."""
        if self._thread is None:
            return
        self._attempt(time.time() - (time.perf_counter() - started), job.envelope_id, job.route, job.connector,
                      job.attempts + 1, result, "spooled")

    def dead(self, envelope_id: str, route: str, connector: str, reason: str, error: str, *, kept: bool = True) -> None:
        """A final failure: dead-lettered, or dropped (``kept=False``, ``dead_letter: false``)."""
        if self._thread is None:
            return
        self._add(time.time(), envelope_id, "dead_letter" if kept else "dropped",
                  (route, connector, reason, error[:MAX_TEXT]))

    def replayed(self, envelope_ids: Iterable[str], *, by: str, connector: str | None) -> None:
        """Dead letters put back for delivery by ``by`` (to ``connector`` instead of their own)."""
        if self._thread is None:
            return
        now = time.time()
        for envelope_id in envelope_ids:
            self._add(now, envelope_id, "replay", (by, connector))

    def _attempt(self, at: float, envelope_id: str, route: str, connector: str, attempt: int, result: Any,
                 mode: str) -> None:
        if result is None or isinstance(result, Reply):  # the common case first
            outcome, answer = "ok", f"reply {result.status}" if result is not None else ""
        elif isinstance(result, PermanentError):
            outcome, answer = "permanent", _answer(result)
        elif isinstance(result, TransientError):
            outcome, answer = "retry", _answer(result)
        elif isinstance(result, TimeoutError):
            outcome, answer = "retry", "no answer within the route's timeout"
        elif isinstance(result, asyncio.CancelledError):
            outcome, answer = "retry", "cancelled: the gateway was stopping"
        else:
            outcome, answer = "retry", f"unexpected {type(result).__name__}"
        self._add(at, envelope_id, "attempt", (route, connector, attempt, outcome, answer, mode,
                                               int((time.time() - at) * 1e6)))

    def _add(self, at: float, envelope_id: str, kind: str, values: tuple[Any, ...]) -> None:
        self._buf.append((at, envelope_id, kind, values, None))
        if self._flush_timer is None:
            self._schedule()

    def _schedule(self) -> None:
        try:
            self._flush_timer = asyncio.get_running_loop().call_later(_FLUSH_AFTER, self._flush)
        except RuntimeError:  # no loop (a test calling from outside one): hand it over now
            self._flush()

    def _flush(self) -> None:
        self._flush_timer = None
        rows, self._buf = self._buf, []
        if not rows or self._thread is None:
            return
        if self._backlog + len(rows) > MAX_BACKLOG:
            self._failed("backlog", None, len(rows))
            return
        try:
            fut = self._thread.submit(rows)
        except Closed:
            return
        count = len(rows)
        self._backlog += count
        fut.add_done_callback(lambda f: self._written(f, count))

    def _written(self, fut: asyncio.Future[None], count: int) -> None:
        self._backlog -= count
        if not fut.cancelled() and fut.exception() is not None:
            exc = fut.exception()
            self._failed("disk" if isinstance(exc, DiskLow) else "write", exc, count)

    def _failed(self, reason: str, exc: BaseException | None, count: int) -> None:
        if self.metrics is not None:
            self.metrics.failures.labels(reason).inc(count)
        now = time.monotonic()
        if now - self._warned >= 60.0 or reason == "open":
            self._warned = now
            event(self.log, "provenance.failed", logging.WARNING, reason=reason, events=count,
                  error=str(exc) if exc else "", note="messages flow regardless; these records are lost")

    # --- lookups ----------------------------------------------------------------------------------

    async def lookup(self, key: str) -> list[dict[str, Any]]:
        """The records of the messages ``key`` names (see :func:`lookup`), off the loop."""
        if not self.path:
            return []
        self._flush()
        if self._thread is not None:  # what was recorded before the lookup is written first
            with contextlib.suppress(Exception):
                await self._thread.submit([])
        return await asyncio.to_thread(read, self.path, key)

    # --- on the store's thread ------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        assert self.path
        try:
            db = _connect(self.path)
        except sqlite3.DatabaseError as exc:
            if type(exc) is not sqlite3.DatabaseError:  # locked, I/O error...: not the file's fault
                raise
            # not a database, or a damaged one: the records are lost either way; keep the file
            # aside for a look and start a new store, rather than go without provenance
            aside = f"{self.path}.corrupt-{int(time.time())}"
            for suffix in ("", "-wal", "-shm"):  # its log must not be applied to the new file
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            event(self.log, "provenance.corrupt", logging.WARNING, path=self.path, moved_to=aside, error=str(exc))
            db = _connect(self.path)
        self._maintain_db(db)
        return db

    def _write(self, batches: list[list[_Row]]) -> Sequence[None]:
        db = self._db
        if db is None:
            raise RuntimeError("the provenance store is not open")
        if self.min_free_bytes and self._short_of_disk():
            raise DiskLow(f"less than {self.min_free_bytes} bytes free on the store's disk")
        if not _insert(db, [row for rows in batches for row in rows]):
            return [None] * len(batches)  # an empty group: a lookup waiting for what came before it
        if time.monotonic() - self._maintained >= _MAINTAIN_EVERY or _live_bytes(db) > self.max_size:
            self._maintain()
        return [None] * len(batches)

    def _short_of_disk(self) -> bool:
        """Is the store's disk below ``min_free_bytes``? Measured at most once a second."""
        now = time.monotonic()
        if now - self._disk_checked >= 1.0:
            self._disk_checked = now
            assert self.path
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            self._disk_low = st.f_bavail * st.f_frsize < self.min_free_bytes
        return self._disk_low

    def _maintain(self) -> None:
        if self._db is not None:
            try:
                self._maintain_db(self._db)
            except sqlite3.Error as exc:
                self._failed("write", exc, 0)

    def _maintain_db(self, db: sqlite3.Connection) -> None:
        """Delete events past the retention, then the oldest while the live data is over ``max_size``."""
        self._maintained = time.monotonic()
        _delete_before(db, "event", _first_seq_at(db, "event", time.time() - self.retention))
        while _live_bytes(db) > self.max_size:
            first, last = db.execute("SELECT min(seq), max(seq) FROM event").fetchone()
            if first is None:
                break
            # a tenth of the rows at a time, until the live data is 90% of the bound
            _delete_before(db, "event", first + max(1, (last - first) // 10))
            if _live_bytes(db) <= self.max_size * 0.9:
                break
        oldest = db.execute("SELECT at FROM event ORDER BY seq LIMIT 1").fetchone()
        # a key's time is its message's reception, up to an hour before the events recorded with it
        _delete_before(db, "key", _first_seq_at(db, "key", (oldest[0] if oldest else time.time()) - _RECEIVED_SLACK))
        if self.metrics is not None:
            self.metrics.bytes.set(_live_bytes(db))


def _connect(path: str) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(_SCHEMA)
    return db


def _insert(db: sqlite3.Connection, rows: Iterable[_Row]) -> bool:
    """Write ``rows`` in one transaction, one row per envelope: a message's received, route and
    attempt events mostly come within one flush, and one row costs a third of three (insert,
    index, encoding). False when there was nothing to write."""
    grouped: dict[str, list[Any]] = {}
    keys: list[tuple[str, str, str, float]] = []
    for at, envelope_id, kind, values, row_keys in rows:
        event = (int(at * 1000), kind, values)  # milliseconds: an integer encodes at a third of a float's cost
        found = grouped.get(envelope_id)
        if found is None:
            grouped[envelope_id] = [event]
        else:
            found.append(event)
        if row_keys:
            keys.extend((value, k, envelope_id, at) for k, value in row_keys)
    if not grouped:
        return False
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
    events = [(envelope_id, min(e[0] for e in found) / 1000, dumps(found)) for envelope_id, found in grouped.items()]
    db.execute("BEGIN")
    try:
        db.executemany("INSERT INTO event (envelope_id, at, data) VALUES (?,?,?)", events)
        if keys:
            db.executemany("INSERT INTO key (value, kind, envelope_id, at) VALUES (?,?,?,?)", keys)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return True


#: Dead letters a replay by filter records its event for at most (the newest), as the dead-letter
#: listing shows at most: each is read whole (its envelope) to learn its envelope id.
MAX_REPLAY_RECORDS = 1000


async def replayed_ids(spool: SpoolBackend, ids: Sequence[int] | None, flt: DeadLetterFilter | None,
                       connector: str | None) -> list[str]:
    """The envelope ids a replay of these dead letters puts back (read before the replay: they
    leave the dead letters). By ids: all of them, read one at a time; by filter: the newest
    :data:`MAX_REPLAY_RECORDS`. A dead letter without a target (unmatched) goes back only with
    ``connector``."""
    out: list[str] = []
    if ids is not None:
        for dl_id in ids:
            d = await spool.dead_letter_by_id(dl_id)
            if d is not None and (connector or d.connector):
                out.append(d.envelope_id)
        return out
    return [d.envelope_id for d in await spool.dead_letters(flt, MAX_REPLAY_RECORDS) if connector or d.connector]


def record_replay(path: str, envelope_ids: Iterable[str], *, by: str, connector: str | None) -> None:
    """Add ``replay`` events to the store at ``path`` from another process (the CLI's replay):
    SQLite's lock lets it write beside the running gateway."""
    now = time.time()
    db = _connect(path)
    try:
        _insert(db, [(now, envelope_id, "replay", (by, connector), None) for envelope_id in envelope_ids])
    finally:
        db.close()


def _live_bytes(db: sqlite3.Connection) -> int:
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages * db.execute("PRAGMA page_size").fetchone()[0])


def _first_seq_at(db: sqlite3.Connection, table: str, cutoff: float) -> int | None:
    """The first ``seq`` of ``table`` whose ``at`` is at or after ``cutoff`` (rows are appended
    in time order, so a binary search over ``seq`` finds it without an index on ``at``); None
    when every row is older."""
    bounds = db.execute(f"SELECT min(seq), max(seq) FROM {table}").fetchone()
    if bounds[0] is None:
        return None
    lo, hi = bounds[0], bounds[1] + 1
    while lo < hi:  # the smallest s whose first row at or after it is not older than cutoff
        mid = (lo + hi) // 2
        row = db.execute(f"SELECT seq, at FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1", (mid,)).fetchone()
        if row[1] < cutoff:
            lo = row[0] + 1
        else:
            hi = mid
    row = db.execute(f"SELECT seq, at FROM {table} WHERE seq >= ? ORDER BY seq LIMIT 1", (lo,)).fetchone()
    return None if row is None or row[1] < cutoff else int(row[0])


def _delete_before(db: sqlite3.Connection, table: str, seq: int | None) -> None:
    """Delete the rows of ``table`` before ``seq`` (all of them for None), 10,000 per transaction."""
    while True:
        if seq is None:
            cur = db.execute(f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} ORDER BY seq LIMIT 10000)")
        else:
            cur = db.execute(f"DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE seq < ? "
                             f"ORDER BY seq LIMIT 10000)", (seq,))
        if cur.rowcount < 10000:
            return


def _key(value: str) -> str:
    """A lookup key as stored: without the ``<>`` of a Message-ID, cut to :data:`MAX_KEY`."""
    return value.strip().strip("<>").strip()[:MAX_KEY]


def _answer(exc: GatewayError) -> str:
    """The peer's answer as an error carries it: the message, and the body it answered with."""
    text = str(exc)
    body = exc.detail.get("body")
    if isinstance(body, str) and body.strip():
        text += f": {body.strip()}"
    return text[:MAX_TEXT]


# --- reading (the admin API, the CLI) ------------------------------------------------------------


def read(path: str, key: str) -> list[dict[str, Any]]:
    """The records ``key`` names: an envelope id, a trace id (or a whole ``traceparent``), a
    Message-ID (with or without ``<>``), a correlation id or an Idempotency-Key. Each record:
    ``{"envelope_id", "events": [{"time", "at", "kind", ...}]}``, events in time order; the
    records in the order their messages arrived (the hops of a trace, one after the other), the
    newest :data:`MAX_ENVELOPES` when more share the key. Empty when nothing is known (or there is
    no store at ``path``)."""
    if not os.path.exists(path):
        return []
    ctx = tracecontext.parse(key.strip())
    value = ctx.trace_id if ctx is not None else _key(key)
    if len(value) == 32 and all(c in string.hexdigits for c in value):
        value = value.lower()  # a trace id (kept in lowercase, as W3C writes it)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        ids: list[str] = []
        if db.execute("SELECT 1 FROM event WHERE envelope_id=? LIMIT 1", (value,)).fetchone():
            ids.append(value)
        # newest first, a bounded read however many messages share the key (a busy correlation id)
        for (envelope_id,) in db.execute("SELECT envelope_id FROM key WHERE value=? ORDER BY seq DESC LIMIT ?",
                                         (value, 10 * MAX_ENVELOPES)):
            if envelope_id not in ids:
                ids.append(envelope_id)
        out: list[dict[str, Any]] = []
        for envelope_id in ids[:MAX_ENVELOPES]:
            events = []
            for (data,) in db.execute("SELECT data FROM event WHERE envelope_id=? ORDER BY seq LIMIT ?",
                                      (envelope_id, MAX_EVENTS)):
                try:
                    found = json.loads(data)
                except ValueError:
                    continue
                for ms, kind, values in found:
                    at = ms / 1000
                    events.append({"time": datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds"),
                                   "at": at, "kind": kind, **_fields(kind, values)})
            # stable: events of one millisecond keep their order, but for the reception (recorded
            # with the answer, after the routes it led to)
            events.sort(key=lambda e: (e["at"], e["kind"] != "received"))
            del events[MAX_EVENTS:]
            if events:  # (a key outlives its events by up to an hour)
                out.append({"envelope_id": envelope_id, "events": events})
        # read newest first: in arrival order, and one millisecond's messages in the order they were keyed
        return [r for _, r in sorted(enumerate(out), key=lambda ir: (ir[1]["events"][0]["at"], -ir[0]))]
    finally:
        with contextlib.suppress(sqlite3.Error):
            db.close()


def _fields(kind: str, values: list[Any]) -> dict[str, Any]:
    out = {name: v for name, v in zip(FIELDS.get(kind, ()), values, strict=False) if v is not None and v != ""}
    if "ids" in out:
        out["ids"] = dict(out["ids"])
    if "ms" in out:  # stored in microseconds
        out["ms"] = round(out["ms"] / 1000, 1)
    return out


def timeline(records: list[dict[str, Any]]) -> str:
    """The records as text for a terminal: one line per event, local time, what happened."""
    lines: list[str] = []
    for rec in records:
        lines.append(f"envelope {rec['envelope_id']}")
        for e in rec["events"]:
            when = datetime.fromtimestamp(e["at"]).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            lines.append(f"  {when}  {_describe(e)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _describe(e: dict[str, Any]) -> str:
    kind = e["kind"]
    if kind == "received":
        ids = " ".join(f"{k}={v}" for k, v in (e.get("ids") or {}).items())
        text = f"received   from {e.get('connector')} ({e.get('protocol')}) subject {e.get('subject')!r}"
        text += f"  answered {e.get('status')}" + (f" ({e['reason']})" if e.get("reason") else "")
        if e.get("duplicate_of"):
            text += f"  [repeat, arrived as {e['duplicate_of']}]"
        return text + (f"\n{'':27}{ids}" if ids else "")
    if kind == "route":
        return f"route      {e.get('route') or '-'}: {e.get('outcome')}" + (
            f" ({e['detail']})" if e.get("detail") else "")
    if kind == "attempt":
        return (f"attempt {e.get('attempt')}  {e.get('connector')} via {e.get('route')} ({e.get('mode')}): "
                f"{e.get('outcome')}" + (f" after {e['ms']} ms" if "ms" in e else "")
                + (f" — {e['answer']}" if e.get("answer") else ""))
    if kind in ("dead_letter", "dropped"):
        what = "dead letter" if kind == "dead_letter" else "dropped   "
        return (f"{what} {e.get('route') or '-'} → {e.get('connector') or '-'}: {e.get('reason')}"
                + (f" — {e['error']}" if e.get("error") else ""))
    if kind == "replay":
        return f"replay     by {e.get('by') or '?'}" + (f" to {e['connector']}" if e.get("connector") else "")
    return f"{kind} {json.dumps({k: v for k, v in e.items() if k not in ('time', 'at', 'kind')})}"
