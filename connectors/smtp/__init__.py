"""smtp — mail in (an aiosmtpd server) and mail out (aiosmtplib to a relay).

Inbound
  Address: ``listen: "127.0.0.1:2525"`` (port 2525 when omitted). Accepts only the configured
  ``recipients`` (domains, addresses, globs): anything else is ``550 5.7.1`` — never an open
  relay. STARTTLS ``off``/``optional``/``required`` or implicit TLS (SMTPS); with ``users``
  (a password-file secret with PBKDF2 hashes) MAIL needs AUTH PLAIN/LOGIN, offered only over
  TLS (``538 5.7.11`` before it). Limits: ``SIZE`` announced in EHLO and enforced at MAIL and
  after DATA (``552 5.3.4``, memory bounded), ``max_recipients`` (``452 4.5.3``), line length
  (``500 5.5.2``), commands per session (``421``), ``idle_timeout`` and ``data_timeout``
  (``421 4.4.2``), ``max_sessions`` (``421 4.3.2``). A bare CR or LF in DATA is refused with
  ``550 5.5.2`` after reading to the real ``<CRLF>.<CRLF>`` (no smuggled second message).
  Delivery guarantee: ``250`` only when every recipient's envelope was delivered or spooled
  (or dead-lettered/dropped by policy); ``451 4.3.0`` when the gateway cannot take it now or
  anything fails inside (never exception text); ``550``/``552``/``554`` for rejections.
  Envelope: one per recipient; ``subject`` = the recipient address (lower-cased), ``body`` =
  the message bytes as received, ``content_type`` = ``message/rfc822``; ``headers`` = the
  decoded Subject, From, To, Cc, Reply-To, Date, Message-ID, In-Reply-To, References and every
  ``X-*`` header (lower-case names, one line each); ``attributes``: ``mail_from``, ``rcpt``,
  ``rcpt_tos``, ``helo``, ``peer``, ``tls`` (version or null), ``size``, ``auth`` (``{user}``
  when authenticated, else the ``auth_check`` results), ``traceparent``/``tracestate`` (the
  message's ``Traceparent``/``Tracestate`` header, when valid) and ``email`` (the parsed view: subject,
  from, to, cc, reply_to, date, message_id, headers, text, html, attachments [{filename,
  content_type, size, disposition}], defects, truncated).

Outbound
  Address: ``url: smtp://relay:587`` (STARTTLS ``required`` by default) or ``smtps://relay:465``;
  ``username``/``password`` (a secret) only over TLS. The message is built from the target's
  options (sender, to, cc, bcc, reply_to, subject, text, html, attachments, message_id,
  mail_headers; every string a template, every header value checked for CR/LF/NUL) or, for an
  inbound ``message/rfc822`` body, forwarded unchanged. Sets ``Message-ID`` (stable across
  retries), ``Date``, ``Auto-Submitted: auto-generated``, ``X-Gateway-Envelope-Id``,
  ``Traceparent``/``Tracestate`` (the attempt's trace context; on top of a forwarded message),
  before any sealing.
  Delivery guarantee: delivered once the relay answered ``250`` to DATA; ``4xx``, timeouts and
  connection/TLS failures are transient (retried); ``5xx`` is permanent (dead letter with the
  relay's reply). Connections are pooled (``max_connections``) and reused for ``keepalive``.
  8-bit mail goes with ``BODY=8BITMIME`` (and ``SMTPUTF8`` for non-ASCII addresses or
  headers) when the relay offers it; otherwise the body is made 7-bit (quoted-printable or
  base64) before DKIM signing. An encrypted message goes as several copies, one per Bcc
  recipient and one for the others (a retry may repeat a copy already sent).

Mail authenticity (:mod:`connectors.mailauth`; the README, "Mail authenticity and encryption")
  Inbound ``auth_check``: after DATA, SPF (client IP, MAIL FROM, HELO), DKIM and DMARC;
  ``policy: reject`` answers ``550 5.7.1`` for a DMARC failure under ``p=reject`` and ``451
  4.7.1`` when DNS failed; otherwise the message gets an ``Authentication-Results`` header and
  ``attributes.auth`` (``auth.spf``, ``auth.dkim``, ``auth.dmarc``…) for routes. Mail from
  AUTH-authenticated submitters is not checked. Outbound ``dkim`` / ``smime`` / ``pgp``: every
  message (built or forwarded) is sealed just before it goes to the relay; a sealing failure
  is permanent, a sealer that cannot be set up keeps the outbound side down (transient).
"""

from __future__ import annotations

from pydantic import ValidationError

from connectors.mail_common import PARSERS, HeaderInjection, MailError, build_mail, parse_addresses, validated_options
from connectors.mailauth import OutboundSealing
from connectors.smtp.config import SmtpConfig, SmtpTarget
from connectors.smtp.listener import Listener
from connectors.smtp.relay import Relay
from gateway.sdk import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Envelope,
    Health,
    PermanentError,
    Reply,
    Target,
    TransientError,
)

__all__ = ["SmtpConfig", "SmtpConnector", "SmtpTarget"]


class SmtpConnector(Connector):
    kind = "smtp"
    shares_inbound = True
    parsers = PARSERS
    Config = SmtpConfig
    Options = SmtpTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, SmtpConfig)
        self.cfg = config
        self._relay = Relay(config, self.name, self.log) if config.url else None
        self._sealing = OutboundSealing(config, log=self.log, connector=self.name)
        self._listener: Listener | None = None

    async def open(self) -> None:
        # The relay is connected lazily, per send: a relay that is down must not keep this
        # connector's inbound side from listening. Nor must a sealer that cannot work: then
        # health() reports it and send() keeps retrying it (TransientError).
        if self._relay is not None:
            self._relay.start()
            try:
                await self._sealing.open()
            except TransientError:
                if self.cfg.listen is None:
                    raise

    async def listen(self, deliver: Deliver) -> None:
        if self.cfg.listen is None:
            raise PermanentError(f"connector {self.name!r} is used as a source but has no 'listen' address")
        if self._listener is not None and self._listener.serving:
            return
        try:
            listener = Listener(self.cfg, self.name, self.log, deliver, self.ctx.accepting,
                                workers=self.ctx.workers)
            await listener.start()
        except OSError as exc:  # port taken, certificate unreadable: the supervisor retries
            raise TransientError(f"cannot listen on {self.cfg.listen}: {exc}") from exc
        self._listener = listener

    async def stop_listening(self, drain: float) -> None:
        if self._listener is not None:
            await self._listener.stop(drain)

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        if self._relay is None:
            raise PermanentError(f"connector {self.name!r} has no relay 'url' to send to")
        try:
            opts = SmtpTarget.model_validate(validated_options(target))
            built = build_mail(env, opts, route=target.route, default_sender=self.cfg.sender)
            sender = built.sender
            if opts.envelope_from:
                found = parse_addresses("envelope_from", opts.envelope_from)
                if len(found) != 1:
                    raise MailError("envelope_from must be exactly one address")
                sender = found[0][1]
        # ValueError too: email's own refusal of a header with a line break that is not CR/LF
        # (U+2028, NEL, from an untemplated subject), as permanent as the other three.
        except (HeaderInjection, MailError, ValidationError, ValueError) as exc:
            raise PermanentError(f"cannot build the message: {exc}") from exc
        seven_bit = not built.data.isascii() and not await self._relay.offers_8bitmime()
        copies = await self._sealing.seal_copies(built.data, recipients=built.recipients, hidden=built.hidden,
                                                 options=opts.seal, envelope_id=env.id, seven_bit=seven_bit)
        # Every copy is sealed before the first is sent; a retry after a failed copy sends the
        # earlier ones again (at-least-once).
        for copy in copies:
            await self._relay.send(sender, list(copy.recipients), copy.data)
        return None

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.stop(0)
            self._listener = None
        if self._relay is not None:
            await self._relay.close()
        await self._sealing.close()

    def health(self) -> Health:
        problems = []
        if self._listener is not None and not self._listener.serving and not self._listener.closing:
            problems.append("not listening")
        if self._relay is not None and self._relay.error:
            problems.append(self._relay.error)
        if self._sealing.error:
            problems.append(self._sealing.error)
        return Health(not problems, "; ".join(problems))
