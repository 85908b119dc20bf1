"""SMTP AUTH users: a password file with salted, slow hashes, never plain passwords.

The file (given to the connector as a secret: ``users: {file: /run/secrets/smtp-users}``) holds
one ``name:hash`` per line; ``#`` starts a comment. The hash is PBKDF2-HMAC-SHA256 in the
format passlib writes (``$pbkdf2-sha256$<rounds>$<salt>$<digest>``, adapted base64), so
``passlib`` or ``python -m connectors.smtp hash-password`` can make one.

Verification costs a fixed, deliberate amount of CPU (the rounds): call :meth:`Users.verify`
off the event loop. Unknown names are checked against a dummy hash so timing does not tell
which names exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

SCHEME = "pbkdf2-sha256"
DEFAULT_ROUNDS = 600_000
MIN_ROUNDS = 1_000
_LINE = re.compile(r"^([^:\s]{1,128}):(\$pbkdf2-sha256\$\d+\$[./A-Za-z0-9]+\$[./A-Za-z0-9]+)$")


def _ab64_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=").replace("+", ".")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class PasswordHash:
    rounds: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        parts = text.split("$")
        if len(parts) != 5 or parts[0] or parts[1] != SCHEME:
            raise ValueError(f"not a ${SCHEME}$ hash")
        rounds = int(parts[2])
        if rounds < MIN_ROUNDS:
            raise ValueError(f"{rounds} rounds is below the minimum of {MIN_ROUNDS}")
        try:
            salt, digest = _ab64_decode(parts[3]), _ab64_decode(parts[4])
        except ValueError:
            raise ValueError("salt or digest is not valid base64") from None
        if len(salt) < 8 or len(digest) < 16:
            raise ValueError("salt or digest is too short")
        return cls(rounds, salt, digest)

    def matches(self, password: bytes) -> bool:
        derived = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.rounds, dklen=len(self.digest))
        return hmac.compare_digest(derived, self.digest)


def hash_password(password: str, rounds: int = DEFAULT_ROUNDS, salt: bytes | None = None) -> str:
    """A ``$pbkdf2-sha256$`` hash of ``password`` (random 16-byte salt)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds, dklen=32)
    return f"${SCHEME}${rounds}${_ab64_encode(salt)}${_ab64_encode(digest)}"


# Never matches (no password derives to all zeros), but costs what a real check costs.
_DUMMY = PasswordHash(DEFAULT_ROUNDS, b"gateway-dummy-salt", bytes(32))


class Users:
    """The parsed password file."""

    def __init__(self, hashes: dict[str, PasswordHash]):
        self._hashes = hashes
        rounds = [h.rounds for h in hashes.values()]
        # Unknown names cost about as much as known ones.
        self._dummy = PasswordHash(max(rounds), _DUMMY.salt, _DUMMY.digest) if rounds else _DUMMY

    def __len__(self) -> int:
        return len(self._hashes)

    @classmethod
    def parse(cls, text: str) -> Users:
        """Parse the file; errors name the line, never its content."""
        hashes: dict[str, PasswordHash] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m is None:
                raise ValueError(f"users file line {number}: expected 'name:$pbkdf2-sha256$rounds$salt$digest'")
            try:
                hashes[m.group(1)] = PasswordHash.parse(m.group(2))
            except ValueError as exc:
                raise ValueError(f"users file line {number}: {exc}") from None
        if not hashes:
            raise ValueError("users file has no users")
        return cls(hashes)

    def verify(self, name: bytes | str, password: bytes) -> bool:
        """True when ``password`` is right for ``name``. CPU-bound: run it in a thread."""
        key = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        known = self._hashes.get(key)
        ok = (known or self._dummy).matches(password)
        return ok and known is not None
