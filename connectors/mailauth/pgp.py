"""PGP/MIME (RFC 3156) with python-gnupg over the ``gpg`` binary, in a GnuPG home of our own.

Signing makes multipart/signed with a detached, armored signature (SHA-256) over the CRLF,
7-bit entity; encryption makes multipart/encrypted, signed and encrypted in one OpenPGP
message when both are asked for (RFC 3156 6.2). Every key in the home is trusted
(``--trust-model always``): the home is the gateway's alone and its keys are the operator's
choice. Calls block (gpg runs as a subprocess): run them on a worker thread.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import gnupg  # type: ignore[import-untyped]

from connectors.mailauth.config import PgpSettings
from connectors.mailauth.mime import multipart, to_crlf

#: OpenPGP hash algorithm ids (RFC 4880 9.4) → the micalg names of RFC 3156.
_MICALG = {"1": "pgp-md5", "2": "pgp-sha1", "3": "pgp-ripemd160", "8": "pgp-sha256", "9": "pgp-sha384",
           "10": "pgp-sha512", "11": "pgp-sha224"}
_DIGEST = ["--digest-algo", "SHA256"]
_SIGNATURE_HEAD = (b'Content-Type: application/pgp-signature; name="signature.asc"\r\n'
                   b"Content-Description: OpenPGP digital signature\r\n"
                   b'Content-Disposition: attachment; filename="signature.asc"\r\n\r\n')
_VERSION_PART = (b"Content-Type: application/pgp-encrypted\r\n"
                 b"Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n")
_ENCRYPTED_HEAD = (b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
                   b"Content-Description: OpenPGP encrypted message\r\n"
                   b'Content-Disposition: inline; filename="encrypted.asc"\r\n\r\n')
#: Key validity letters (gpg --with-colons field 2) that make a key unusable.
_UNUSABLE = {"i", "d", "r", "e", "n"}


class PgpError(Exception):
    """gpg refused; the message is safe to show (no key material, no passphrase)."""


class PgpSealer:
    def __init__(self, cfg: PgpSettings):
        self.cfg = cfg
        self.gpg: gnupg.GPG | None = None
        self.sign_fingerprint = ""

    @property
    def _passphrase(self) -> str | None:
        return self.cfg.passphrase.get_secret_value() if self.cfg.passphrase is not None else None

    def open(self) -> None:
        """Make the home, import ``keys``, and prove that ``sign_key`` can sign. Raises ValueError."""
        home = self.cfg.home
        if not os.path.isdir(home):
            os.makedirs(home, mode=0o700, exist_ok=True)
        try:
            gpg = gnupg.GPG(gnupghome=home)
        except (OSError, ValueError) as exc:
            raise ValueError(f"pgp: cannot run gpg with home {home!r}: {exc}") from None
        gpg.encoding = "utf-8"
        if self.cfg.keys is not None:
            imported = gpg.import_keys(self.cfg.keys.get_secret_value())
            if not imported.count:
                raise ValueError("pgp.keys: gpg imported no key from it")
        if self.cfg.sign_key is not None:
            secret = gpg.list_keys(secret=True, keys=[self.cfg.sign_key])
            if len(secret) != 1:
                raise ValueError(f"pgp.sign_key {self.cfg.sign_key!r} matches {len(secret)} secret keys in "
                                 f"{home!r} (exactly one is needed)")
            self.sign_fingerprint = secret[0]["fingerprint"]
            probe = gpg.sign(b"probe", keyid=self.sign_fingerprint, passphrase=self._passphrase, detach=True,
                             extra_args=_DIGEST)
            if not probe:
                raise ValueError(f"pgp: cannot sign with {self.cfg.sign_key!r}: {probe.status or 'gpg failed'}")
        self.gpg = gpg

    def close(self) -> None:
        """Stop the gpg-agent gpg started for our home (it would outlive us otherwise)."""
        # Even after a failed open: listing secret keys or a refused signature started it too.
        if os.path.isdir(self.cfg.home):
            try:
                subprocess.run(["gpgconf", "--homedir", self.cfg.home, "--kill", "gpg-agent"],
                               capture_output=True, timeout=10, check=False)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.gpg = None

    def _ready(self) -> gnupg.GPG:
        if self.gpg is None:
            raise PgpError("pgp is not open")
        return self.gpg

    def find(self, recipients: Sequence[str]) -> tuple[list[str], list[str]]:
        """(fingerprints of usable encryption keys, recipients without one)."""
        gpg = self._ready()
        found: list[str] = []
        missing: list[str] = []
        for address in recipients:
            keys = [k for k in gpg.list_keys(keys=[f"<{address}>"])
                    if "E" in str(k.get("cap", "")) and str(k.get("trust", "")) not in _UNUSABLE]
            if keys:
                found.append(str(keys[0]["fingerprint"]))
            else:
                missing.append(address)
        return found, missing

    def sign(self, entity: bytes) -> bytes:
        """A multipart/signed entity around ``entity`` (CRLF, 7-bit)."""
        gpg = self._ready()
        result = gpg.sign(entity, keyid=self.sign_fingerprint, passphrase=self._passphrase, detach=True,
                          binary=False, extra_args=_DIGEST)
        if not result or not result.data:
            raise PgpError(f"signing failed: {result.status or 'gpg failed'}")
        micalg = _MICALG.get(str(result.hash_algo))
        if micalg is None:
            raise PgpError(f"gpg used an unexpected hash algorithm ({result.hash_algo})")
        content_type = f'multipart/signed; micalg="{micalg}";\r\n\tprotocol="application/pgp-signature"'
        return multipart(content_type, [entity, _SIGNATURE_HEAD + to_crlf(result.data)],
                         preamble=b"This is an OpenPGP/MIME signed message (RFC 4880 and 3156)\r\n\r\n")

    def encrypt(self, entity: bytes, fingerprints: Sequence[str], sign: bool) -> bytes:
        """A multipart/encrypted entity holding ``entity`` (signed inside when ``sign``)."""
        gpg = self._ready()
        result = gpg.encrypt(entity, list(fingerprints), sign=self.sign_fingerprint if sign else None,
                             passphrase=self._passphrase if sign else None, always_trust=True, armor=True,
                             extra_args=_DIGEST)
        if not result.ok or not result.data:
            raise PgpError(f"encryption failed: {result.status or 'gpg failed'}")
        return multipart('multipart/encrypted; protocol="application/pgp-encrypted"',
                         [_VERSION_PART, _ENCRYPTED_HEAD + to_crlf(result.data)],
                         preamble=b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n\r\n")
