"""The admin listener: probes, metrics, the authenticated admin API and the web editor.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers). Everything under
``/api`` needs a bearer token from ``gateway.admin.tokens`` (stored as sha256 digests; role
``viewer`` reads, ``editor`` writes). With no tokens configured, ``/api`` answers only clients
on loopback, so a fresh install is never an open admin API.

``POST /api/login`` trades a token (plus a one-time code, RFC 6238 TOTP, for a token that has a
second factor) for a signed session token with a limited life, accepted by every replica that
shares ``gateway.admin.session_key``; the web editor at ``/ui/`` uses only that. An editor token
with a second factor presented directly as a bearer token reads only (viewer): writing needs the
code. Every change is logged with the token's name.

Config endpoints (see the README, "Editing routing rules"): ``GET /api/config``, ``GET|PUT /api/routes`` (the PUT
carries ``If-Match: "<version>"``; an edit of a stale version answers ``409``),
``POST /api/routes/validate``, ``POST /api/routes/test`` (dry run, nothing sent),
``POST /api/reload``, ``GET /api/history``, ``GET /api/history/diff``,
``GET /api/history/{version}``, ``POST /api/history/{version}/rollback``, ``GET /api/schema``,
``GET /api/overview`` (routes and connectors with health and counters) and ``GET /api/live``
(the last messages per route).

The admin API sees the running gateway only through :class:`~gateway.admin.port.AdminPort`
(:mod:`~gateway.admin.port`): whoever starts the gateway implements it and calls
:func:`mount_admin` before the HTTP listeners start.

The package: :mod:`~gateway.admin.port` (what the API needs of the gateway),
:mod:`~gateway.admin.app` (the ASGI app, the probes and ``/metrics``),
:mod:`~gateway.admin.auth` (tokens, roles, sessions, the second factor),
:mod:`~gateway.admin.api_config` (the config and history endpoints),
:mod:`~gateway.admin.api_overview` with :mod:`~gateway.admin.live` (the overview and the live
view), :mod:`~gateway.admin.api_deadletters`, :mod:`~gateway.admin.ui` (the web editor's files)
and :mod:`~gateway.admin.body` (reading request bodies).
"""

from gateway.admin.app import build_admin, mount_admin
from gateway.admin.auth import (
    TOTP_DIGITS,
    TOTP_STEP,
    AuthState,
    FailureBudget,
    Principal,
    hash_token,
    make_auth,
    make_editor,
    totp_code,
)
from gateway.admin.body import MAX_CONFIG_BYTES
from gateway.admin.live import LiveLog
from gateway.admin.port import AdminPort, ConnectorStatus

__all__ = [
    "MAX_CONFIG_BYTES",
    "TOTP_DIGITS",
    "TOTP_STEP",
    "AdminPort",
    "AuthState",
    "ConnectorStatus",
    "FailureBudget",
    "LiveLog",
    "Principal",
    "build_admin",
    "hash_token",
    "make_auth",
    "make_editor",
    "mount_admin",
    "totp_code",
]
