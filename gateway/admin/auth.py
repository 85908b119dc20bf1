"""Who may use the admin API: bearer tokens, roles, sessions, the second factor (RFC 6238 TOTP)
and the budget of failed attempts per client address.

Tokens are configured under ``gateway.admin.tokens`` as sha256 digests (or by reference);
``viewer`` reads, ``editor`` writes. ``POST /api/login`` trades a token, plus a one-time code
for a token that has a second factor, for a session with a limited life
(``gateway.admin.session_ttl``). With no tokens configured, only clients on loopback are let in.

Sessions are signed, not stored: ``gws_<claims>.<mac>``. The claims (token name, role, session
id, issued, expires) are base64url JSON; the MAC is HMAC-SHA256 under a key derived from
``gateway.admin.session_key`` and the token's current credentials (its sha256 digest and its
TOTP secret). So any replica with the same session key and the same tokens accepts a session,
and a token whose secret changes or that is removed ends its sessions on every replica at the
next request: the key they were signed under is gone. The session key is a secret of its own,
not derived from the tokens, because the tokens are mostly configured as digests in routes.yaml,
which viewers read through ``GET /api/routes``: a key made from them would let a viewer sign an
editor's session. Without ``session_key`` each process signs with a random key of its own.

What each process keeps for itself, there being no store the replicas share: the list of
logged-out sessions (refused at once by the replica that answered the logout; the others accept
the session until it expires: rotate the token, or the session key, to end sessions everywhere
at once), the TOTP replay guard (a code is accepted once per replica, so a code seen by someone
who also holds the token could be used once more on each other replica within its ~90 s), and
the failed-attempt budget.

Failed attempts (a wrong bearer token or session, a wrong login or one-time code) are counted
per client address (an IPv6 client by its /64): 20 are allowed, one more every 3 s; once they
are spent the address is answered ``429`` with ``Retry-After`` for a back-off that doubles from
1 s up to 5 min while failures go on, and resets after a quiet minute. The budget never looks at
which token was tried, so guessing cannot lock a token out: a correct token from an address that
is not throttled always works. A correct token from a throttled address waits like any other
attempt, or guessing would go on unthrottled.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from gateway.admin.body import read_json
from gateway.config.models import AdminSettings, AdminToken, current_secret
from gateway.logs import event

if TYPE_CHECKING:
    from gateway.admin.port import AdminPort

_log = logging.getLogger("gateway.admin")

#: TOTP (RFC 6238) parameters: the common authenticator-app defaults.
TOTP_STEP, TOTP_DIGITS = 30, 6
#: What every session token starts with.
SESSION_PREFIX = "gws_"
#: Logged-out sessions remembered per process; past this, a logout ends every session of its
#: token issued until then (on this replica), so no logout is ever forgotten.
MAX_LOGGED_OUT = 100_000
_SESSION_CONTEXT = b"gateway admin session v1"
_MAX_SESSION_CHARS = 2048


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def client_key(host: str | None) -> str:
    """The address the failed-attempt budget is kept for: IPv4 as is, IPv6 by its /64 (one
    client usually holds a whole /64)."""
    if not host:
        return ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class SessionClaims:
    """What a session token says about itself; trusted only once its MAC is checked."""

    name: str
    role: str
    sid: str
    issued: float
    expires: float


class Principal:
    def __init__(self, name: str, role: str, via: str = "token", *, needs_code: bool = False,
                 session: SessionClaims | None = None):
        self.name = name
        self.role = role
        #: How it was authenticated: token, session or loopback.
        self.via = via
        #: An editor token with a second factor used directly: it reads; writing needs a session.
        self.needs_code = needs_code
        self.session = session


# --- second factor ---------------------------------------------------------------------------


def totp_code(secret_b32: str, counter: int) -> str:
    """The RFC 6238 code (HMAC-SHA1, 6 digits) of a base32 secret for one time step."""
    key = base64.b32decode(secret_b32.replace(" ", "").upper() + "=" * (-len(secret_b32.replace(" ", "")) % 8))
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def _totp_secret(token: AdminToken) -> str | None:
    """The token's TOTP secret, when the config gives it one (``totp: "${ADMIN_TOTP}"``)."""
    return current_secret(token.totp) or None


def _expected_digest(token: AdminToken) -> str:
    if token.sha256:
        return token.sha256.lower()
    value = current_secret(token.token)
    return hash_token(value) if value else ""


def _match_token(tokens: list[AdminToken], presented: str) -> AdminToken | None:
    digest = hash_token(presented.strip())
    found = None
    for t in tokens:  # every token is compared, so the time taken does not say which one matched
        expected = _expected_digest(t)
        if expected and hmac.compare_digest(expected, digest) and found is None:
            found = t
    return found


# --- the failed-attempt budget ---------------------------------------------------------------


@dataclass
class _Allowance:
    left: float
    at: float
    blocked_until: float = 0.0
    backoff: float = 0.0


class FailureBudget:
    """Failed attempts per client address, with a back-off once the allowance is spent (see the
    module card). Keeps at most ``max_clients`` addresses, dropping the least recently failed."""

    def __init__(self, allowance: int = 20, refill_seconds: float = 3.0, first_backoff: float = 1.0,
                 max_backoff: float = 300.0, max_clients: int = 10_000):
        self.allowance = allowance
        self.refill_seconds = refill_seconds
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.max_clients = max_clients
        self._clients: collections.OrderedDict[str, _Allowance] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def _refill(self, a: _Allowance, now: float) -> None:
        # Nothing comes back while blocked: the quiet time that restores the allowance starts after.
        since = max(a.at, a.blocked_until)
        if now > since:
            a.left = min(float(self.allowance), a.left + (now - since) / self.refill_seconds)
            a.at = now
        if a.left >= self.allowance:
            a.backoff = 0.0

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        a = self._clients.get(client)
        now = time.monotonic() if now is None else now
        return max(0.0, a.blocked_until - now) if a is not None else 0.0

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        a = self._clients.pop(client, None)
        if a is None:
            a = _Allowance(float(self.allowance), now)
            while len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
        self._clients[client] = a
        self._refill(a, now)
        a.left = max(0.0, a.left - 1)
        if a.left < 1:
            a.backoff = min(self.max_backoff, a.backoff * 2 if a.backoff else self.first_backoff)
            a.blocked_until = now + a.backoff


# --- sessions --------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key(base_key: bytes, token: AdminToken) -> bytes | None:
    """The key a token's sessions are signed with: it changes whenever the token's secret or
    second factor does, which ends the sessions signed with the old one."""
    digest = _expected_digest(token)
    if not digest:
        return None
    material = b"\0".join([_SESSION_CONTEXT, token.name.encode(), digest.encode(),
                           (_totp_secret(token) or "").encode()])
    return hmac.new(base_key, material, hashlib.sha256).digest()


def _mac(key: bytes, claims_b64: str) -> str:
    return _b64(hmac.new(key, claims_b64.encode("ascii"), hashlib.sha256).digest())


def _read_claims(presented: str) -> tuple[SessionClaims, str, str] | None:
    if not presented.startswith(SESSION_PREFIX) or len(presented) > _MAX_SESSION_CHARS:
        return None
    claims_b64, dot, mac = presented[len(SESSION_PREFIX):].partition(".")
    if not dot:
        return None
    try:
        raw = json.loads(_unb64(claims_b64))
        claims = SessionClaims(raw["n"], raw["r"], raw["s"], float(raw["i"]), float(raw["e"]))
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None
    if not all(isinstance(v, str) for v in (claims.name, claims.role, claims.sid)):
        return None
    return claims, claims_b64, mac


class AuthState:
    """What one process keeps: its fallback signing key, the logged-out sessions, the last TOTP
    step each token used (no replays) and the failed-attempt budget."""

    def __init__(self) -> None:
        #: Signs sessions when ``gateway.admin.session_key`` is not set.
        self.process_key = secrets.token_bytes(32)
        self.last_step: dict[str, int] = {}
        self.logged_out: dict[str, float] = {}  # session id → its expiry
        self.ended_before: dict[str, float] = {}  # token name → sessions issued up to then are over
        self.budget = FailureBudget()

    def base_key(self, admin: AdminSettings) -> bytes:
        configured = current_secret(admin.session_key)
        return configured.encode("utf-8") if configured else self.process_key

    def create(self, admin: AdminSettings, token: AdminToken, role: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        key = _signing_key(self.base_key(admin), token)
        if key is None:
            raise ValueError(f"token {token.name!r} has no secret to sign sessions with")
        claims = {"n": token.name, "r": role, "s": secrets.token_urlsafe(12), "i": now,
                  "e": now + admin.session_ttl}
        claims_b64 = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
        return f"{SESSION_PREFIX}{claims_b64}.{_mac(key, claims_b64)}"

    def verify(self, admin: AdminSettings, presented: str, now: float | None = None) -> Principal | None:
        """The principal of a session that is signed for its token's current credentials, not
        expired and not logged out here; None otherwise."""
        now = time.time() if now is None else now
        read = _read_claims(presented)
        if read is None:
            return None
        claims, claims_b64, mac = read
        token = next((t for t in admin.tokens if t.name == claims.name), None)
        key = _signing_key(self.base_key(admin), token) if token is not None else None
        if token is None or key is None or not hmac.compare_digest(_mac(key, claims_b64), mac):
            return None
        if claims.expires <= now or claims.sid in self.logged_out \
                or claims.issued <= self.ended_before.get(claims.name, -math.inf):
            return None
        # A token turned viewer makes its sessions viewers; a viewer's session never turns editor.
        role = "editor" if claims.role == "editor" and token.role == "editor" else "viewer"
        return Principal(claims.name, role, "session", session=claims)

    def log_out(self, claims: SessionClaims, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self.logged_out) >= MAX_LOGGED_OUT:
            self.logged_out = {sid: exp for sid, exp in self.logged_out.items() if exp > now}
        if len(self.logged_out) < MAX_LOGGED_OUT:
            self.logged_out[claims.sid] = claims.expires
        else:
            self.ended_before[claims.name] = max(claims.issued, self.ended_before.get(claims.name, -math.inf))

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


def _client(request: Request) -> str:
    return client_key(request.client.host if request.client else None)


def _refuse_if_throttled(auth_state: AuthState, client: str) -> None:
    wait = auth_state.budget.retry_after(client)
    if wait > 0:
        raise HTTPException(429, "too many failed attempts from this address; try again later",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})


def make_auth(runtime: AdminPort, state: AuthState | None = None) -> Any:
    auth_state = state or AuthState()

    # async: runs on the loop, so the state above is never touched from two threads at once
    async def authenticate(request: Request) -> Principal:
        admin = runtime.config.model.gateway.admin
        if not admin.tokens:
            if _is_loopback(request.client.host if request.client else None):
                return Principal("local", "editor", "loopback")
            raise HTTPException(403, "the admin API is open to loopback only until gateway.admin.tokens is set")
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})
        client = _client(request)
        _refuse_if_throttled(auth_state, client)
        if presented.startswith(SESSION_PREFIX):
            principal = auth_state.verify(admin, presented)
            if principal is not None:
                return principal
        t = _match_token(admin.tokens, presented)
        if t is not None:
            needs_code = t.role == "editor" and _totp_secret(t) is not None
            return Principal(t.name, "viewer" if needs_code else t.role, "token", needs_code=needs_code)
        auth_state.budget.failed(client)
        raise HTTPException(401, "invalid or ended token", headers={"WWW-Authenticate": "Bearer"})

    return authenticate


def make_editor(auth: Any) -> Any:
    async def editor(p: Principal = Depends(auth)) -> Principal:  # noqa: B008 - FastAPI's dependency idiom
        if p.role == "editor":
            return p
        if p.needs_code:
            raise HTTPException(403, f"token {p.name!r} has a second factor: used directly it only reads; "
                                     "to edit, log in with POST /api/login and a one-time code")
        raise HTTPException(403, f"token {p.name!r} has role 'viewer'; editing needs an editor token")

    return editor


def login_api(app: FastAPI, runtime: AdminPort, auth: Any, auth_state: AuthState) -> None:
    """``POST /api/login``, ``POST /api/logout`` and ``GET /api/whoami``."""

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        client = _client(request)
        _refuse_if_throttled(auth_state, client)
        body = await read_json(request)
        token, otp = body.get("token"), body.get("otp")
        if not isinstance(token, str) or not token.strip():
            raise HTTPException(422, "body must be {\"token\": \"...\", \"otp\": \"123456\" (if required)}")
        admin = runtime.config.model.gateway.admin
        t = _match_token(admin.tokens, token)
        if t is None:
            auth_state.budget.failed(client)
            await asyncio.sleep(0.2)
            event(_log, "admin.login_failed", logging.WARNING, client=client, reason="token")
            raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
        secret = _totp_secret(t)
        if secret and t.role == "editor":
            if not isinstance(otp, str) or not otp:
                return JSONResponse({"detail": "this token needs a one-time code", "otp_required": True},
                                    status_code=401)
            if not auth_state.verify_totp(t.name, secret, otp.strip()):
                auth_state.budget.failed(client)
                event(_log, "admin.login_failed", logging.WARNING, client=client, token=t.name, reason="otp")
                return JSONResponse({"detail": "the one-time code is wrong or was used already",
                                     "otp_required": True}, status_code=401)
        session = auth_state.create(admin, t, t.role)
        event(_log, "admin.login", token=t.name, role=t.role, client=client, second_factor=bool(secret))
        return JSONResponse({"session": session, "name": t.name, "role": t.role,
                             "expires_in": int(admin.session_ttl)})

    @app.post("/api/logout")
    async def logout(p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        if p.session is not None:
            auth_state.log_out(p.session)
        return {"logged_out": p.name}

    @app.get("/api/whoami")
    async def whoami(p: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return {"name": p.name, "role": p.role, "via": p.via}
