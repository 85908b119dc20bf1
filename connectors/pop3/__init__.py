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

Parts
  ``config.py`` the options, ``maildrop.py`` one blocking POP3 session, ``inbound.py`` the
  polling and what each outcome does; this module the lifecycle. Inbound only, so no
  ``outbound.py``; the envelope is IMAP's (:mod:`connectors.imap.mapping`), so no ``mapping.py``.
"""

from __future__ import annotations

import asyncio

from connectors.mail_common import PARSERS
from connectors.pop3.config import Pop3Config
from connectors.pop3.inbound import Pop3Inbound
from gateway.sdk import Health

__all__ = ["Pop3Config", "Pop3Connector"]


class Pop3Connector(Pop3Inbound):
    kind = "pop3"
    parsers = PARSERS
    Config = Pop3Config
    supports_inbound = True
    subject_syntax = "glob"

    async def close(self) -> None:
        await self.stop_listening(0)
        await asyncio.to_thread(self.store.close)

    def health(self) -> Health:
        if not self._listening:
            return Health(True)
        return Health(not self._error, self._error)
