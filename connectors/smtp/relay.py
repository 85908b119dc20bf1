"""Outbound SMTP: a small pool of aiosmtplib connections to one relay.

``send`` blocks until the relay answered the end of DATA. Errors are translated here: a 4xx
reply, a timeout, a refused or dropped connection or a TLS failure are transient (the core
retries with backoff); a 5xx reply is permanent (the core dead-letters with the relay's reply).
When only some recipients are refused, any 4xx among them makes the whole send transient (the
retry may deliver twice to the others: at-least-once); 5xx only makes it permanent.

Idle connections are kept for ``keepalive`` seconds and reused; a reused connection that turns
out to be closed by the relay is replaced once, at once.

8-bit mail: a message with 8-bit bytes goes with ``BODY=8BITMIME`` (RFC 6152), and with
``SMTPUTF8`` (RFC 6531) when an address or a header field is not ASCII. The relay must have
announced them at EHLO: the sender asks :meth:`Relay.offers_8bitmime` first and makes the body
7-bit before DKIM signs it when the answer is no. A message that needs SMTPUTF8 from a relay
without it is permanent (as Postfix bounces it); 8-bit data for a relay that stopped offering
8BITMIME is transient (the next attempt converts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from urllib.parse import urlsplit

import aiosmtplib

from connectors.smtp.config import SmtpConfig
from gateway.sdk import GatewayError, PermanentError, TransientError, current_secret, event


def translate(exc: BaseException) -> GatewayError:
    """The gateway's error for an aiosmtplib (or socket/TLS) failure."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = {r.recipient: f"{r.code} {r.message}" for r in exc.recipients}
        text = "; ".join(f"<{k}> {v}" for k, v in refused.items())[:1000]
        if all(r.code >= 500 for r in exc.recipients):
            return PermanentError(f"relay refused every recipient: {text}", detail={"refused": refused})
        return TransientError(f"relay refused every recipient for now: {text}", detail={"refused": refused})
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reply = f"{exc.code} {exc.message}"[:1000]
        detail = {"code": exc.code, "reply": exc.message[:1000]}
        if exc.code >= 500:
            return PermanentError(f"relay answered {reply}", detail=detail)
        return TransientError(f"relay answered {reply}", detail=detail)
    if isinstance(exc, TimeoutError):
        return TransientError("relay did not answer in time", code=504)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TransientError(f"TLS with the relay failed: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException | OSError):
        return TransientError(f"relay unreachable: {type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError | UnicodeError):
        return PermanentError(f"message cannot be sent as is: {exc}")
    return TransientError(f"relay: unexpected {type(exc).__name__}")


def mail_options(sender: str, recipients: list[str], data: bytes, extensions: dict[str, str]) -> list[str]:
    """The MAIL FROM parameters ``data`` needs from a relay with these EHLO ``extensions``.

    Raises :class:`PermanentError` (SMTPUTF8 needed, not offered) or :class:`TransientError`
    (8BITMIME needed, not offered: the caller converts and tries again).
    """
    addresses_ascii = sender.isascii() and all(r.isascii() for r in recipients)
    if addresses_ascii and data.isascii():
        return []
    head_end = data.find(b"\r\n\r\n")
    head = data if head_end < 0 else data[:head_end]
    options: list[str] = []
    if not (addresses_ascii and head.isascii()):
        if "smtputf8" not in extensions:
            raise PermanentError("the relay does not offer SMTPUTF8, which this message needs (an address or "
                                 "a header field is not ASCII)")
        options.append("SMTPUTF8")
    if not data.isascii():
        if "8bitmime" not in extensions:
            raise TransientError("the relay does not offer 8BITMIME (any more); the next attempt sends the "
                                 "body 7-bit")
        options.insert(0, "BODY=8BITMIME")
    return options


class Relay:
    def __init__(self, cfg: SmtpConfig, name: str, log: logging.Logger):
        assert cfg.url is not None
        parts = urlsplit(cfg.url)
        self.cfg = cfg
        self.name = name
        self.log = log
        self.smtps = parts.scheme == "smtps"
        self.host = parts.hostname or ""
        self.port = parts.port or (465 if self.smtps else 587)
        self.error = ""
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots: asyncio.Semaphore | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._tls = self._tls_context()
        #: Whether the relay announced 8BITMIME at its last EHLO (None: not asked yet).
        self._8bitmime: bool | None = None

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cfg.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.cfg.verify_tls:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def start(self) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_connections)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap(), name=f"smtp-relay-{self.name}")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(c) for c, _ in idle))

    async def offers_8bitmime(self) -> bool:
        """Whether the relay takes 8-bit bodies, as it said at its last EHLO (asked when not known).

        Raises Transient/PermanentError as :meth:`send` does when the relay cannot be reached.
        """
        if self._8bitmime is None:
            self.start()
            assert self._slots is not None
            async with self._slots:
                client = self._take_idle() or await self._connect()
                try:
                    await self._ehlo(client)
                except Exception as exc:
                    client.close()
                    raise translate(exc) from exc
                self._idle.append((client, time.monotonic()))
        return bool(self._8bitmime)

    async def _ehlo(self, client: aiosmtplib.SMTP) -> dict[str, str]:
        if client.is_ehlo_or_helo_needed:
            await client.ehlo()
        self._8bitmime = client.supports_extension("8bitmime")
        return client.esmtp_extensions

    async def _transaction(self, client: aiosmtplib.SMTP, sender: str, recipients: list[str],
                           data: bytes) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        options = mail_options(sender, recipients, data, await self._ehlo(client))
        return await client.sendmail(sender, recipients, data, mail_options=options)

    async def send(self, sender: str, recipients: list[str], data: bytes) -> str:
        """Send one message; returns the relay's answer to DATA. Raises Transient/PermanentError."""
        self.start()
        assert self._slots is not None
        async with self._slots:
            client, reused = self._take_idle(), True
            if client is None:
                client, reused = await self._connect(), False
            try:
                try:
                    errors, reply = await self._transaction(client, sender, recipients, data)
                except aiosmtplib.SMTPServerDisconnected:
                    if not reused:
                        raise
                    # The relay closed the idle connection; nothing of this message was taken.
                    client.close()
                    client = await self._connect()
                    errors, reply = await self._transaction(client, sender, recipients, data)
            except GatewayError:
                if client.is_connected:  # refused before MAIL (mail_options): reusable
                    self._idle.append((client, time.monotonic()))
                raise
            except Exception as exc:
                if isinstance(exc, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused) \
                        and client.is_connected and exc_code(exc) != 421:
                    self._idle.append((client, time.monotonic()))  # aiosmtplib sent RSET: reusable
                else:
                    client.close()
                raise translate(exc) from exc
            self._idle.append((client, time.monotonic()))
        if errors:
            refused = {k: f"{v.code} {v.message}" for k, v in errors.items()}
            text = "; ".join(f"<{k}> {v}" for k, v in refused.items())[:1000]
            if any(v.code < 500 for v in errors.values()):
                raise TransientError(f"relay refused some recipients for now: {text}", detail={"refused": refused})
            raise PermanentError(f"relay refused some recipients (the others have it): {text}",
                                 detail={"refused": refused})
        return reply

    def _take_idle(self) -> aiosmtplib.SMTP | None:
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if client.is_connected and now - since < self.cfg.keepalive:
                return client
            client.close()
        return None

    async def _connect(self) -> aiosmtplib.SMTP:
        mode = self.cfg.outbound_starttls
        client = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, use_tls=self.smtps,
            start_tls=True if mode == "required" else (None if mode == "optional" else False),
            tls_context=self._tls, timeout=self.cfg.timeout, local_hostname=self.cfg.hostname,
            username=self.cfg.username,
            password=current_secret(self.cfg.password),  # a {file: …} one is read again per connection
        )
        try:
            await client.connect()
        except Exception as exc:
            error = translate(exc)
            self.error = f"cannot connect to {self.host}:{self.port}: {error}"
            event(self.log, "smtp.relay_down", logging.WARNING, connector=self.name, error=self.error)
            raise error from exc
        self.error = ""
        return client

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, min(self.cfg.keepalive / 2, 10.0)))
            now = time.monotonic()
            keep = [(c, t) for c, t in self._idle if c.is_connected and now - t < self.cfg.keepalive]
            old = [c for c, t in self._idle if (c, t) not in keep]
            self._idle = keep
            for client in old:
                await self._quit(client)

    @staticmethod
    async def _quit(client: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            if client.is_connected:
                await asyncio.wait_for(client.quit(), timeout=2.0)
        client.close()


def exc_code(exc: BaseException) -> int | None:
    return exc.code if isinstance(exc, aiosmtplib.SMTPResponseException) else None
