"""imap — mailboxes in (watch folders, one envelope per message) and APPEND out (aioimaplib).

Features
  Inbound: one session per watched folder (``folders``), new mail noticed by IDLE (re-issued
  every ``idle_renew``) or, without IDLE, by polling every ``poll_interval``; search criteria
  ``unseen`` (default), ``since``, ``from``, ``subject``. TLS: implicit (993, the default),
  STARTTLS (required when chosen: no fallback, capabilities re-read over TLS) or ``none``
  (plain text, only when explicitly configured); the server certificate is verified
  (``ca_file`` for a private CA). Login with ``password`` or an XOAUTH2 ``oauth2_token`` (both
  secrets). Reconnects with backoff and jitter; a folder that cannot be opened makes the
  connector unhealthy, the others go on. Messages over ``max_size`` are not downloaded.
  Outbound: APPEND the message a target describes (built like SMTP outbound builds it, see
  :class:`connectors.mail_common.MailOptions`; an inbound ``message/rfc822`` body is appended
  unchanged) into ``folder`` (a template; created when missing) with optional ``flags``.

Delivery guarantee
  Inbound (at least once, duplicates suppressed): a message is fetched with ``BODY.PEEK`` (not
  marked read) and handed to the router; only an outcome that may be acknowledged (accepted,
  dead-lettered, dropped) marks it ``\\Seen``, moves it to ``move_to`` or deletes it (``after``);
  then the checkpoint — UIDVALIDITY and the highest UID handled, in the connector's state
  directory, fsync'd — moves past it. Retry: the message is left untouched, nothing later in
  the folder is taken before it (in UID order), and it is offered again after the outcome's
  ``retry_after``. Rejected (and over ``max_size``): moved to ``error_folder`` when set, else
  left unseen where it is; the checkpoint passes it, and a warning is logged. A crash between
  the outcome and the mark means the message is fetched again: it carries the same
  ``idempotency_key`` (folder, UIDVALIDITY, UID), so the gateway answers it from its first
  outcome and does not deliver it twice. A first start (no checkpoint) takes only mail that
  arrives from then on, plus the newest ``backfill`` messages. A changed UIDVALIDITY drops the
  checkpoint and scans the folder again by the search criteria (with ``unseen`` and ``after:
  seen``, handled mail is not taken again; moved or deleted mail is gone).
  Outbound: delivered once the server answered OK to APPEND. Connection failures, timeouts
  and NO with UNAVAILABLE/SERVERBUG/INUSE/LIMIT/OVERQUOTA are transient; other NO/BAD and a
  message that cannot be built are permanent. A retry after a lost answer may append twice
  (the Message-ID stays the same, so a reader can tell).

Address form
  ``host`` (+ ``port``, ``tls``), ``username`` and a secret; folders by name (non-ASCII names
  are sent in modified UTF-7).

Envelope (inbound)
  Same as SMTP inbound's: ``subject`` = the mailbox address (``address``, default the
  username, lower-cased), ``body`` = the raw message, ``content_type`` = ``message/rfc822``,
  ``headers`` = Subject, From, To, Cc, Reply-To, Date, Message-ID, In-Reply-To, References and
  every ``X-*`` header; ``attributes``: ``mail_from`` (Return-Path, else From), ``rcpt`` (the
  mailbox), ``size``, ``email`` (parsed view: text, html, attachments metadata, defects),
  ``idempotency_key``, ``imap.folder``, ``imap.uid``, ``imap.uidvalidity``, ``imap.flags``;
  with ``auth_check``, ``auth`` (DKIM and DMARC; SPF is ``none`` without a client IP) and an
  ``Authentication-Results`` header on the body. Nothing is refused for its results
  (``policy: reject`` tags like ``tag``): routes decide.

Sealing (outbound)
  With ``dkim``, ``smime`` or ``pgp`` (:mod:`connectors.mailauth`) every appended message is
  sealed first (a route may set ``seal: {sign, encrypt, missing_key}``); a sealing failure is
  permanent, a sealer that cannot be set up keeps the connector down (transient).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aioimaplib
from pydantic import ValidationError

from connectors.imap.config import ImapConfig, ImapTarget, check_folder
from connectors.imap.mapping import authenticate, mail_envelope_off_loop
from connectors.imap.session import ImapRefused, LoginFailed, Session, SessionLost, open_session
from connectors.imap.state import CheckpointStore, FolderCheckpoint, StateError
from connectors.mail_common import PARSERS, HeaderInjection, MailError, build_mail, validated_options
from connectors.mail_common.mailbox import RetryLater, auth_verifier
from connectors.mailauth import OutboundSealing, Verifier
from gateway.sdk import (
    Backoff,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Envelope,
    Health,
    InFlight,
    PermanentError,
    Reply,
    Status,
    Target,
    TransientError,
    cancel_and_wait,
    current_secret,
    event,
)

__all__ = ["ImapConfig", "ImapConnector", "ImapTarget"]

#: How long stopping waits for a folder's watcher to end after cancelling it.
_STOP_WAIT = 5.0
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class ImapConnector(Connector):
    kind = "imap"
    parsers = PARSERS
    Config = ImapConfig
    Options = ImapTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, ImapConfig)
        self.cfg = config
        self.store = CheckpointStore(ctx.state_dir)
        # inbound
        self._deliver: Deliver | None = None
        self._listening = False
        self._stop = asyncio.Event()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._sessions: dict[str, Session] = {}
        self._folder_error: dict[str, str] = {}
        self._busy = InFlight()
        self._verifier: Verifier | None = None
        # outbound
        self._out: Session | None = None
        self._out_lock = asyncio.Lock()
        self._out_error = ""
        self._sealing = OutboundSealing(config, log=self.log, connector=self.name)

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Log in once now, so an unreachable server or wrong credentials show at start; the
        session is kept for APPEND. Sealing (if configured) is made ready first."""
        await self._sealing.open()
        async with self._out_lock:
            await self._outbound()

    async def listen(self, deliver: Deliver) -> None:
        if self._verifier is None:
            self._verifier = auth_verifier(self.cfg.auth_check, self.log)
        self._deliver = deliver
        self._listening = True
        self._stop.clear()
        for folder in self.cfg.folders:
            if folder not in self._watchers or self._watchers[folder].done():
                self._folder_error[folder] = "connecting"
                self._watchers[folder] = asyncio.create_task(self._watch(folder), name=f"imap-{self.name}-{folder}")

    async def stop_listening(self, drain: float) -> None:
        """Take no new message; let the one in hand get its outcome (up to ``drain``); log out.
        A message whose outcome did not arrive stays untouched on the server."""
        self._listening = False
        self._stop.set()
        await self._busy.drained(drain)
        # Bounded: a watcher stuck in the IMAP library must not hold the gateway's shutdown; its
        # session is closed below anyway.
        stuck = await cancel_and_wait(self._watchers.values(), _STOP_WAIT)
        if stuck:
            event(self.log, "imap.stop_timeout", logging.WARNING, connector=self.name,
                  folders=sorted(f for f, t in self._watchers.items() if t in stuck))
        self._watchers.clear()
        for session in list(self._sessions.values()):
            await session.logout()
        self._sessions.clear()

    async def close(self) -> None:
        if self._watchers:
            await self.stop_listening(0)
        async with self._out_lock:
            if self._out is not None:
                await self._out.logout()
                self._out = None
        await asyncio.to_thread(self.store.close)
        await self._sealing.close()
        self._out_error = "closed"

    def health(self) -> Health:
        if self._listening:
            bad = {f: e for f, e in self._folder_error.items() if e}
            if self._sealing.error:
                bad["APPEND"] = self._sealing.error
            if bad:
                return Health(False, "; ".join(f"{f}: {e}" for f, e in sorted(bad.items())))
            return Health(True)
        error = self._out_error or self._sealing.error
        return Health(not error, error)

    async def _login(self) -> Session:
        """A new session. The password or token is read again from its file (``{file: …}``) at
        every login, so a renewed access token is used from the next reconnect on."""
        cfg = self.cfg
        return await open_session(cfg, current_secret(cfg.password), current_secret(cfg.oauth2_token))

    # --- inbound -------------------------------------------------------------------------

    async def _watch(self, folder: str) -> None:
        """Keep one session on ``folder``: reconnect with backoff and jitter until stopped."""
        backoff = Backoff(1.0, 60.0)
        while self._listening:
            session: Session | None = None
            try:
                session = await self._login()
                self._sessions[folder] = session
                await self._follow(session, folder)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except LoginFailed as exc:
                self._down(folder, str(exc), logging.ERROR, "imap.login_failed")
            except (SessionLost, ImapRefused, StateError) as exc:
                self._down(folder, str(exc), logging.WARNING, "imap.folder_down")
            except Exception as exc:  # a bug must not end the watch for good
                self.log.exception("imap.bug", extra={"fields": {"connector": self.name, "folder": folder}})
                self._down(folder, f"internal error: {type(exc).__name__}", logging.ERROR, "imap.folder_down")
            finally:
                self._sessions.pop(folder, None)
                if session is not None:
                    await session.logout()
            if not self._listening:
                break
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=backoff.next())
            except TimeoutError:
                pass

    def _down(self, folder: str, error: str, level: int, name: str) -> None:
        self._folder_error[folder] = error
        event(self.log, name, level, connector=self.name, folder=folder, error=error)

    async def _follow(self, session: Session, folder: str) -> None:
        """Select ``folder``, settle the checkpoint, then take new mail until stopped."""
        uidvalidity, uidnext = await session.select(folder)
        cp = await self.store.folder(folder)
        if cp is None:
            if uidnext:
                last = uidnext - 1
            else:  # a server that does not announce UIDNEXT: the highest UID there is
                last = max(await session.search(["UID 1:*"]), default=0)
            if self.cfg.backfill:
                existing = await session.search(self._criteria(1))
                if existing:
                    last = min(last, existing[-self.cfg.backfill:][0] - 1)
            cp = FolderCheckpoint(uidvalidity, last)
            await self.store.set_folder(folder, cp)
            event(self.log, "imap.first_start", connector=self.name, folder=folder, uidvalidity=uidvalidity,
                  from_uid=last + 1, backfill=self.cfg.backfill)
        elif cp.uidvalidity != uidvalidity:
            event(self.log, "imap.uidvalidity_changed", logging.WARNING, connector=self.name, folder=folder,
                  old=cp.uidvalidity, new=uidvalidity, note="checkpoint dropped; the folder is scanned again")
            cp = FolderCheckpoint(uidvalidity, 0)
            await self.store.set_folder(folder, cp)
        self._folder_error[folder] = ""
        while self._listening:
            uids = [u for u in await session.search(self._criteria(cp.last_uid + 1)) if u > cp.last_uid]
            try:
                for uid in uids[:self.cfg.batch]:
                    if not self._listening:
                        return
                    with self._busy:  # stop_listening waits (up to its drain) for these two steps
                        await self._take(session, folder, uidvalidity, uid)
                        cp = FolderCheckpoint(uidvalidity, uid)
                        await self.store.set_folder(folder, cp)
            except RetryLater as retry:
                await self._until_stopped(asyncio.sleep(retry.after))
                continue
            if len(uids) > self.cfg.batch:
                continue
            if self.cfg.idle and "IDLE" in session.capabilities:
                await self._until_stopped(session.wait_for_change(self.cfg.idle_renew))
            else:
                await self._until_stopped(asyncio.sleep(self.cfg.poll_interval))

    async def _until_stopped(self, coro: Any) -> None:
        waiter = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not waiter.done():
                await cancel_and_wait({waiter}, _STOP_WAIT)
        if waiter.done() and not waiter.cancelled():
            failure = waiter.exception()
            if failure is not None:
                raise failure

    def _criteria(self, from_uid: int) -> list[str]:
        s = self.cfg.search
        out = [f"UID {from_uid}:*"]
        if s.unseen:
            out.append("UNSEEN")
        if s.since is not None:
            out += ["SINCE", f"{s.since.day}-{_MONTHS[s.since.month - 1]}-{s.since.year}"]
        if s.from_:
            out += ["FROM", aioimaplib.quoted(s.from_)]
        if s.subject:
            out += ["SUBJECT", aioimaplib.quoted(s.subject)]
        if not all(part.isascii() for part in out):
            out = ["CHARSET", "UTF-8", *out]
        return out

    async def _take(self, session: Session, folder: str, uidvalidity: int, uid: int) -> None:
        """Hand one message to the router and answer the server as the outcome says. Returns
        when the checkpoint may pass it; raises RetryLater to be offered it again later."""
        assert self._deliver is not None
        meta = await session.fetch_meta(uid)
        if meta is None:
            return  # expunged meanwhile
        where: dict[str, Any] = {"connector": self.name, "folder": folder, "uid": uid}
        if meta.size > self.cfg.max_size:
            event(self.log, "imap.too_large", logging.WARNING, size=meta.size, limit=self.cfg.max_size,
                  moved_to=self.cfg.error_folder or "", **where)
            await self._set_aside(session, uid)
            return
        raw = await session.fetch_body(uid)
        if raw is None:
            return
        raw, auth = await authenticate(self._verifier, raw, connector=self.name)
        env = await mail_envelope_off_loop(
            raw, source=self.name, protocol="imap", mailbox=self.cfg.mailbox_address,
            idempotency_key=f"imap:{folder}:{uidvalidity}:{uid}",
            extra={"imap.folder": folder, "imap.uid": uid, "imap.uidvalidity": uidvalidity,
                   "imap.flags": sorted(meta.flags)}, auth=auth)
        event(self.log, "imap.fetched", logging.DEBUG, envelope_id=env.id, size=len(raw), **where)
        outcome = await self._deliver(env)
        if outcome.acknowledge:
            await self._after(session, uid, env.id)
            return
        if outcome.status is Status.RETRY:
            event(self.log, "imap.retry_later", envelope_id=env.id, reason=outcome.reason, **where)
            raise RetryLater.after_outcome(outcome)
        event(self.log, "imap.rejected", logging.WARNING, envelope_id=env.id, reason=outcome.reason,
              moved_to=self.cfg.error_folder or "", **where)
        await self._set_aside(session, uid)

    async def _after(self, session: Session, uid: int, envelope_id: str) -> None:
        try:
            if self.cfg.after == "seen":
                await session.add_flags(uid, "\\Seen")
            elif self.cfg.after == "move":
                assert self.cfg.move_to is not None
                await session.move(uid, self.cfg.move_to)
            else:
                await session.delete(uid)
        except ImapRefused as exc:
            if exc.transient:
                raise
            # Accepted by the gateway but the server will not mark it: do not take it again.
            event(self.log, "imap.after_failed", logging.ERROR, envelope_id=envelope_id, connector=self.name,
                  uid=uid, action=self.cfg.after, error=str(exc))

    async def _set_aside(self, session: Session, uid: int) -> None:
        if self.cfg.error_folder:
            await session.move(uid, self.cfg.error_folder)

    # --- outbound ------------------------------------------------------------------------

    async def _outbound(self) -> Session:
        if self._out is None or self._out.lost.is_set():
            self._out = None
            try:
                self._out = await self._login()
            except (SessionLost, LoginFailed) as exc:
                self._out_error = str(exc)
                raise TransientError(f"IMAP {self.cfg.host}:{self.cfg.effective_port}: {exc}") from exc
            self._out_error = ""
        return self._out

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        try:
            opts = ImapTarget.model_validate(validated_options(target))
            folder = check_folder(opts.folder)
            built = build_mail(env, opts, route=target.route, require_recipients=False,
                               default_sender=self.cfg.sender or self.cfg.mailbox_address)
        except (ValidationError, HeaderInjection, MailError, ValueError) as exc:
            raise PermanentError(f"cannot build the message: {exc}") from exc
        data = await self._sealing.seal(built.data, recipients=built.recipients, options=opts.seal,
                                        envelope_id=env.id)
        async with self._out_lock:
            session = await self._outbound()
            try:
                await session.append(folder, data, opts.flags, env.time)
            except SessionLost as exc:
                self._out = None
                raise TransientError(f"APPEND to {folder!r}: {exc}") from exc
            except ImapRefused as exc:
                if exc.transient:
                    raise TransientError(f"APPEND to {folder!r}: {exc}") from exc
                raise PermanentError(f"APPEND to {folder!r}: {exc}") from exc
        event(self.log, "imap.appended", logging.DEBUG, envelope_id=env.id, connector=self.name, folder=folder,
              route=target.route, size=len(data))
        return None
