"""S/MIME (RFC 8551) with ``cryptography``'s PKCS#7 builders: a detached signature in
multipart/signed (sha-256), and enveloped data (AES-256-CBC) for recipients' RSA certificates.

The signed and encrypted bytes are the MIME entity exactly as it goes on the wire (CRLF,
7-bit), so ``openssl smime -verify`` and mail clients check what was signed.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connectors.mailauth.config import SmimeSettings
from connectors.mailauth.keys import SigningKey, load_private_key
from connectors.mailauth.mime import base64_lines, multipart

_SIGNATURE_HEAD = (b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n"
                   b'Content-Disposition: attachment; filename="smime.p7s"\r\n\r\n')
_ENVELOPED_HEAD = (b'Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"\r\n'
                   b"Content-Transfer-Encoding: base64\r\n"
                   b'Content-Disposition: attachment; filename="smime.p7m"\r\n\r\n')
_SIGNED_TYPE = 'multipart/signed; protocol="application/pkcs7-signature"; micalg="sha-256"'


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, or in the *.pem/*.crt files of a directory."""
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith((".pem", ".crt")))
    certs: list[x509.Certificate] = []
    for name in files:
        try:
            with open(name, "rb") as fh:
                certs.extend(x509.load_pem_x509_certificates(fh.read()))
        except OSError as exc:
            raise ValueError(f"cannot read certificates from {name!r}: {exc.strerror}") from None
        except ValueError:
            raise ValueError(f"{name!r} holds no readable PEM certificate") from None
    return certs


def email_addresses(cert: x509.Certificate) -> set[str]:
    """The mail addresses a certificate is for (subjectAltName rfc822Name, subject emailAddress)."""
    found = {str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found.update(a.lower() for a in san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    return found


def _usable_for_mail(cert: x509.Certificate, now: datetime.datetime) -> bool:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return False
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.EMAIL_PROTECTION in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


class SmimeSealer:
    def __init__(self, cfg: SmimeSettings):
        self.cfg = cfg
        self.cert: x509.Certificate | None = None
        self.chain: list[x509.Certificate] = []
        self.key: SigningKey | None = None
        self.by_address: dict[str, list[x509.Certificate]] = {}
        if cfg.cert is not None and cfg.key is not None:
            certs = load_certificates(cfg.cert)
            if not certs:
                raise ValueError(f"smime.cert {cfg.cert!r} holds no certificate")
            self.cert, self.chain = certs[0], certs[1:]
            password = cfg.key_password.get_secret_value() if cfg.key_password is not None else None
            self.key = load_private_key(cfg.key.get_secret_value(), password)
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if (self.cert.public_key().public_bytes(serialization.Encoding.DER, spki)
                    != self.key.public_key().public_bytes(serialization.Encoding.DER, spki)):
                raise ValueError("smime.key does not belong to the first certificate in smime.cert")
        if cfg.recipients is not None:
            for cert in load_certificates(cfg.recipients):
                if isinstance(cert.public_key(), rsa.RSAPublicKey):  # what PKCS7EnvelopeBuilder supports
                    for address in email_addresses(cert):
                        self.by_address.setdefault(address, []).append(cert)

    def find(self, recipients: Sequence[str]) -> tuple[list[x509.Certificate], list[str]]:
        """(a usable certificate per recipient, the recipients without one)."""
        now = datetime.datetime.now(datetime.UTC)
        found: list[x509.Certificate] = []
        missing: list[str] = []
        for address in recipients:
            usable = [c for c in self.by_address.get(address.lower(), []) if _usable_for_mail(c, now)]
            if usable:
                found.append(max(usable, key=lambda c: c.not_valid_after_utc))
            else:
                missing.append(address)
        return found, missing

    def sign(self, entity: bytes) -> bytes:
        """A multipart/signed entity around ``entity`` (which must be CRLF and 7-bit)."""
        if self.cert is None or self.key is None:
            raise ValueError("no signing certificate and key configured")
        builder = pkcs7.PKCS7SignatureBuilder().set_data(entity).add_signer(self.cert, self.key, hashes.SHA256())
        for extra in self.chain:
            builder = builder.add_certificate(extra)
        der = builder.sign(serialization.Encoding.DER,
                           [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.Binary])
        return multipart(_SIGNED_TYPE, [entity, _SIGNATURE_HEAD + base64_lines(der)],
                         preamble=b"This is an S/MIME signed message\r\n\r\n")

    @staticmethod
    def encrypt(entity: bytes, certs: Sequence[x509.Certificate]) -> bytes:
        """An application/pkcs7-mime enveloped-data entity holding ``entity``."""
        builder = pkcs7.PKCS7EnvelopeBuilder().set_data(entity).set_content_encryption_algorithm(algorithms.AES256)
        for cert in certs:
            builder = builder.add_recipient(cert)
        der = builder.encrypt(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
        return _ENVELOPED_HEAD + base64_lines(der)
