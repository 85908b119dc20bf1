"""The inbound SMTP listener: the socket, its sessions, and each message's hand-off to the gateway.

Each accepted message is first checked (``auth_check``: SPF, DKIM, DMARC; the policy may refuse
it right there), then becomes one envelope per recipient; the DATA answer is
:func:`reply_for` of their outcomes. Past ``max_sessions`` a connection gets ``421 4.3.2``,
past ``max_sessions_per_client`` from its address ``421 4.7.0`` (so one client cannot take every
session); ``stop`` says ``421`` to idle sessions and waits (up to the drain time) for messages in flight.
The certificate (``tls``) is read again when its files change: the next STARTTLS or implicit-TLS
connection gets a renewed one without a restart (:class:`~gateway.sdk.RenewingTls`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from connectors.mail_common import MESSAGE_RFC822, clean, envelope_headers, parse_message, trace_attributes
from connectors.mailauth import Verifier, add_authentication_results, smtp_reply
from connectors.smtp.config import SmtpConfig
from connectors.smtp.session import R_BUSY, R_INTERNAL, GatewaySMTP, Hooks
from connectors.smtp.users import Users
from gateway.sdk import Deadlines, Deliver, Envelope, Outcome, RenewingTls, Status, event

#: Bodies larger than this are parsed on a worker thread, not on the event loop.
PARSE_INLINE_LIMIT = 256 * 1024


def reply_for(outcomes: Sequence[Outcome]) -> str:
    """The answer to DATA for the outcomes of its recipients' envelopes.

    250 only when every envelope was acknowledged (delivered, spooled, dead-lettered or a
    configured drop); any RETRY makes it 451 so the sender retries the whole message (copies
    already taken may then arrive twice: at-least-once); otherwise the first rejection decides.
    The texts are ours: reasons stay in the log, never on the wire.
    """
    ids = " ".join(o.envelope_id for o in outcomes if o.envelope_id)
    if all(o.acknowledge for o in outcomes):
        return f"250 2.0.0 OK: queued as {ids}"
    if any(o.status is Status.RETRY for o in outcomes):
        return f"451 4.3.0 Temporary failure, try again later ({ids})"
    code = next(o.code for o in outcomes if o.status is Status.REJECTED)
    if code == 404:
        return f"550 5.1.1 No route accepts this recipient ({ids})"
    if code == 413:
        return f"552 5.3.4 Message too big for its route ({ids})"
    if code in (400, 415, 422):
        return f"554 5.6.0 Message content refused ({ids})"
    return f"554 5.7.0 Message refused ({ids})"


class _Refuse(asyncio.Protocol):
    """Past max_sessions: one 421 and goodbye, without starting a session."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(R_BUSY.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]
        transport.close()


class Listener:
    """The listening socket, its sessions, and the hand-off of each message to the gateway."""

    def __init__(self, cfg: SmtpConfig, name: str, log: logging.Logger, deliver: Deliver,
                 accepting: Callable[[], bool] = lambda: True, workers: int = 1):
        self.cfg = cfg
        #: Worker processes of the gateway (``gateway.workers``): more than one share the port.
        self.workers = workers
        #: The gateway can take responsibility now (spool has room); checked at MAIL.
        self.accepting = accepting
        self.name = name
        self.log = log
        self.deliver = deliver
        self.users = Users.parse(cfg.users.get_secret_value()) if cfg.users is not None else None
        tls = RenewingTls(cfg.tls.cert, cfg.tls.key, log=log, name=name) if cfg.tls is not None else None
        self.tls_context = tls.context if tls is not None else None
        self.starttls_context = self.tls_context if cfg.inbound_starttls != "off" else None
        check = cfg.auth_check
        self.verifier = Verifier(check, log=log) if check is not None and check.policy != "off" else None
        self.hooks = Hooks(self)
        self.sessions: set[GatewaySMTP] = set()
        self._accepting: set[asyncio.Task[str]] = set()
        #: The sessions' DATA deadlines, checked by one timer (``asyncio.timeout`` would start and
        #: cancel a loop timer for every message).
        self.deadlines = Deadlines()
        self.closing = False
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        assert self.cfg.listen is not None
        host, _, port = self.cfg.listen.rpartition(":")
        loop = asyncio.get_running_loop()
        implicit = self.tls_context if self.cfg.implicit_tls else None
        self.server = await loop.create_server(
            self._protocol, host.strip("[]"), int(port), ssl=implicit,
            ssl_handshake_timeout=self.cfg.idle_timeout if implicit else None, reuse_address=True,
            reuse_port=self.workers > 1)  # worker processes share the port (gateway.workers)
        event(self.log, "smtp.listening", connector=self.name, listen=self.cfg.listen,
              tls="implicit" if implicit else f"starttls-{self.cfg.inbound_starttls}",
              auth="required" if self.users is not None else "off")

    def _protocol(self) -> asyncio.Protocol:
        if self.closing or len(self.sessions) >= self.cfg.max_sessions:
            event(self.log, "smtp.too_many_sessions", logging.WARNING, connector=self.name,
                  sessions=len(self.sessions))
            return _Refuse()
        return GatewaySMTP(self)

    def crowded(self, peer_ip: str) -> bool:
        """``peer_ip`` has ``max_sessions_per_client`` sessions open already."""
        per_client = self.cfg.max_sessions_per_client
        return bool(per_client) and sum(1 for s in self.sessions if s.peer_ip == peer_ip) >= per_client

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    async def stop(self, drain: float) -> None:
        """Stop accepting; 421 to idle sessions; give busy ones up to ``drain`` seconds."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for session in list(self.sessions):
            if not session.busy:
                session.goodbye()
        deadline = time.monotonic() + drain
        while (self._accepting or any(s.busy for s in self.sessions)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for session in list(self.sessions):
            session.goodbye()
        self.server = None

    def track(self, work: Coroutine[Any, Any, str]) -> asyncio.Task[str]:
        """Run one hand-off as its own task, kept until done (stop() waits for it).

        The task never fails: an exception is logged and becomes ``451 4.3.0``, so nothing is
        lost in an unretrieved task when the client has already gone.
        """
        async def guarded() -> str:
            try:
                return await work
            except Exception as exc:
                self.log.error("smtp.internal_error", exc_info=exc, extra={"fields": {
                    "connector": self.name, "error": type(exc).__name__}})
                return R_INTERNAL

        task = asyncio.ensure_future(guarded())
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)
        return task

    async def accept(self, smtp: GatewaySMTP, envelope: SmtpEnvelope, raw: bytes) -> str:
        """Check one message, hand it to the gateway (one envelope per recipient); return the reply."""
        session = smtp.session
        assert session is not None
        auth: dict[str, Any] = {}
        # Our own AUTH-authenticated submitters are not checked: what they send is ours.
        if self.verifier is not None and smtp.auth_user is None:
            results = await self.verifier.verify(raw, smtp.peer_ip, session.host_name or "",
                                                 envelope.mail_from or "", connector=self.name)
            refusal = smtp_reply(results, self.verifier.cfg)
            if refusal is not None:
                event(self.log, "smtp.auth_refused", logging.INFO, connector=self.name, peer=smtp.peer,
                      reply=refusal[:9], spf=results.spf, dkim=results.dkim, dmarc=results.dmarc,
                      from_domain=results.from_domain, rcpts=len(envelope.rcpt_tos))
                return refusal
            raw = add_authentication_results(raw, results)
            auth = results.as_dict()
        if smtp.auth_user is not None:
            auth["user"] = smtp.auth_user
        if len(raw) > PARSE_INLINE_LIMIT or raw.count(b"oundary=") + raw.count(b"OUNDARY=") > 32:
            # big or deeply nested (hostile?) messages: keep the event loop free for others
            view = await asyncio.to_thread(parse_message, raw)
        else:
            view = parse_message(raw)
        common: dict[str, Any] = {
            "mail_from": envelope.mail_from or "",
            "rcpt_tos": list(envelope.rcpt_tos),
            "helo": clean(session.host_name or "", 255),
            "peer": smtp.peer,
            "tls": smtp.tls_version(),
            "size": len(raw),
            "email": view,
            **trace_attributes(view),
        }
        if auth:
            common["auth"] = auth
        headers = envelope_headers(view)
        recipients = {r.lower(): r for r in envelope.rcpt_tos}
        envs = [Envelope(source=self.name, protocol="smtp", subject=subject, body=raw,
                         content_type=MESSAGE_RFC822, headers=headers, attributes={**common, "rcpt": rcpt})
                for subject, rcpt in recipients.items()]
        if len(envs) == 1:
            outcomes = [await self.deliver(envs[0])]
        else:
            outcomes = list(await asyncio.gather(*(self.deliver(e) for e in envs)))
        reply = reply_for(outcomes)
        for env, outcome in zip(envs, outcomes, strict=True):
            event(self.log, "smtp.received", logging.DEBUG if outcome.acknowledge else logging.INFO,
                  envelope_id=env.id, connector=self.name, peer=smtp.peer, rcpt=env.subject[:200],
                  bytes=len(raw), status=outcome.status.value, reason=outcome.reason, reply=reply[:3])
        return reply
