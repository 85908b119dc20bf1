"""pop3 — a POP3 maildrop in: one envelope per message (stdlib poplib in a worker thread).

Features
  Inbound only. Polls every ``poll_interval``: UIDL and LIST, then RETR of each message not
  dealt with before, oldest first, up to ``batch`` per session. TLS: implicit (995, the
  default), STLS (required when chosen) or ``none`` (plain text, only when explicitly
  configured); the server certificate is verified (``ca_file`` for a private CA); USER/PASS
  with a secret password. Messages over ``max_size`` (by LIST) are not downloaded; a server
  sending more than it announced, or a line over 1 MiB, ends the session. Reconnects with
  backoff and jitter.

Delivery guarantee (at least once, duplicates suppressed)
  Every message is tracked by its UIDL in the connector's state directory (SQLite, fsync'd).
  Accepted / dead-lettered / dropped → the UIDL is recorded as done, then the message is
  deleted (DELE, committed by QUIT) unless ``leave_on_server``; a delete that did not commit
  (crash, lost connection) is issued again at the next session, and the message is not
  delivered again. Retry → nothing is recorded or deleted; the session ends and the message is
  offered again after the outcome's ``retry_after``. Rejected, or over ``max_size`` → recorded
  as rejected and left on the server, with a warning. A crash after the outcome but before the
  UIDL is recorded means the message is fetched again: its ``idempotency_key`` (the UIDL) makes
  the gateway answer it from its first outcome instead of delivering it twice. The first start
  records the messages already on the server without taking them — except the newest
  ``backfill`` ones — so a poller never downloads 20,000 old mails. UIDLs of messages that left
  the server are forgotten, so the state stays as small as the maildrop.

Address form
  ``host`` (+ ``port``, ``tls``), ``username``, ``password`` (a secret).

Envelope
  The same as IMAP's and SMTP inbound's (see :func:`connectors.imap.mapping.mail_envelope`):
  ``subject`` = the mailbox address (``address``, default the username, lower-cased),
  ``content_type`` = ``message/rfc822``, ``attributes``: ``mail_from``, ``rcpt``, ``size``,
  ``email``, ``idempotency_key``, ``pop3.uidl``; with ``auth_check``, ``auth`` (DKIM and DMARC;
  SPF is ``none`` without a client IP) and an ``Authentication-Results`` header on the body.
  Nothing is refused for its results (``policy: reject`` tags like ``tag``): routes decide.
"""

from __future__ import annotations

import asyncio
import logging
import poplib
import ssl
from typing import Any, Literal

from pydantic import Field, field_validator

from connectors.imap.mapping import authenticate, mail_envelope_off_loop
from connectors.imap.session import tls_reason
from connectors.imap.state import CheckpointStore, StateError
from connectors.mail_common import PARSERS
from connectors.mail_common.mailbox import RetryLater, auth_verifier
from connectors.mailauth import AuthCheckSettings, Verifier
from gateway.sdk import (
    Backoff,
    ByteSize,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Duration,
    Health,
    Secret,
    Status,
    current_secret,
    event,
)

__all__ = ["Pop3Config", "Pop3Connector"]

#: Longest line accepted from the server (poplib's own limit, 2048, refuses real-world mail).
MAX_LINE = 1024 * 1024


class Pop3Config(ConnectorConfig, AuthCheckSettings):
    type: Literal["pop3"] = "pop3"
    host: str
    #: Default: 995 for ``implicit`` TLS, 110 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: str | None = None
    username: str
    password: Secret
    #: The mailbox's address: subject and ``rcpt`` of the envelopes. Default: ``username``.
    address: str | None = None
    #: Keep messages on the server after they were taken (tracked by UIDL only).
    leave_on_server: bool = False
    #: On the very first start, also take up to this many of the newest messages already there.
    backfill: int = Field(default=0, ge=0, le=100_000)
    poll_interval: Duration = 60.0
    max_size: ByteSize = 25 * 1024 * 1024
    #: Messages taken per session.
    batch: int = Field(default=100, ge=1, le=10_000)
    connect_timeout: Duration = 10.0
    #: Socket timeout for each command once logged in.
    command_timeout: Duration = 60.0

    @field_validator("username", "host")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v or not v.isprintable() or " " in v:
            raise ValueError("must be printable, without spaces")
        return v

    @property
    def effective_port(self) -> int:
        return self.port or (995 if self.tls == "implicit" else 110)

    @property
    def mailbox_address(self) -> str:
        return (self.address or self.username).lower()


class LoginFailed(Exception):
    pass


class _Bounded:
    """poplib's line reader with a larger line limit and a byte budget per long response."""

    budget: int | None = None
    file: Any

    def _getline(self) -> tuple[bytes, int]:
        line: bytes = self.file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise poplib.error_proto("-ERR line longer than 1 MiB")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        if self.budget is not None:
            self.budget -= len(line)
            if self.budget < 0:
                raise poplib.error_proto("-ERR the server sent more than the size it announced")
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets


class _POP3(_Bounded, poplib.POP3):
    pass


class _POP3_SSL(_Bounded, poplib.POP3_SSL):
    pass


class _Maildrop:
    """One logged-in POP3 session; every method blocks (call it in a worker thread)."""

    def __init__(self, cfg: Pop3Config, password: str) -> None:
        ctx: ssl.SSLContext | None = None
        if cfg.tls != "none":
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        conn: poplib.POP3
        if cfg.tls == "implicit":
            conn = _POP3_SSL(cfg.host, cfg.effective_port, timeout=cfg.connect_timeout, context=ctx)
        else:
            conn = _POP3(cfg.host, cfg.effective_port, timeout=cfg.connect_timeout)
        self.conn = conn
        try:
            if cfg.tls == "starttls":
                conn.stls(context=ctx)
            try:
                conn.user(cfg.username)
                conn.pass_(password)
            except poplib.error_proto as exc:
                raise LoginFailed(f"login as {cfg.username!r} refused: {_text(exc)}") from None
            conn.sock.settimeout(cfg.command_timeout)
        except BaseException:
            self.close()
            raise

    def listing(self) -> list[tuple[int, str, int]]:
        """(number, UIDL, size) of every message, in maildrop order (oldest first)."""
        _, uidl_lines, _ = self.conn.uidl()
        _, list_lines, _ = self.conn.list()
        sizes = {}
        for line in list_lines:
            num, _, size = line.decode("ascii", "replace").partition(" ")
            sizes[int(num)] = int(size.split()[0]) if size.strip() else 0
        out = []
        for line in uidl_lines:
            num, _, uidl = line.decode("ascii", "replace").partition(" ")
            out.append((int(num), uidl.strip(), sizes.get(int(num), 0)))
        return out

    def retr(self, num: int, size: int) -> bytes:
        assert isinstance(self.conn, _Bounded)
        self.conn.budget = size + size // 10 + 64 * 1024  # CRLF and dot-stuffing differences
        try:
            _, lines, _ = self.conn.retr(num)
        finally:
            self.conn.budget = None
        return b"\r\n".join(lines) + b"\r\n"

    def dele(self, num: int) -> None:
        self.conn.dele(num)

    def quit(self) -> None:
        self.conn.quit()

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def _text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return tls_reason(exc)
    if isinstance(exc, poplib.error_proto) and exc.args and isinstance(exc.args[0], bytes):
        return exc.args[0].decode("utf-8", "replace")[:300]
    return str(exc)[:300]


class Pop3Connector(Connector):
    kind = "pop3"
    parsers = PARSERS
    Config = Pop3Config
    supports_inbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, Pop3Config)
        self.cfg = config
        self.store = CheckpointStore(ctx.state_dir)
        self._deliver: Deliver | None = None
        self._listening = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drop: _Maildrop | None = None
        self._error = "not polled yet"
        self._verifier: Verifier | None = None

    async def listen(self, deliver: Deliver) -> None:
        if self._verifier is None:
            self._verifier = auth_verifier(self.cfg.auth_check, self.log)
        self._deliver = deliver
        self._listening = True
        self._stop.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"pop3-{self.name}")

    async def stop_listening(self, drain: float) -> None:
        """Finish the message in hand (up to ``drain``) and QUIT, so its delete commits."""
        self._listening = False
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=drain)
        except TimeoutError:  # the message in hand stays on the server, unrecorded: offered again
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_listening(0)
        await asyncio.to_thread(self.store.close)

    def health(self) -> Health:
        if not self._listening:
            return Health(True)
        return Health(not self._error, self._error)

    async def _run(self) -> None:
        backoff = Backoff(1.0, 60.0)
        while self._listening:
            wait = self.cfg.poll_interval
            try:
                more = await self._session()
                self._error = ""
                backoff.reset()
                if more:
                    wait = 0.0
            except asyncio.CancelledError:
                raise
            except RetryLater as retry:
                self._error = ""
                wait = retry.after
            except LoginFailed as exc:
                self._fail(str(exc), logging.ERROR, "pop3.login_failed")
                wait = backoff.next()
            except (OSError, poplib.error_proto, StateError) as exc:
                self._fail(f"{type(exc).__name__}: {_text(exc)}", logging.WARNING, "pop3.session_failed")
                wait = backoff.next()
            except Exception as exc:
                self.log.exception("pop3.bug", extra={"fields": {"connector": self.name}})
                self._fail(f"internal error: {type(exc).__name__}", logging.ERROR, "pop3.session_failed")
                wait = backoff.next()
            if not self._listening:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=wait)
            except TimeoutError:
                pass

    def _fail(self, error: str, level: int, name: str) -> None:
        self._error = error
        event(self.log, name, level, connector=self.name, host=self.cfg.host, error=error)

    async def _session(self) -> bool:
        """One session: take what is new, QUIT. True when more is waiting (poll again now)."""
        drop = await asyncio.to_thread(_Maildrop, self.cfg, current_secret(self.cfg.password))  # file: read again
        quit_ok = False
        try:
            try:
                more = await self._take_new(drop)
            except RetryLater:
                await asyncio.to_thread(drop.quit)  # commit what was taken before it
                quit_ok = True
                raise
            await asyncio.to_thread(drop.quit)  # commits the DELEs
            quit_ok = True
            return more
        finally:
            if not quit_ok:
                await asyncio.to_thread(drop.close)  # without QUIT the server undoes our DELEs

    async def _take_new(self, drop: _Maildrop) -> bool:
        assert self._deliver is not None
        listing = await asyncio.to_thread(drop.listing)
        known = await self.store.pop3_known()
        if known is None:
            newest = {uidl for _, uidl, _ in listing[-self.cfg.backfill:]} if self.cfg.backfill else set()
            old = [uidl for _, uidl, _ in listing if uidl not in newest]
            await self.store.pop3_start(old)
            known = dict.fromkeys(old, "old")
            event(self.log, "pop3.first_start", connector=self.name, on_server=len(listing), skipped=len(old),
                  backfill=len(listing) - len(old))
        else:
            await self.store.pop3_prune(uidl for _, uidl, _ in listing)
        if not self.cfg.leave_on_server:
            for num, uidl, _ in listing:
                if known.get(uidl) == "done":  # taken before; its delete did not commit
                    await asyncio.to_thread(drop.dele, num)
        new = [m for m in listing if m[1] not in known]
        for num, uidl, size in new[:self.cfg.batch]:
            if not self._listening:
                return False
            await self._take(drop, num, uidl, size)
        return len(new) > self.cfg.batch

    async def _take(self, drop: _Maildrop, num: int, uidl: str, size: int) -> None:
        assert self._deliver is not None
        where: dict[str, Any] = {"connector": self.name, "uidl": uidl}
        if size > self.cfg.max_size:
            event(self.log, "pop3.too_large", logging.WARNING, size=size, limit=self.cfg.max_size,
                  note="left on the server", **where)
            await self.store.pop3_mark(uidl, "rejected")
            return
        raw = await asyncio.to_thread(drop.retr, num, size)
        raw, auth = await authenticate(self._verifier, raw, connector=self.name)
        env = await mail_envelope_off_loop(raw, source=self.name, protocol="pop3", mailbox=self.cfg.mailbox_address,
                                           idempotency_key=f"pop3:{uidl}", extra={"pop3.uidl": uidl}, auth=auth)
        event(self.log, "pop3.fetched", logging.DEBUG, envelope_id=env.id, size=len(raw), **where)
        outcome = await self._deliver(env)
        if outcome.acknowledge:
            await self.store.pop3_mark(uidl, "done")
            if not self.cfg.leave_on_server:
                await asyncio.to_thread(drop.dele, num)
            return
        if outcome.status is Status.RETRY:
            event(self.log, "pop3.retry_later", envelope_id=env.id, reason=outcome.reason, **where)
            raise RetryLater.after_outcome(outcome)
        event(self.log, "pop3.rejected", logging.WARNING, envelope_id=env.id, reason=outcome.reason,
              note="left on the server", **where)
        await self.store.pop3_mark(uidl, "rejected")

