"""The ``smtp`` connector's config and target options (see the card in :mod:`connectors.smtp`)."""

from __future__ import annotations

import fnmatch
import re
import socket
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from connectors.mail_common import MailOptions, parse_addresses
from connectors.mail_common.build import TEMPLATED_ADDRESS
from connectors.mailauth import AuthCheckSettings, SealOptions, SealSettings
from connectors.smtp.users import Users
from gateway.sdk import ByteSize, ConnectorConfig, Duration, Secret, Strict, SubstitutionCheck

DEFAULT_PORT = 2525
_LISTEN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$")


class TlsFiles(Strict):
    """A certificate chain and its key (PEM files) for the inbound listener, read again when they
    change on disk: a renewed certificate reaches the next connection without a restart."""

    cert: str
    key: str


class SmtpConfig(ConnectorConfig, AuthCheckSettings, SealSettings):
    """Inbound and/or outbound SMTP. ``auth_check`` (inbound SPF/DKIM/DMARC) and ``dkim``,
    ``smime``, ``pgp`` (outbound sealing) come from :mod:`connectors.mailauth`."""

    type: Literal["smtp"] = "smtp"
    #: The name in the greeting and EHLO answer (inbound) and in our EHLO (outbound).
    hostname: str = Field(default_factory=socket.gethostname)

    # --- inbound ------------------------------------------------------------------------
    #: ``host:port`` to listen on (port 2525 when omitted).
    listen: str | None = None
    #: Recipients this gateway accepts: domains (``example.com``, ``*.example.com``) and
    #: addresses (``ops@example.com``, ``alert-*@example.com``). Anything else: 550 5.7.1.
    recipients: list[str] = Field(default_factory=list)
    tls: TlsFiles | None = None
    #: The whole listener speaks TLS from the first byte (SMTPS, usually port 465).
    implicit_tls: bool = False
    #: ``off`` / ``optional`` / ``required``. Inbound default: ``optional`` when ``tls`` is set.
    #: Outbound default: ``required`` for ``smtp://`` URLs.
    starttls: Literal["off", "optional", "required"] | None = None
    #: The password file (``{file: /run/secrets/smtp-users}``): ``name:$pbkdf2-sha256$…`` lines.
    #: When set, MAIL needs AUTH, and AUTH is offered only over TLS.
    users: Secret | None = None
    max_message_size: ByteSize = 10 * 1024 * 1024
    max_recipients: int = Field(default=100, ge=1, le=10_000)
    #: Longest line (command or message line) in octets, CRLF included (RFC 5321: 1000).
    max_line_length: int = Field(default=1000, ge=100, le=1024 * 1024)
    #: Close a session that sent nothing for this long (421 4.4.2).
    idle_timeout: Duration = 60.0
    #: The whole DATA transfer must finish within this (slow senders are cut off: 421 4.4.2).
    data_timeout: Duration = 600.0
    max_sessions: int = Field(default=100, ge=1, le=100_000)
    #: Sessions open at once from one client address (past it: 421 4.7.0); 0: no such bound.
    #: 20 is what a Postfix sender opens to one destination by default.
    max_sessions_per_client: int = Field(default=20, ge=0, le=100_000)
    #: How often one session may send each command (MAIL, RCPT, NOOP…) before it gets 421.
    max_commands_per_session: int = Field(default=1000, ge=10)

    # --- outbound -----------------------------------------------------------------------
    #: The relay: ``smtp://host:587`` (STARTTLS per ``starttls``) or ``smtps://host:465``.
    url: str | None = None
    username: str | None = None
    password: Secret | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    timeout: Duration = 30.0
    #: Connections to the relay open at once; idle ones are reused for ``keepalive``.
    max_connections: int = Field(default=4, ge=1, le=100)
    keepalive: Duration = 30.0
    #: Default From of built messages (a target's ``sender`` overrides it).
    sender: str | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _LISTEN.match(v.strip())
        if m is None or (m.group(2) and not 0 <= int(m.group(2)) <= 65535):
            raise ValueError("listen is 'host:port', e.g. '127.0.0.1:2525' or '[::1]:2525'")
        return f"{m.group(1)}:{m.group(2) or DEFAULT_PORT}"

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, v: list[str]) -> list[str]:
        out = []
        for pattern in v:
            p = pattern.strip().lower()
            if not p or p.count("@") > 1 or p.startswith("@") or p.endswith("@") or any(c in p for c in " <>,;"):
                raise ValueError(f"recipient pattern {pattern!r} is not a domain or an address (glob allowed)")
            out.append(p)
        return out

    @field_validator("users")
    @classmethod
    def _users(cls, v: Any) -> Any:
        if v is not None:
            Users.parse(v.get_secret_value())  # errors name the line, never the content
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError("url must be smtp://host[:port] or smtps://host[:port]")
        if parts.username or parts.password:
            raise ValueError("credentials never go in the url: use username and password (a secret)")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("url must not have a path, query or fragment")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("url has an invalid port") from None
        return v

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str | None) -> str | None:
        if v is not None and len(parse_addresses("sender", v)) != 1:
            raise ValueError("sender must be exactly one address")
        return v

    def model_post_init(self, _: Any) -> None:
        if self.listen is None and self.url is None:
            raise ValueError("an smtp connector needs 'listen' (inbound), 'url' (outbound) or both")
        if self.listen is not None:
            self._check_inbound()
        if self.url is not None:
            self._check_outbound()
        if self.auth_check is not None and self.listen is None:
            raise ValueError("auth_check checks mail this connector receives: it needs 'listen'")
        if (self.dkim or self.smime or self.pgp) and self.url is None:
            raise ValueError("dkim, smime and pgp seal mail this connector sends: they need 'url'")

    def _check_inbound(self) -> None:
        if not self.recipients:
            raise ValueError("an inbound smtp connector needs 'recipients' (the domains or addresses it "
                             "accepts); it never relays to anyone else")
        if (self.implicit_tls or self.starttls in ("optional", "required")) and self.tls is None:
            raise ValueError("TLS needs 'tls: {cert: …, key: …}'")
        if self.implicit_tls and self.starttls not in (None, "off"):
            raise ValueError("implicit_tls and starttls exclude each other on one listener")
        if self.users is not None and self.tls is None:
            raise ValueError("'users' needs TLS: AUTH is only offered over TLS (set 'tls')")
        if self.users is not None and not self.implicit_tls and self.inbound_starttls == "off":
            raise ValueError("'users' needs TLS: set starttls to optional/required, or implicit_tls")

    def _check_outbound(self) -> None:
        assert self.url is not None
        smtps = urlsplit(self.url).scheme == "smtps"
        if smtps and self.starttls not in (None, "off"):
            raise ValueError("smtps:// is TLS from the start; starttls does not apply")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and not smtps and self.outbound_starttls != "required":
            raise ValueError("credentials are only sent over TLS: use smtps:// or starttls: required")

    @property
    def inbound_starttls(self) -> str:
        if self.implicit_tls:
            return "off"
        return self.starttls or ("optional" if self.tls else "off")

    @property
    def outbound_starttls(self) -> str:
        if self.url and urlsplit(self.url).scheme == "smtps":
            return "off"
        return self.starttls or "required"

    def accepts(self, address: str) -> bool:
        """Whether ``address`` is a recipient this gateway serves (no relaying)."""
        addr = address.strip().lower()
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or any(c in local for c in "%!@"):
            return False  # source routes and %-hacks are relay tricks
        for pattern in self.recipients:
            target = addr if "@" in pattern else domain
            if fnmatch.fnmatchcase(target, pattern):
                return True
        return False


class SmtpTarget(MailOptions):
    """A route's ``to:`` entry for an smtp connector: the message (see :class:`MailOptions`)
    and, optionally, the envelope sender (MAIL FROM; default: the From address) and this
    route's sealing (``seal: {sign, encrypt, missing_key}`` over the connector's smime/pgp)."""

    envelope_from: str | None = None
    seal: SealOptions | None = None

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        **MailOptions.substitution_checks, "envelope_from": TEMPLATED_ADDRESS}
