"""Config models for mail authenticity (inbound ``auth_check``) and sealing (outbound ``dkim``,
``smime``, ``pgp``), meant to be mixed into a mail connector's config.

Keys and passphrases are :data:`~gateway.config.models.Secret` (``${ENV}`` or ``{file: …}``);
a key that does not parse is refused when routes.yaml is validated, with a message that names
the field and never the key.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from connectors.mailauth.keys import load_private_key, load_signing_key
from gateway.sdk import Duration, Secret, Strict

#: Headers signed when ``dkim.headers`` is not given (those present are signed; ``from`` is
#: signed once more than it occurs, so a second From cannot be added without breaking it).
DEFAULT_SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "auto-submitted",
)
#: RFC 6376 5.4: never sign these (they change in transit or must stay secret).
NEVER_SIGNED = frozenset({"return-path", "received", "comments", "keywords", "bcc", "resent-bcc",
                          "dkim-signature"})

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?$")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


def parse_nameserver(value: str) -> tuple[str, int]:
    """``127.0.0.1``, ``127.0.0.1:5353``, ``::1``, ``[::1]:5353`` → (address, port)."""
    text = value.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"resolver {value!r}: use '[::1]:53'")
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"resolver {value!r} is not an IP address (with an optional :port)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"resolver {value!r} has an invalid port")
    return address, int(port)


class AuthCheck(Strict):
    """Inbound verification (``auth_check:`` on an inbound mail connector).

    ``policy``: ``reject`` answers at SMTP time (550 5.7.1 when DMARC fails and the domain
    publishes p=reject; 451 when DNS failed, so the sender retries), ``tag`` only records the
    results (``auth.*`` and an Authentication-Results header), ``off`` checks nothing.
    """

    spf: bool = True
    dkim: bool = True
    dmarc: bool = True
    policy: Literal["reject", "tag", "off"] = "tag"
    #: DNS servers (``127.0.0.1``, ``[::1]:5353``); omitted: the system's /etc/resolv.conf.
    resolver: list[str] | None = None
    #: Per DNS query; a query that takes longer is a temperror, never a failure.
    timeout: Duration = 5.0
    #: The name in our Authentication-Results headers (RFC 8601 authserv-id).
    authserv_id: str = Field(default_factory=socket.gethostname)

    @field_validator("resolver", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("resolver")
    @classmethod
    def _resolver(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("resolver needs at least one address (or omit it for the system's)")
            for item in v:
                parse_nameserver(item)
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if not 0 < v <= 60:
            raise ValueError("timeout must be more than 0 and at most 60 seconds")
        return v

    @field_validator("authserv_id")
    @classmethod
    def _authserv_id(cls, v: str) -> str:
        if not _HOSTNAME.match(v):
            raise ValueError("authserv_id must be a host name (letters, digits, '-', '.')")
        return v

    @model_validator(mode="after")
    def _dmarc_needs_both(self) -> AuthCheck:
        if self.dmarc and not (self.spf and self.dkim):
            raise ValueError("dmarc is computed from spf and dkim: enable both, or set dmarc: false")
        return self

    def nameservers(self) -> list[tuple[str, int]] | None:
        return [parse_nameserver(x) for x in self.resolver] if self.resolver is not None else None


class DkimSigning(Strict):
    """DKIM signing of outgoing mail (``dkim:``). The algorithm follows the key: an RSA key
    signs rsa-sha256, an Ed25519 key ed25519-sha256 (RFC 8463; give a list of two ``dkim``
    entries to sign with both)."""

    domain: str
    selector: str
    #: PEM private key (RSA ≥ 1024 bits, PKCS#1 or PKCS#8; or Ed25519 PKCS#8), or an Ed25519
    #: key as the base64 32-byte seed (dknewkey's form).
    key: Secret
    headers: list[str] = Field(default_factory=lambda: list(DEFAULT_SIGNED_HEADERS))

    @field_validator("domain", "selector")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _HOSTNAME.match(v) or v.endswith("."):
            raise ValueError(f"{v!r} is not a DNS name")
        return v.lower()

    @field_validator("key")
    @classmethod
    def _key(cls, v: Any) -> Any:
        load_signing_key(v.get_secret_value())  # raises ValueError naming the problem, not the key
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        names = [h.strip().lower() for h in v]
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a header name")
            if name in NEVER_SIGNED:
                raise ValueError(f"{name!r} must not be signed (RFC 6376 5.4)")
        if "from" not in names:
            raise ValueError("'from' must be signed (RFC 6376 5.4)")
        return names


MissingKey = Literal["fail", "plain"]


class SmimeSettings(Strict):
    """S/MIME (RFC 8551) signing and/or encryption of outgoing mail (``smime:``)."""

    sign: bool = True
    encrypt: bool = False
    #: PEM file: our certificate first, then any intermediates to send along.
    cert: str | None = None
    #: PEM private key of ``cert``.
    key: Secret | None = None
    key_password: Secret | None = None
    #: PEM file or directory of PEM files with recipients' certificates, found by the
    #: addresses in their subjectAltName (rfc822Name) or subject emailAddress.
    recipients: str | None = None
    #: A recipient without a usable certificate: ``fail`` (dead letter with the reason) or
    #: ``plain`` (send unencrypted, signed if signing is on, with a warning in the log).
    missing_key: MissingKey = "fail"

    @model_validator(mode="after")
    def _complete(self) -> SmimeSettings:
        if not (self.sign or self.encrypt):
            raise ValueError("smime: enable sign, encrypt or both (or remove the smime section)")
        if self.sign and (self.cert is None or self.key is None):
            raise ValueError("smime.sign needs 'cert' (PEM file) and 'key' (a secret)")
        if self.encrypt and self.recipients is None:
            raise ValueError("smime.encrypt needs 'recipients' (a PEM file or directory of certificates)")
        if self.key is not None:
            password = self.key_password.get_secret_value() if self.key_password is not None else None
            load_private_key(self.key.get_secret_value(), password)
        return self


class PgpSettings(Strict):
    """PGP/MIME (RFC 3156) signing and/or encryption over the ``gpg`` binary (``pgp:``)."""

    #: A GnuPG home for the gateway alone (created with mode 0700 when missing; it must be
    #: writable: gpg keeps its lock files and agent socket there). Every key in it is trusted.
    home: str
    #: ASCII-armored keys (ours with its secret part, and recipients' public keys) imported
    #: into ``home`` when the connector opens, e.g. from a Kubernetes Secret.
    keys: Secret | None = None
    sign: bool = True
    #: Our secret key: fingerprint (preferred), key id or address.
    sign_key: str | None = None
    passphrase: Secret | None = None
    encrypt: bool = False
    missing_key: MissingKey = "fail"

    @model_validator(mode="after")
    def _complete(self) -> PgpSettings:
        if not (self.sign or self.encrypt):
            raise ValueError("pgp: enable sign, encrypt or both (or remove the pgp section)")
        if self.sign and not self.sign_key:
            raise ValueError("pgp.sign needs 'sign_key' (the fingerprint of our secret key)")
        if self.sign_key is not None and not re.fullmatch(r"[A-Za-z0-9@._+<>-]{8,254}", self.sign_key):
            raise ValueError("pgp.sign_key is a fingerprint, a key id or an address")
        return self


class SealOptions(Strict):
    """Per route overrides (a mail target's ``seal:``) of the connector's smime/pgp settings."""

    #: Require (true) or skip (false) the S/MIME or PGP signature; omitted: the connector's.
    sign: bool | None = None
    encrypt: bool | None = None
    missing_key: MissingKey | None = None


class SealSettings(Strict):
    """Outbound signing and encryption: DKIM and at most one of S/MIME and PGP.

    A mail connector's config may inherit this class (``class SmtpConfig(ConnectorConfig,
    SealSettings)``) to get the three keys with their checks.
    """

    dkim: DkimSigning | list[DkimSigning] | None = None
    smime: SmimeSettings | None = None
    pgp: PgpSettings | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if self.smime is not None and self.pgp is not None:
            raise ValueError("use smime or pgp on one connector, not both")
        return self


class AuthCheckSettings(Strict):
    """Inbound checks; a mail connector's config may inherit this class to get ``auth_check``."""

    auth_check: AuthCheck | None = None
