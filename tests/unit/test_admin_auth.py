"""Admin auth pieces: TOTP (RFC 6238 test vectors, pyotp as the reference), sessions, live log."""

from __future__ import annotations

import base64
import time

import pyotp

from gateway.admin import AuthState, LiveLog, totp_code
from gateway.config.loader import load_config_text
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


def test_sessions_expire_and_are_stored_hashed() -> None:
    state = AuthState()
    token = state.create("alice", "editor")
    assert token.startswith("gws_")
    assert token not in state.sessions
    session = state.lookup(token)
    assert session is not None and session.name == "alice" and session.role == "editor"
    assert state.lookup(token + "x") is None
    session.expires = time.time() - 1
    assert state.lookup(token) is None


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


def test_failed_logins_are_throttled_per_client() -> None:
    state = AuthState()
    for _ in range(19):
        state.failed("10.0.0.1")
    assert not state.throttled("10.0.0.1")
    state.failed("10.0.0.1")
    assert state.throttled("10.0.0.1")
    assert not state.throttled("10.0.0.2"), "one client cannot lock the others out"
    state.failures["10.0.0.1"][0] -= 61
    assert not state.throttled("10.0.0.1")
    for i in range(1005):
        state.failed(f"c{i}")
    assert len(state.failures) <= 1000
