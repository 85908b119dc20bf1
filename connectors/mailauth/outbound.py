"""The sealing step of a mail target connector (``smtp``, ``maildir``, ``imap`` APPEND).

A connector keeps one :class:`OutboundSealing` from ``open`` to ``close`` and passes every
message it built through :meth:`OutboundSealing.seal` just before it leaves. Contract:

* ``open`` builds the :class:`~connectors.mailauth.seal.Sealer` (reads certificates and keys)
  and opens it (imports the PGP keys, test-signs). A problem raises :class:`TransientError`
  naming it, and :attr:`error` keeps it for the connector's health: the connector is down, and
  messages wait (retried) until the operator fixes it.
* ``seal`` returns the wire bytes to send. While sealing is configured but not usable it raises
  :class:`TransientError` (nothing leaves unsigned); signing and encryption failures are the
  Sealer's :class:`PermanentError`. Without any sealing configured it returns the bytes
  unchanged, unless the route asks to sign or encrypt: that is a :class:`PermanentError`.
* ``seal_copies`` is ``seal`` for a sender that knows which recipients are Bcc: it returns the
  copies to send, each with its recipients (an encrypted message is made for each Bcc
  recipient on its own; see :mod:`connectors.mailauth.seal`), and makes the body 7-bit first
  when the relay cannot take 8-bit (``seven_bit``), sealing configured or not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from connectors.mailauth.config import SealOptions
from connectors.mailauth.mime import message_7bit
from connectors.mailauth.seal import Copy, Sealer, Sealing
from gateway.sdk import TransientError, event


class OutboundSealing:
    def __init__(self, cfg: Sealing, *, log: logging.Logger, connector: str):
        self.cfg = cfg
        self.log = log
        self.connector = connector
        #: DKIM, S/MIME or PGP is configured: every message goes through the Sealer.
        self.configured = bool(cfg.dkim or cfg.smime or cfg.pgp)
        #: Why sealing cannot work right now ("" when it can, or when nothing is configured).
        self.error = ""
        self._sealer: Sealer | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Make the Sealer ready. Raises :class:`TransientError` (idempotent)."""
        if not self.configured or self._sealer is not None:
            return
        async with self._lock:
            if self._sealer is not None:
                return
            sealer: Sealer | None = None
            try:
                sealer = Sealer(self.cfg, log=self.log, connector=self.connector)
                await sealer.open()
            except ValueError as exc:
                if sealer is not None:
                    await sealer.close()  # a failed PGP open may have started a gpg-agent
                self.error = f"sealing is not usable: {exc}"
                event(self.log, "mailauth.seal_unusable", logging.ERROR, connector=self.connector,
                      error=self.error)
                raise TransientError(self.error) from exc
            self._sealer, self.error = sealer, ""

    async def seal(self, data: bytes, *, recipients: Sequence[str],
                   options: SealOptions | Mapping[str, Any] | None, envelope_id: str) -> bytes:
        """``data`` signed and encrypted as configured (CRLF), or unchanged when nothing is.

        ``recipients`` are the envelope's; empty (a Maildir or APPEND target without ``to``),
        the Sealer takes the addresses in To, Cc and Bcc.
        """
        if not self.configured:
            # Raises PermanentError when the route asks to sign or encrypt: never sent weaker.
            Sealer(self.cfg).plan(options)
            return data
        await self.open()
        assert self._sealer is not None
        return await self._sealer.seal(data, recipients=list(recipients) or None, options=options,
                                       envelope_id=envelope_id)

    async def seal_copies(self, data: bytes, *, recipients: Sequence[str], hidden: Sequence[str],
                          options: SealOptions | Mapping[str, Any] | None, envelope_id: str,
                          seven_bit: bool = False) -> list[Copy]:
        """The copies of ``data`` to send, each sealed for its own recipients (see the module card)."""
        if not self.configured:
            Sealer(self.cfg).plan(options)
            if seven_bit:
                data = await asyncio.to_thread(message_7bit, data)
            return [Copy(tuple(recipients), data)]
        await self.open()
        assert self._sealer is not None
        return await self._sealer.seal_copies(data, recipients=recipients, hidden=hidden, options=options,
                                              envelope_id=envelope_id, seven_bit=seven_bit)

    async def close(self) -> None:
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            await sealer.close()
