"""Who may use the admin API: bearer tokens, roles, sessions and the second factor (RFC 6238 TOTP).

Tokens are configured under ``gateway.admin.tokens`` as sha256 digests (or by reference);
``viewer`` reads, ``editor`` writes. ``POST /api/login`` trades a token, plus a one-time code
for a token that has a second factor, for a session with a limited life. With no tokens
configured, only clients on loopback are let in.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import secrets
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from gateway.admin.body import read_json
from gateway.logs import event

if TYPE_CHECKING:
    from gateway.runtime import Runtime

_log = logging.getLogger("gateway.admin")

#: Life of a session from POST /api/login.
SESSION_SECONDS = 8 * 3600
#: TOTP (RFC 6238) parameters: the common authenticator-app defaults.
TOTP_STEP, TOTP_DIGITS = 30, 6


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Principal:
    def __init__(self, name: str, role: str, via: str = "token"):
        self.name = name
        self.role = role
        #: How it was authenticated: token, session or loopback.
        self.via = via


# --- second factor ---------------------------------------------------------------------------


def totp_code(secret_b32: str, counter: int) -> str:
    """The RFC 6238 code (HMAC-SHA1, 6 digits) of a base32 secret for one time step."""
    key = base64.b32decode(secret_b32.replace(" ", "").upper() + "=" * (-len(secret_b32.replace(" ", "")) % 8))
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def _totp_secret(token: Any) -> str | None:
    """The token's TOTP secret, when the config gives it one (``totp: "${ADMIN_TOTP}"``)."""
    secret = getattr(token, "totp", None)
    if secret is None:
        return None
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
    return value or None


@dataclass
class _Session:
    name: str
    role: str
    expires: float


@dataclass
class AuthState:
    """Sessions from POST /api/login and the last TOTP step each token used (no replays)."""

    sessions: dict[str, _Session] = field(default_factory=dict)
    last_step: dict[str, int] = field(default_factory=dict)
    #: Recent failed logins per client address (at most 20 kept per client, 1,000 clients).
    failures: dict[str, collections.deque[float]] = field(default_factory=dict)

    def throttled(self, client: str) -> bool:
        q = self.failures.get(client)
        return q is not None and len(q) == q.maxlen and time.time() - q[0] < 60

    def failed(self, client: str) -> None:
        if client not in self.failures and len(self.failures) >= 1000:
            self.failures.pop(next(iter(self.failures)))
        self.failures.setdefault(client, collections.deque(maxlen=20)).append(time.time())

    def create(self, name: str, role: str) -> str:
        now = time.time()
        for key in [k for k, s in self.sessions.items() if s.expires < now]:
            del self.sessions[key]
        token = "gws_" + secrets.token_urlsafe(32)
        self.sessions[hash_token(token)] = _Session(name, role, now + SESSION_SECONDS)
        return token

    def lookup(self, token: str) -> _Session | None:
        s = self.sessions.get(hash_token(token))
        if s is None or s.expires < time.time():
            return None
        return s

    def verify_totp(self, name: str, secret: str, code: str, now: float | None = None) -> bool:
        """Accept the code of this step or its neighbours, each step once."""
        if not (code.isdigit() and len(code) == TOTP_DIGITS):
            return False
        step = int((now if now is not None else time.time()) // TOTP_STEP)
        for candidate in (step - 1, step, step + 1):
            try:
                ok = hmac.compare_digest(totp_code(secret, candidate), code)
            except (ValueError, TypeError):
                return False
            if ok:
                if candidate <= self.last_step.get(name, -1):
                    return False
                self.last_step[name] = candidate
                return True
        return False


def _match_token(runtime: Runtime, presented: str) -> Any:
    digest = hash_token(presented.strip())
    found = None
    for t in runtime.config.model.gateway.admin.tokens:
        expected = t.sha256 or (hash_token(t.token.get_secret_value()) if t.token else "")
        if expected and hmac.compare_digest(expected.lower(), digest) and found is None:
            found = t
    return found


def make_auth(runtime: Runtime, state: AuthState | None = None) -> Any:
    auth_state = state or AuthState()

    def authenticate(request: Request) -> Principal:
        tokens = runtime.config.model.gateway.admin.tokens
        header = request.headers.get("authorization", "")
        if not tokens:
            if _is_loopback(request.client.host if request.client else None):
                return Principal("local", "editor", "loopback")
            raise HTTPException(403, "the admin API is open to loopback only until gateway.admin.tokens is set")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
        session = auth_state.lookup(presented.strip())
        if session is not None:
            # A session lives only while its token is still configured with that role.
            t = next((t for t in tokens if t.name == session.name), None)
            if t is not None:
                return Principal(session.name, session.role if t.role == "editor" else "viewer", "session")
        t = _match_token(runtime, presented)
        if t is not None:
            role = "viewer" if t.role == "editor" and _totp_secret(t) else t.role
            return Principal(t.name, role, "token")
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})

    return authenticate


def make_editor(auth: Any) -> Any:
    def editor(p: Principal = Depends(auth)) -> Principal:  # noqa: B008 - FastAPI's dependency idiom
        if p.role != "editor":
            hint = " (this token has a second factor: log in with POST /api/login and a one-time code)" \
                if p.via == "token" else ""
            raise HTTPException(403, f"token {p.name!r} has role {p.role!r}; this needs 'editor'{hint}")
        return p

    return editor


def login_api(app: FastAPI, runtime: Runtime, auth: Any, auth_state: AuthState) -> None:
    """``POST /api/login``, ``POST /api/logout`` and ``GET /api/whoami``."""

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        body = await read_json(request)
        token, otp = body.get("token"), body.get("otp")
        if not isinstance(token, str) or not token.strip():
            raise HTTPException(422, "body must be {\"token\": \"...\", \"otp\": \"123456\" (if required)}")
        client = request.client.host if request.client else ""
        if auth_state.throttled(client):
            raise HTTPException(429, "too many failed logins; wait a minute", headers={"Retry-After": "60"})
        t = _match_token(runtime, token)
        if t is None:
            auth_state.failed(client)
            await asyncio.sleep(0.2)
            event(_log, "admin.login_failed", logging.WARNING, client=client, reason="token")
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        secret = _totp_secret(t)
        if secret and t.role == "editor":
            if not isinstance(otp, str) or not otp:
                return JSONResponse({"detail": "this token needs a one-time code", "otp_required": True},
                                    status_code=401)
            if not auth_state.verify_totp(t.name, secret, otp.strip()):
                auth_state.failed(client)
                event(_log, "admin.login_failed", logging.WARNING, client=client, token=t.name, reason="otp")
                return JSONResponse({"detail": "the one-time code is wrong or was used already",
                                     "otp_required": True}, status_code=401)
        session = auth_state.create(t.name, t.role)
        event(_log, "admin.login", token=t.name, role=t.role, client=client, second_factor=bool(secret))
        return JSONResponse({"session": session, "name": t.name, "role": t.role, "expires_in": SESSION_SECONDS})

    @app.post("/api/logout")
    async def logout(request: Request, p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        presented = request.headers.get("authorization", "").partition(" ")[2].strip()
        auth_state.sessions.pop(hash_token(presented), None)
        return {"logged_out": p.name}

    @app.get("/api/whoami")
    async def whoami(p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"name": p.name, "role": p.role, "via": p.via}
