"""DKIM signing (RFC 6376) with dkimpy: rsa-sha256 or ed25519-sha256 (RFC 8463), relaxed/relaxed.

Every configured header name is signed once more than it occurs, so none of them can be added
after signing without breaking the signature (RFC 6376 8.15).
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter

import dkim  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from connectors.mailauth.config import DkimSigning
from connectors.mailauth.mime import field_name, split_head
from gateway.contract import PermanentError

MIN_RSA_BITS = 1024


def load_signing_key(text: str) -> tuple[str, bytes]:
    """(algorithm, the key as dkimpy wants it). Raises ValueError without quoting the key."""
    data = text.strip().encode("ascii", "replace")
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ValueError("dkim.key is encrypted; give the key without a passphrase (it is a secret)") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError("dkim.key is not a readable PEM private key") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise ValueError(f"dkim.key: RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301); use 2048")
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
            return "rsa-sha256", pem
        if isinstance(key, ed25519.Ed25519PrivateKey):
            seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
            return "ed25519-sha256", base64.b64encode(seed)
        raise ValueError("dkim.key must be an RSA or Ed25519 private key")
    try:
        seed = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ValueError("dkim.key is neither a PEM private key nor a base64 Ed25519 seed (32 bytes)")
    return "ed25519-sha256", base64.b64encode(seed)


def public_record(text: str) -> str:
    """The TXT record to publish at ``<selector>._domainkey.<domain>`` for a private key."""
    algorithm, key = load_signing_key(text)
    if algorithm == "rsa-sha256":
        private = serialization.load_pem_private_key(key, password=None)
        der = private.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    seed = base64.b64decode(key)
    raw = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")


class DkimSigner:
    """Signs CRLF messages for one domain and selector."""

    def __init__(self, cfg: DkimSigning):
        self.cfg = cfg
        self.algorithm, self._key = load_signing_key(cfg.key.get_secret_value())

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature on top. Raises :class:`PermanentError`."""
        fields, _ = split_head(message)
        present = Counter(field_name(f) for f in fields)
        if present["from"] != 1:
            raise PermanentError(f"DKIM: the message has {present['from']} From headers (exactly one is needed)")
        include: list[bytes] = []
        for name in dict.fromkeys(self.cfg.headers):
            include.extend([name.encode("ascii")] * (present[name] + 1))
        try:
            signature = dkim.sign(
                message, self.cfg.selector.encode("ascii"), self.cfg.domain.encode("ascii"), self._key,
                canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=self.algorithm.encode("ascii"),
                include_headers=include, linesep=b"\r\n")
        except Exception as exc:
            raise PermanentError(f"DKIM signing for {self.cfg.domain} failed: "
                                 f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(signature, bytes) or not signature.startswith(b"DKIM-Signature:"):
            raise PermanentError(f"DKIM signing for {self.cfg.domain} produced no signature")
        return signature + message
