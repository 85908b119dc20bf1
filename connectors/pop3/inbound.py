"""The POP3 connector's inbound side: the polling loop and what it does with each message.

:class:`Pop3Inbound` opens a session (:class:`~connectors.pop3.maildrop.Maildrop`) every
``poll_interval``, takes what is new by UIDL, hands each message to the router and records,
deletes or leaves it by outcome. The guarantees are described in :mod:`connectors.pop3`.
"""

from __future__ import annotations

import asyncio
import logging
import poplib
from typing import Any

from connectors.imap.mapping import authenticate, mail_envelope_off_loop
from connectors.imap.state import CheckpointStore, StateError
from connectors.mail_common.mailbox import RetryLater, auth_verifier
from connectors.mailauth import Verifier
from connectors.pop3.config import Pop3Config
from connectors.pop3.maildrop import LoginFailed, Maildrop, _text
from gateway.sdk import (
    Backoff,
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Status,
    current_secret,
    event,
)

__all__ = ["Pop3Inbound"]


class Pop3Inbound(Connector):
    """The polling loop, its sessions and the state of each UIDL."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, Pop3Config)
        self.cfg = config
        self.store = CheckpointStore(ctx.state_dir)
        self._deliver: Deliver | None = None
        self._listening = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drop: Maildrop | None = None
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
        drop = await asyncio.to_thread(Maildrop, self.cfg, current_secret(self.cfg.password))  # file: read again
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

    async def _take_new(self, drop: Maildrop) -> bool:
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

    async def _take(self, drop: Maildrop, num: int, uidl: str, size: int) -> None:
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

