"""DKIM signing (RFC 6376) with dkimpy: rsa-sha256 or ed25519-sha256 (RFC 8463), relaxed/relaxed.

Every configured header name is signed once more than it occurs, so none of them can be added
after signing without breaking the signature (RFC 6376 8.15).
"""

from __future__ import annotations

import base64
from collections import Counter

import dkim  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from connectors.mailauth.config import DkimSigning
from connectors.mailauth.keys import load_signing_key
from connectors.mailauth.mime import field_name, split_head
from gateway.sdk import PermanentError


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
