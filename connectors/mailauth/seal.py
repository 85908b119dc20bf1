"""Sealing outgoing mail: S/MIME or PGP (sign, encrypt, both), then DKIM, into wire bytes.

Order matters: the MIME entity is signed, then encrypted; DKIM signs the final message last,
so it covers exactly what leaves (a body meant for a relay without 8BITMIME is made 7-bit
before that, so no relay needs to touch it after signing).

Encryption names its recipients in the message (S/MIME recipient infos, OpenPGP key ids).
:meth:`Sealer.seal_copies` therefore makes one encrypted copy for the visible recipients (To,
Cc) and one more for each Bcc recipient, readable by that recipient alone: no copy names a
Bcc recipient to anyone else, nor one Bcc recipient to another.

Every failure is a :class:`PermanentError` with the reason (the core dead-letters the message),
except sealing that does not finish within :data:`SEAL_TIMEOUT` (a hung gpg):
:class:`TransientError`, retried. A message that must be signed never leaves unsigned, and one
that must be encrypted leaves in clear only when ``missing_key: plain`` allows it for the
recipients that have no key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any, Protocol

from pydantic import ValidationError

from connectors.mailauth.config import DkimSigning, PgpSettings, SealOptions, SmimeSettings
from connectors.mailauth.dkimsign import DkimSigner
from connectors.mailauth.mime import assemble, entity_7bit, message_7bit, split_entity, to_crlf
from connectors.mailauth.pgp import PgpError, PgpSealer
from connectors.mailauth.smime import SmimeSealer
from gateway.sdk import PermanentError, TransientError, event

#: Longest a message may take to seal (a hung gpg must not hold a delivery worker forever).
SEAL_TIMEOUT = 60.0


class Sealing(Protocol):
    """What :class:`Sealer` reads from a connector's config (e.g. one inheriting SealSettings)."""

    @property
    def dkim(self) -> DkimSigning | list[DkimSigning] | None: ...
    @property
    def smime(self) -> SmimeSettings | None: ...
    @property
    def pgp(self) -> PgpSettings | None: ...


@dataclass(frozen=True)
class Copy:
    """One message to send and the envelope recipients it is for."""

    recipients: tuple[str, ...]
    data: bytes


@dataclass(frozen=True)
class Plan:
    sign: bool
    encrypt: bool
    missing_key: str


class Sealer:
    """Signs and encrypts for one connector. Build it when the connector opens (it reads the
    certificates and keys, raising ValueError with the problem), call :meth:`open` (imports the
    PGP keys), :meth:`seal` per message, :meth:`close` at the end."""

    def __init__(self, cfg: Sealing, *, log: logging.Logger | None = None, connector: str = ""):
        dkim_cfg = cfg.dkim
        configs = [] if dkim_cfg is None else dkim_cfg if isinstance(dkim_cfg, list) else [dkim_cfg]
        self.dkim = [DkimSigner(c) for c in configs]
        self.smime = SmimeSealer(cfg.smime) if cfg.smime is not None else None
        self.pgp = PgpSealer(cfg.pgp) if cfg.pgp is not None else None
        self.log = log or logging.getLogger("gateway.mailauth")
        self.connector = connector
        self._settings: SmimeSettings | PgpSettings | None = cfg.smime or cfg.pgp
        self._opened = self.pgp is None
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return bool(self.dkim) or self._settings is not None

    async def open(self) -> None:
        """Import the PGP keys and check the signing key. Raises ValueError (idempotent)."""
        async with self._lock:
            if not self._opened and self.pgp is not None:
                await asyncio.to_thread(self.pgp.open)
                self._opened = True

    async def close(self) -> None:
        if self.pgp is not None:
            await asyncio.to_thread(self.pgp.close)
            self._opened = False

    def plan(self, options: SealOptions | Mapping[str, Any] | None) -> Plan:
        settings = self._settings
        # A route's rendered options may hold a plain dict here (the router does not re-validate).
        try:
            opts = options if isinstance(options, SealOptions) else SealOptions.model_validate(options or {})
        except ValidationError as exc:
            raise PermanentError(f"seal options: {exc.errors()[0]['msg']}; not sent") from None
        sign = opts.sign if opts.sign is not None else bool(settings is not None and settings.sign)
        encrypt = opts.encrypt if opts.encrypt is not None else bool(settings is not None and settings.encrypt)
        if settings is None and (sign or encrypt):
            raise PermanentError("the route asks to " + ("sign" if sign else "encrypt") + " but the connector "
                                 "has no smime or pgp settings; not sent")
        if sign and isinstance(settings, SmimeSettings) and (settings.cert is None or settings.key is None):
            raise PermanentError("the route asks for an S/MIME signature but smime has no cert and key; not sent")
        if sign and isinstance(settings, PgpSettings) and not settings.sign_key:
            raise PermanentError("the route asks for a PGP signature but pgp has no sign_key; not sent")
        if encrypt and isinstance(settings, SmimeSettings) and settings.recipients is None:
            raise PermanentError("the route asks for S/MIME encryption but smime has no recipients; not sent")
        missing = opts.missing_key or (settings.missing_key if settings is not None else "fail")
        return Plan(sign, encrypt, missing)

    async def seal_copies(self, message: Message | bytes, *, recipients: Sequence[str],
                          hidden: Sequence[str] = (), options: SealOptions | Mapping[str, Any] | None = None,
                          envelope_id: str = "", seven_bit: bool = False) -> list[Copy]:
        """The copies to send: one for all ``recipients`` unless the message is encrypted and
        some are ``hidden`` (Bcc): then one for the others and one for each hidden recipient.
        Raises :class:`PermanentError` (nothing may be sent when any copy fails)."""
        hidden_set = {a.lower() for a in hidden}
        concealed = [a for a in recipients if a.lower() in hidden_set]
        if not concealed or not self.plan(options).encrypt:
            return [Copy(tuple(recipients), await self.seal(message, recipients=recipients, options=options,
                                                            envelope_id=envelope_id, seven_bit=seven_bit))]
        visible = [a for a in recipients if a.lower() not in hidden_set]
        groups = ([visible] if visible else []) + [[a] for a in concealed]
        return [Copy(tuple(group), await self.seal(message, recipients=group, options=options,
                                                   envelope_id=envelope_id, seven_bit=seven_bit))
                for group in groups]

    async def seal(self, message: Message | bytes, *, recipients: Sequence[str] | None = None,
                   options: SealOptions | Mapping[str, Any] | None = None, envelope_id: str = "",
                   seven_bit: bool = False) -> bytes:
        """The wire bytes (CRLF) of ``message``, signed and encrypted as configured.

        ``recipients`` are the envelope recipients (encryption needs a key for each, and every
        one of them can see who else it was encrypted for: see :meth:`seal_copies`); omitted,
        the addresses in To, Cc and Bcc. ``seven_bit``: the body is made 7-bit before DKIM
        signs it. Raises :class:`PermanentError`.
        """
        plan = self.plan(options)
        if self.pgp is not None and (plan.sign or plan.encrypt):
            try:
                await self.open()
            except ValueError as exc:
                raise PermanentError(f"PGP is not usable: {exc}; not sent") from exc
        raw = to_crlf(message if isinstance(message, bytes) else _as_bytes(message))
        rcpts = list(recipients) if recipients is not None else header_recipients(raw)
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._seal, raw, rcpts, plan, envelope_id, seven_bit),
                                          SEAL_TIMEOUT)
        except TimeoutError:
            # gpg (or its agent) hangs: nothing was sent; a later attempt may find it working.
            raise TransientError(f"sealing took longer than {SEAL_TIMEOUT:.0f} s; not sent") from None

    def _seal(self, raw: bytes, recipients: list[str], plan: Plan, envelope_id: str, seven_bit: bool) -> bytes:
        kind = "S/MIME" if self.smime is not None else "PGP"
        encrypt = plan.encrypt
        certs: list[Any] = []
        fingerprints: list[str] = []
        if encrypt:
            if not recipients:
                raise PermanentError(f"{kind} encryption needs recipients; not sent")
            if self.smime is not None:
                certs, missing = self.smime.find(recipients)
            else:
                assert self.pgp is not None
                fingerprints, missing = self.pgp.find(recipients)
            if missing:
                what = "certificate" if self.smime is not None else "public key"
                if plan.missing_key != "plain":
                    raise PermanentError(f"{kind}: no usable {what} for {', '.join(missing)[:500]}; not sent "
                                         "(missing_key: fail)", detail={"missing_keys": missing})
                encrypt = False
                event(self.log, "mailauth.sent_unencrypted", logging.WARNING, envelope_id=envelope_id,
                      connector=self.connector, missing=len(missing), recipients=", ".join(missing)[:300])
        if plan.sign or encrypt:
            outer, content, body = split_entity(raw)
            entity = entity_7bit(content, body)
            try:
                if self.smime is not None:
                    if plan.sign:
                        entity = self.smime.sign(entity)
                    if encrypt:
                        entity = self.smime.encrypt(entity, certs)
                elif self.pgp is not None:
                    if encrypt:
                        entity = self.pgp.encrypt(entity, fingerprints, plan.sign)
                    else:
                        entity = self.pgp.sign(entity)
            except (PgpError, ValueError, TypeError) as exc:
                action = "signing and encryption" if plan.sign and encrypt else "signing" if plan.sign \
                    else "encryption"
                raise PermanentError(f"{kind} {action} failed: {exc}; not sent") from exc
            raw = assemble(outer, entity)
        elif seven_bit:
            raw = message_7bit(raw)
        for signer in self.dkim:
            raw = signer.sign(raw)
        event(self.log, "mailauth.sealed", logging.DEBUG, envelope_id=envelope_id, connector=self.connector,
              signed=kind if plan.sign else "", encrypted=kind if encrypt else "",
              dkim=",".join(s.cfg.domain for s in self.dkim))
        return raw


def _as_bytes(message: Message) -> bytes:
    return message.as_bytes(policy=message.policy.clone(linesep="\r\n"))


def header_recipients(raw: bytes) -> list[str]:
    """The addresses in To, Cc and Bcc, each once."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = [str(v) for name in ("To", "Cc", "Bcc") for v in headers.get_all(name) or []]
    return list(dict.fromkeys(addr for _, addr in getaddresses(values) if "@" in addr))


async def seal_message(message: Message | bytes, cfg: Sealing, *, recipients: Sequence[str] | None = None,
                       options: SealOptions | Mapping[str, Any] | None = None) -> bytes:
    """One-off :meth:`Sealer.seal` (a connector keeps a :class:`Sealer` instead)."""
    try:
        sealer = Sealer(cfg)
    except ValueError as exc:
        raise PermanentError(f"sealing is misconfigured: {exc}") from exc
    try:
        return await sealer.seal(message, recipients=recipients, options=options)
    finally:
        await sealer.close()
