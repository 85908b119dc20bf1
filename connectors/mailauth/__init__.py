"""mailauth — mail authenticity and encryption for the mail connectors (a library, not a connector).

Features:

* Inbound (:class:`Verifier`): SPF (pyspf) for the client IP, MAIL FROM and HELO; DKIM
  (dkimpy) for every signature (at most 8; ``rsa-sha1`` and an ``l=`` shorter than the body
  are ``policy``, never ``pass``); DMARC (RFC 7489) alignment and policy with the public
  suffix list ``publicsuffixlist`` ships, for every author domain in From (the strictest
  outcome decides). Results are RFC 8601 words (pass, fail, softfail, neutral, none,
  temperror, permerror, policy) in :class:`AuthResults`; ``as_dict()`` is what routes see
  as ``auth`` (``auth.spf``, ``auth.dkim``, ``auth.dmarc``, ``auth.dmarc_disposition``,
  ``auth.from_domain``…), :func:`add_authentication_results` puts the Authentication-Results
  header on the message passed on (dropping forged ones that claim our authserv-id), and
  :func:`smtp_reply` maps results and the connector's policy (reject / tag / off) to the SMTP
  answer: ``550 5.7.1`` for a DMARC failure under p=reject or a message whose author cannot be
  told (no From, several, unparsable), ``451 4.7.1`` for a temperror, or None to accept. DNS
  goes through dnspython with the configured resolver and timeout; a DNS failure is
  ``temperror``, never a permanent rejection.
* Outbound (:class:`Sealer`): S/MIME (``cryptography``; detached multipart/signed, enveloped
  AES-256) or PGP/MIME (RFC 3156, python-gnupg over ``gpg`` in a GnuPG home of our own), then
  DKIM (rsa-sha256 / ed25519-sha256, relaxed/relaxed). Output is CRLF wire bytes; an encrypted
  message is one copy for To and Cc and one per Bcc recipient (:meth:`Sealer.seal_copies`). A
  target connector keeps an :class:`OutboundSealing` (the Sealer from ``open`` to ``close``; a sealer
  that cannot work keeps the connector down instead of sending weaker).

Delivery guarantee: verification never loses a message: it answers, tags, or asks the sender to
retry. Sealing raises :class:`gateway.contract.PermanentError` with the reason for every signing
or encryption failure, and for a recipient without a key unless ``missing_key: plain``: never an
unsigned send when signing is on.

Config (mixed into a mail connector's config): ``auth_check: {spf, dkim, dmarc, policy, resolver,
timeout, authserv_id}`` (:class:`AuthCheck`); ``dkim: {domain, selector, key, headers}``,
``smime: {sign, encrypt, cert, key, key_password, recipients, missing_key}``, ``pgp: {home, keys,
sign, sign_key, passphrase, encrypt, missing_key}`` (:class:`SealSettings`); per route
``seal: {sign, encrypt, missing_key}`` (:class:`SealOptions`).
"""

from connectors.mailauth.config import (
    AuthCheck,
    AuthCheckSettings,
    DkimSigning,
    PgpSettings,
    SealOptions,
    SealSettings,
    SmimeSettings,
)
from connectors.mailauth.dkimsign import public_record
from connectors.mailauth.outbound import OutboundSealing
from connectors.mailauth.seal import Sealer, seal_message
from connectors.mailauth.verify import (
    AuthResults,
    DkimSignatureResult,
    Verifier,
    add_authentication_results,
    smtp_reply,
    verify_message,
)

__all__ = [
    "AuthCheck",
    "AuthCheckSettings",
    "AuthResults",
    "DkimSignatureResult",
    "DkimSigning",
    "OutboundSealing",
    "PgpSettings",
    "SealOptions",
    "SealSettings",
    "Sealer",
    "SmimeSettings",
    "Verifier",
    "add_authentication_results",
    "public_record",
    "seal_message",
    "smtp_reply",
    "verify_message",
]
