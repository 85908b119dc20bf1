"""Admin auth pieces: TOTP (RFC 6238 test vectors, pyotp as the reference), signed sessions, the
failed-attempt budget, live log."""

from __future__ import annotations

import base64
import time

import pyotp
import pytest

from gateway.admin import AuthState, FailureBudget, LiveLog, hash_token, totp_code
from gateway.admin import auth as admin_auth
from gateway.admin.auth import client_key
from gateway.config.loader import load_config_text
from gateway.config.models import AdminSettings, AdminToken
from gateway.config.yamlsrc import FromEnv
from gateway.contract import Outcome, Status
from gateway.envelope import Envelope

# RFC 6238 appendix B uses the ASCII key "12345678901234567890" with SHA-1 and 8 digits; the
# 6-digit codes are the last six digits of those values.
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()
RFC_VECTORS = {59: "94287082", 1111111109: "07081804", 1111111111: "14050471", 1234567890: "89005924",
               2000000000: "69279037", 20000000000: "65353130"}


def test_totp_matches_the_rfc_6238_vectors() -> None:
    for t, code in RFC_VECTORS.items():
        assert totp_code(RFC_SECRET, t // 30) == code[-6:]


def test_totp_matches_pyotp_for_random_secrets() -> None:
    for _ in range(20):
        secret = pyotp.random_base32()
        now = time.time()
        assert totp_code(secret, int(now // 30)) == pyotp.TOTP(secret).at(now)


def test_totp_accepts_a_code_once_and_neighbouring_steps_only() -> None:
    secret = pyotp.random_base32()
    state = AuthState()
    now = 1_700_000_000.0
    code = pyotp.TOTP(secret).at(now)
    assert state.verify_totp("alice", secret, code, now=now)
    assert not state.verify_totp("alice", secret, code, now=now), "a replayed code must be refused"
    assert state.verify_totp("alice", secret, pyotp.TOTP(secret).at(now + 30), now=now)
    assert not state.verify_totp("bob", secret, pyotp.TOTP(secret).at(now + 90), now=now)
    assert not state.verify_totp("bob", secret, "12345", now=now)
    assert not state.verify_totp("bob", secret, "abcdef", now=now)
    assert not state.verify_totp("bob", "not base32!", "123456", now=now)


CONFIG = """
connectors:
  api: {type: rest, listen: "127.0.0.1:18080", auth: {type: none}}
  out: {type: file, path: var/out.jsonl}
  console: {type: log}
routes:
  - name: json-to-file
    from: api
    match: {when: "data.n > 1"}
    to: [{connector: out}, {connector: console}]
"""


def test_live_log_records_route_targets_version_and_text_samples() -> None:
    cfg = load_config_text(CONFIG, env={})
    live = LiveLog(per_route=2, samples=2, max_sample=100)
    for n in range(3):
        env = Envelope(source="api", protocol="rest", subject=f"/x/{n}", body=f'{{"n": {n + 2}}}'.encode(),
                       content_type="application/json")
        live.record(env, cfg.router.select(env), cfg.version, Outcome.accepted(env.id))
    unmatched = Envelope(source="api", protocol="rest", subject="/y", body=b'{"n": 0}', content_type="application/json")
    live.record(unmatched, cfg.router.select(unmatched), cfg.version, Outcome.rejected(unmatched.id, "no route", 404))
    binary = Envelope(source="api", protocol="rest", subject="/z", body=b"\xff\xfe", content_type="application/x")
    live.record(binary, [], cfg.version, Outcome(Status.DROPPED, binary.id))
    recent = live.recent()
    assert [m["subject"] for m in recent["json-to-file"]] == ["/x/2", "/x/1"]
    assert recent["json-to-file"][0]["targets"] == ["out", "console"]
    assert recent["json-to-file"][0]["version"] == cfg.version
    assert [m["outcome"] for m in recent[""]] == ["dropped", "rejected"]  # newest first
    assert live.sample(unmatched.id) == {"source": "api", "subject": "/y", "content_type": "application/json",
                                         "headers": {}, "body": '{"n": 0}'}
    assert live.sample(binary.id) is None
    assert len(live._samples) == 2


KEY = "k" * 32


def admin(*tokens: AdminToken, key: str | None = KEY, ttl: float = 3600) -> AdminSettings:
    secret = FromEnv(key) if key is not None else None  # as ``session_key: "${ADMIN_SESSION_KEY}"`` loads
    return AdminSettings.model_validate({"tokens": list(tokens), "session_key": secret, "session_ttl": ttl})


ALICE = AdminToken(name="alice", sha256=hash_token("alice-token"), role="editor")
VICTOR = AdminToken(name="victor", sha256=hash_token("victor-token"), role="viewer")


def test_a_session_is_accepted_by_any_replica_with_the_same_key_and_tokens() -> None:
    here, there = AuthState(), AuthState()
    cfg = admin(ALICE, VICTOR)
    session = here.create(cfg, ALICE, "editor")
    assert session.startswith("gws_")
    for replica in (here, there):
        p = replica.verify(cfg, session)
        assert p is not None and (p.name, p.role, p.via) == ("alice", "editor", "session")
    assert there.verify(admin(ALICE, VICTOR, key="x" * 32), session) is None, "another key, another cluster"
    # Without a configured key each process signs with its own.
    solo = admin(ALICE, key=None)
    assert here.verify(solo, here.create(solo, ALICE, "editor")) is not None
    assert there.verify(solo, here.create(solo, ALICE, "editor")) is None


def test_a_session_ends_when_its_token_is_rotated_removed_or_given_a_second_factor() -> None:
    state = AuthState()
    session = state.create(admin(ALICE, VICTOR), ALICE, "editor")
    rotated = ALICE.model_copy(update={"sha256": hash_token("alice-new-token")})
    assert state.verify(admin(rotated, VICTOR), session) is None, "the token's secret changed"
    assert state.verify(admin(VICTOR), session) is None, "the token was removed"
    with_code = AdminToken.model_validate({"name": "alice", "sha256": ALICE.sha256, "role": "editor",
                                           "totp": FromEnv("JBSWY3DPEHPK3PXP")})
    assert state.verify(admin(with_code, VICTOR), session) is None, "a second factor was added"
    # The same name and secret under another role: the session follows the lower role.
    as_viewer = ALICE.model_copy(update={"role": "viewer"})
    p = state.verify(admin(as_viewer, VICTOR), session)
    assert p is not None and p.role == "viewer"


def test_a_session_cannot_be_altered_and_ends_at_its_expiry() -> None:
    state = AuthState()
    cfg = admin(ALICE, VICTOR, ttl=60)
    now = 1_700_000_000.0
    viewer_session = state.create(cfg, VICTOR, "viewer", now=now)
    claims_b64, _, mac = viewer_session[len("gws_"):].partition(".")
    claims = base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4))
    forged = claims.replace(b'"r":"viewer"', b'"r":"editor"').replace(b'"n":"victor"', b'"n":"alice"')
    forged_b64 = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
    assert state.verify(cfg, f"gws_{forged_b64}.{mac}", now=now) is None
    for junk in ("gws_", "gws_x.y", "gws_" + "A" * 5000, f"gws_{claims_b64}", f"gws_{claims_b64}.{mac}x"):
        assert state.verify(cfg, junk, now=now) is None
    assert state.verify(cfg, viewer_session, now=now + 59) is not None
    assert state.verify(cfg, viewer_session, now=now + 61) is None


def test_logout_ends_the_session_without_unbounded_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    state = AuthState()
    cfg = admin(ALICE, VICTOR)
    kept = state.create(cfg, ALICE, "editor")
    ended = state.create(cfg, ALICE, "editor")
    p = state.verify(cfg, ended)
    assert p is not None and p.session is not None
    state.log_out(p.session)
    assert state.verify(cfg, ended) is None
    assert state.verify(cfg, kept) is not None, "other sessions of the same token go on"
    # Past the limit, a logout ends every earlier session of its token, never none.
    monkeypatch.setattr(admin_auth, "MAX_LOGGED_OUT", 3)
    sessions = [state.create(cfg, VICTOR, "viewer", now=time.time() + i) for i in range(4)]
    for s in sessions:
        p = state.verify(cfg, s)
        assert p is not None and p.session is not None
        state.log_out(p.session)
    assert all(state.verify(cfg, s) is None for s in sessions)
    assert len(state.logged_out) <= 3
    assert state.verify(cfg, kept) is not None


def test_failed_attempts_have_a_budget_per_address_with_a_back_off() -> None:
    budget = FailureBudget()
    now = 1_700_000_000.0
    for _ in range(19):
        budget.failed("10.0.0.1", now=now)
    assert budget.retry_after("10.0.0.1", now=now) == 0
    budget.failed("10.0.0.1", now=now)
    assert budget.retry_after("10.0.0.1", now=now) == pytest.approx(1.0)
    assert budget.retry_after("10.0.0.2", now=now) == 0, "one address cannot lock the others out"
    # Failures that go on as soon as the wait ends: the wait doubles, up to five minutes.
    waits = []
    for _ in range(12):
        now += budget.retry_after("10.0.0.1", now=now)
        budget.failed("10.0.0.1", now=now)
        waits.append(budget.retry_after("10.0.0.1", now=now))
    assert waits[:4] == [2.0, 4.0, 8.0, 16.0] and waits[-1] == 300.0
    # A quiet minute after the wait restores the whole allowance.
    now += budget.retry_after("10.0.0.1", now=now) + 61
    for _ in range(19):
        budget.failed("10.0.0.1", now=now)
    assert budget.retry_after("10.0.0.1", now=now) == 0


def test_the_budget_table_is_bounded_and_ipv6_counts_by_prefix() -> None:
    budget = FailureBudget(max_clients=100)
    for i in range(1005):
        budget.failed(f"c{i}")
    assert len(budget) == 100
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:10.0.0.1") == client_key("10.0.0.1") == "10.0.0.1"
    assert client_key(None) == ""


def test_session_settings_are_checked_at_load() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        admin(key="short")
    assert AdminSettings.model_validate({"session_ttl": "15m"}).session_ttl == 900.0
    with pytest.raises(ValueError):
        AdminSettings.model_validate({"session_ttl": 0})
