"""One inbound SMTP session: aiosmtpd's protocol, with the answers the gateway needs.

What we change in aiosmtpd (1.4.6), and why:

* ``smtp_DATA`` is ours. aiosmtpd keeps a bare LF or CR inside DATA (a smuggling vector once
  the message is relayed), lets a line without CRLF grow without bound, and cuts a long upload
  with its idle timer. Ours ends DATA only on ``<CRLF>.<CRLF>``, answers ``550 5.5.2`` for a
  bare CR or LF (after reading to the real end, so nothing that follows runs as a command),
  ``552 5.3.4`` over the size limit and ``500 5.5.2`` for an over-long line, keeping at most
  ``max_message_size`` bytes in memory; the whole transfer is bounded by ``data_timeout``.
* ``handle_exception`` answers ``451 4.3.0`` (aiosmtpd's default is a permanent ``500`` that
  carries the exception text).
* The idle timer writes ``421 4.4.2`` before closing; a session past ``max_sessions`` gets
  ``421 4.3.2``; shutdown sends ``421 4.3.2`` to idle sessions and lets busy ones finish.
* AUTH PLAIN/LOGIN check the password file off the event loop; three failures (a wrong
  password or an unknown mechanism, ``504 5.5.4``) end the session. Only :data:`MECHANISMS` are
  offered: aiosmtpd would offer every attribute named ``auth_*`` (``auth_user`` among them).
  Mechanism names are matched case-insensitively.
* Replies aiosmtpd hardcodes without an enhanced status code get one (``500 5.5.2 Line too long``).
* Bounds aiosmtpd lacks: ``max_sessions_per_client`` sessions from one address (more get
  ``421 4.7.0``); :data:`MAX_ERRORS` syntax or sequence errors end a session (``421 4.7.0``);
  buffered commands are answered :data:`REPLIES_PER_TURN` at a time before the event loop
  serves others; a session logs its first :data:`MAX_LOGGED_REFUSALS` refusals only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from base64 import b64decode
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, AuthResult, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from connectors.smtp.data import R_BARE_NEWLINE, DataReader, read_data
from gateway.sdk import event

if TYPE_CHECKING:
    from connectors.smtp.listener import Listener

MAX_AUTH_FAILURES = 3
#: The SASL mechanisms this session implements (``auth_LOGIN``, ``auth_PLAIN``).
MECHANISMS = ("LOGIN", "PLAIN")
#: The socket reader's buffer limit; DATA lines are checked against max_line_length ourselves.
READER_LIMIT = 64 * 1024

R_INTERNAL = "451 4.3.0 Internal error, try again later"
R_SHUTDOWN = "421 4.3.2 Service shutting down, try again later"
R_BUSY = "421 4.3.2 Too many connections, try again later"
R_IDLE = "421 4.4.2 Idle timeout, closing connection"
R_DATA_TIMEOUT = "421 4.4.2 DATA not completed in time, closing connection"
R_CLIENT_BUSY = "421 4.7.0 Too many connections from your address, try again later"
R_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"

#: Syntax and sequence errors (500-504) one session may make before it is closed; empty lines
#: or junk would otherwise be answered one by one as fast as the client sends them (Postfix:
#: ``smtpd_hard_error_limit``).
MAX_ERRORS = 20
#: Refusals a session logs; the rest are only answered (a client must not flood the log).
MAX_LOGGED_REFUSALS = 10
#: aiosmtpd answers buffered commands without waiting on the socket: after this many replies a
#: session lets the event loop serve others.
REPLIES_PER_TURN = 32
#: After a 421, how long the session goes on reading (and dropping) what the client still sends
#: before it closes, so the client reads the 421 instead of a connection reset.
CLOSE_DRAIN = 2.0

# aiosmtpd answers without enhanced status codes (RFC 3463) in places we cannot hook.
_REWRITE = {
    "500 Command line too long": "500 5.5.2 Line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
    "503 Error: send EHLO first": "503 5.5.1 Error: send EHLO first",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
    "500 Error: strict ASCII mode": "500 5.5.2 Error: strict ASCII mode",
}
_SIZE_PARAM = re.compile(r"(?:^|\s)SIZE=(\d+)", re.IGNORECASE)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``<local@domain> params``: what nearly every client sends in MAIL and RCPT.
_PLAIN_PATH = re.compile(rf"^\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*(.*)$", re.DOTALL)


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer or "")


def _utf8(text: str) -> bool:
    """False for text holding undecodable bytes (aiosmtpd keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Hooks:
    """The aiosmtpd handler: EHLO, MAIL and RCPT policy (aiosmtpd finds ``handle_*`` by name)."""

    def __init__(self, listener: Listener):
        self.listener = listener

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: SmtpEnvelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.listener.users is None:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          mail_options: list[str]) -> str:
        if self.listener.closing:
            return R_SHUTDOWN
        if not _utf8(address):
            return "553 5.1.7 The sender address is not valid UTF-8"
        if not self.listener.accepting():
            # Postfix's answer when it cannot store: the client keeps the message and retries.
            event(self.listener.log, "smtp.storage_full", logging.WARNING, connector=self.listener.name,
                  peer=_peer(session.peer))
            return "452 4.3.1 Insufficient system storage"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: SmtpEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        cfg = self.listener.cfg
        if not _utf8(address):
            return "553 5.1.3 The recipient address is not valid UTF-8"
        if len(envelope.rcpt_tos) >= cfg.max_recipients:
            return "452 4.5.3 Too many recipients"
        if not cfg.accepts(address):
            event(self.listener.log, "smtp.relay_denied", logging.INFO, connector=self.listener.name,
                  peer=_peer(session.peer), rcpt=address[:200])
            return "550 5.7.1 Relay access denied"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"


class GatewaySMTP(SMTP):
    """One SMTP session."""

    def __init__(self, listener: Listener):
        cfg = listener.cfg
        self.listener = listener
        self.busy = False
        self.auth_user: str | None = None
        self._auth_failures = 0
        self._registered = False
        #: Past max_sessions_per_client: answered 421 at connection, never a session.
        self._turned_away = False
        self._closing_at: float | None = None
        self._errors = 0
        self._replies = 0
        self._logged_refusals = 0
        self.peer = ""
        #: The client's IP address, as SPF checks it.
        self.peer_ip = ""
        # aiosmtpd reads both from the instance; its class-level dict is shared by every session.
        self.line_length_limit = max(READER_LIMIT, cfg.max_line_length + 2)
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            listener.hooks,
            data_size_limit=cfg.max_message_size,
            enable_SMTPUTF8=True,
            hostname=cfg.hostname,
            ident="ESMTP",
            tls_context=listener.starttls_context,
            require_starttls=cfg.inbound_starttls == "required",
            timeout=cfg.idle_timeout,
            auth_required=listener.users is not None,
            auth_require_tls=True,
            command_call_limit=cfg.max_commands_per_session,
            loop=asyncio.get_running_loop(),
        )
        offered = MECHANISMS if listener.users is not None else ()
        self._auth_methods = {name: impl for name, impl in self._auth_methods.items() if name in offered}

    # --- connection bookkeeping ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._registered:
            self._registered = True
            peername = transport.get_extra_info("peername")
            self.peer = _peer(peername)
            self.peer_ip = str(peername[0]) if isinstance(peername, tuple) and peername else ""
            if self.listener.crowded(self.peer_ip):
                self._turned_away = True
                event(self.listener.log, "smtp.too_many_sessions", logging.WARNING, connector=self.listener.name,
                      peer=self.peer, per_client=self.listener.cfg.max_sessions_per_client)
                transport.write(R_CLIENT_BUSY.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
                transport.close()
                return
            self.listener.sessions.add(self)
            if transport.get_extra_info("ssl_object") is not None:
                # Implicit TLS: aiosmtpd only knows STARTTLS and looks for its TLS protocol to
                # decide that AUTH is safe; the transport is TLS from the first byte.
                self._tls_protocol = transport  # type: ignore[assignment]
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._turned_away:
            return  # no session was started, so there is none to end
        self.listener.sessions.discard(self)
        super().connection_lost(error)

    def _timeout_cb(self) -> None:
        event(self.listener.log, "smtp.timeout", logging.INFO, connector=self.listener.name, peer=self.peer)
        self._write_and_close(R_IDLE)

    def goodbye(self) -> None:
        """Shutdown: tell the client to come back later and close."""
        self._write_and_close(R_SHUTDOWN)

    def _write_and_close(self, reply: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            try:
                transport.write(reply.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
            finally:
                transport.close()

    def tls_version(self) -> str | None:
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object.version() if ssl_object is not None else None

    # --- replies -------------------------------------------------------------------------

    async def push(self, status: Any) -> None:
        if self._closing_at is not None:
            return  # the 421 was the last word; what the client still sends is read and dropped
        if isinstance(status, str):
            status = _REWRITE.get(status, status)
            if status[:1] in ("4", "5"):
                self._logged_refusals += 1
                if self._logged_refusals <= MAX_LOGGED_REFUSALS:
                    event(self.listener.log, "smtp.refused", logging.INFO, connector=self.listener.name,
                          peer=self.peer, reply=status[:200])
        await super().push(status)
        if isinstance(status, str):
            if status.startswith("421"):
                self._close()  # 421 means the server closes (RFC 5321 3.8)
                return
            if status[:3] in ("500", "501", "502", "503", "504"):
                self._errors += 1
                if self._errors >= MAX_ERRORS:
                    await self.push(R_TOO_MANY_ERRORS)
                    return
        self._replies += 1
        if self._replies % REPLIES_PER_TURN == 0:
            await asyncio.sleep(0)

    async def handle_exception(self, error: Exception) -> str:
        self.listener.log.error("smtp.internal_error", exc_info=error, extra={"fields": {
            "connector": self.listener.name, "peer": self.peer, "error": type(error).__name__}})
        return R_INTERNAL

    # --- commands ------------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd runs email's full header parser (and defines a class) for every address;
        # a plain <local@domain> gives the same answer from one regular expression.
        m = _PLAIN_PATH.match(arg) if not self.local_part_limit else None
        if m is not None:
            return m.group(1), m.group(2)
        return super()._getaddr(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        session = self.session
        assert session is not None
        ready = session.host_name and not (self._auth_required and not session.authenticated)
        if arg and ready and self.data_size_limit:
            m = _SIZE_PARAM.search(arg)
            if m and int(m.group(1)) > self.data_size_limit:
                await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.busy = True
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                with self.listener.deadlines.after(self.listener.cfg.data_timeout):
                    raw, problem = await self._read_data()
            except TimeoutError:
                event(self.listener.log, "smtp.data_timeout", logging.INFO, connector=self.listener.name,
                      peer=self.peer)
                self._write_and_close(R_DATA_TIMEOUT)
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                self._close()  # the client went away mid-DATA: nothing stored, nothing acknowledged
                return
            except Exception as exc:  # framing is lost: answer and close, never read on as commands
                await self.push(await self.handle_exception(exc))
                self._close()
                return
            envelope = self.envelope
            self.envelope = self._create_envelope()  # aiosmtpd's post-DATA state
            if problem is not None:
                event(self.listener.log, "smtp.data_refused", logging.WARNING if problem == R_BARE_NEWLINE
                      else logging.INFO, connector=self.listener.name, peer=self.peer, reply=problem[:3])
                await self.push(problem)
                return
            # The answer may take as long as the route needs (direct mode); the idle timer
            # must not cut the session while the gateway decides.
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            # Shielded: a client that hangs up now does not cut the gateway's work in half;
            # it simply never hears the answer (and retries: at-least-once).
            reply = await asyncio.shield(self.listener.track(self.listener.accept(self, envelope, raw)))
            self._reset_timeout()
            await self.push(reply)
        finally:
            self.busy = False
            if self.listener.closing:
                self.goodbye()

    def _close(self) -> None:
        """End the session after a 421. Closing a socket with the client's input still unread
        makes the kernel answer with a reset, and a client that sent a burst (60,000 empty lines)
        then loses the 421 in its receive buffer: so stop writing (half-close where the transport
        can), go on reading and discarding for a moment, then close."""
        transport = self.transport
        if transport is None or self._closing_at is not None:
            return
        self._closing_at = self.loop.time()
        if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(CLOSE_DRAIN, transport.close)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read DATA up to the one true terminator. Returns (message, problem reply or None)."""
        data = DataReader(self.listener.cfg.max_message_size, self.listener.cfg.max_line_length + 1)
        loop = self.loop
        last_reset = loop.time()

        def flowing() -> None:
            nonlocal last_reset
            now = loop.time()
            if now - last_reset > 1.0:  # data is flowing: not idle
                last_reset = now
                self._reset_timeout()

        await read_data(self._reader, data, flowing)
        return data.message, data.problem

    # --- AUTH (only over TLS; aiosmtpd enforces that before calling these) ---------------

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        mechanism, _, rest = (arg or "").strip().partition(" ")
        mechanism = mechanism.upper()
        session = self.session
        # The checks aiosmtpd makes before it looks the mechanism up (EHLO, TLS, not yet in).
        ready = (session is not None and session.extended_smtp and not session.authenticated
                 and not (self._auth_require_tls and not self._tls_protocol))
        if ready and mechanism and mechanism not in self._auth_methods and len(rest.split()) <= 1:
            if not await self._failed("unknown mechanism", mechanism=mechanism[:20]):
                await self.push("504 5.5.4 Unrecognized authentication type")
            return
        await super().smtp_AUTH(f"{mechanism} {rest}".strip())

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        fields = blob.split(b"\x00")
        if len(fields) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return await self._check(fields[1], fields[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth(self.AuthLoginUsernameChallenge)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(login, password)

    async def _check(self, login: bytes, password: bytes) -> AuthResult:
        users = self.listener.users
        ok = users is not None and await asyncio.to_thread(users.verify, login, password)
        name = login.decode("utf-8", "replace")
        if ok:
            self.auth_user = name
            event(self.listener.log, "smtp.authenticated", logging.INFO, connector=self.listener.name,
                  peer=self.peer, user=name[:64])
            return AuthResult(success=True, auth_data=name)
        if await self._failed("wrong credentials", user=name[:64]):
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False)

    async def _failed(self, reason: str, **fields: str) -> bool:
        """Count and log a failed AUTH; True when it was one too many (421 sent, closing)."""
        self._auth_failures += 1
        printable = {k: v.encode("ascii", "replace").decode() for k, v in fields.items()}
        event(self.listener.log, "smtp.auth_failed", logging.WARNING, connector=self.listener.name,
              peer=self.peer, reason=reason, failures=self._auth_failures,
              **printable)
        if self._auth_failures >= MAX_AUTH_FAILURES:
            await self.push("421 4.7.0 Too many authentication failures, closing connection")
            self._close()
            return True
        return False
