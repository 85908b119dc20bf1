"""Reading the mail signers' private keys, for config validation and for the signers alone.

Only ``cryptography``: checking a key while the config is validated loads no signer (dkimpy,
the S/MIME builders). Errors are ``ValueError`` naming the problem, never quoting the key.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

MIN_RSA_BITS = 1024

#: An S/MIME signing key.
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


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


def load_private_key(text: str, password: str | None) -> SigningKey:
    """Our signing key (RSA or EC, PEM). Raises ValueError without quoting the key."""
    try:
        key = serialization.load_pem_private_key(text.strip().encode("ascii", "replace"),
                                                 password=password.encode() if password else None)
    except TypeError:
        raise ValueError("smime.key is encrypted: set smime.key_password (or the key is not encrypted "
                         "and key_password must go)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("smime.key is not a readable PEM private key (or key_password is wrong)") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("smime.key must be an RSA or EC private key")
    return key
