"""Pure tests for the smtp connector: config rules (no open relay, AUTH only over TLS, secrets by
reference), the recipient policy, the password file, and the outcome → SMTP reply mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.smtp.config import SmtpConfig
from connectors.smtp.listener import reply_for
from connectors.smtp.users import Users, hash_password
from gateway.config.yamlsrc import FromEnv
from gateway.contract import Outcome, Status

ROOT = Path(__file__).resolve().parents[2]


def config(**kw: Any) -> SmtpConfig:
    return SmtpConfig.model_validate({"type": "smtp", **kw})


def users_secret(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "users"
    path.write_text(text)
    return {"file": str(path)}


TLS = {"cert": "/x/cert.pem", "key": "/x/key.pem"}


# --- config ----------------------------------------------------------------------------


def test_inbound_defaults() -> None:
    cfg = config(listen="127.0.0.1", recipients=["Example.COM"])
    assert cfg.listen == "127.0.0.1:2525"
    assert cfg.recipients == ["example.com"]
    assert cfg.inbound_starttls == "off"
    assert cfg.max_message_size == 10 * 1024 * 1024
    assert config(listen="[::1]:25", recipients=["x.org"], tls=TLS).inbound_starttls == "optional"


@pytest.mark.parametrize("kw,message", [
    ({}, "needs 'listen'"),
    ({"listen": "127.0.0.1:2525"}, "needs 'recipients'"),
    ({"listen": "127.0.0.1:99999", "recipients": ["x.org"]}, "host:port"),
    ({"listen": "127.0.0.1:2525", "recipients": ["a@b@c"]}, "not a domain or an address"),
    ({"listen": "127.0.0.1:2525", "recipients": ["x.org"], "starttls": "required"}, "TLS needs 'tls"),
    ({"listen": "127.0.0.1:2525", "recipients": ["x.org"], "implicit_tls": True}, "TLS needs 'tls"),
    ({"listen": "127.0.0.1:2525", "recipients": ["x.org"], "implicit_tls": True, "tls": TLS, "starttls": "optional"},
     "exclude each other"),
    ({"url": "http://relay:25"}, "smtp://host"),
    ({"url": "smtp://user:pw@relay:587"}, "credentials never go in the url"),
    ({"url": "smtp://relay:587/path"}, "path"),
    ({"url": "smtps://relay:465", "starttls": "required"}, "starttls does not apply"),
    ({"url": "smtp://relay:587", "username": "u"}, "go together"),
    ({"url": "smtp://relay:25", "starttls": "optional", "username": "u", "password": FromEnv("pw")},
     "only sent over TLS"),
    ({"url": "smtp://relay:25", "sender": "a@x.org, b@x.org"}, "exactly one"),
])
def test_invalid_configs(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**kw)


def test_users_need_tls(tmp_path: Path) -> None:
    users = users_secret(tmp_path, f"alice:{hash_password('pw', rounds=1000)}\n")
    base = {"listen": "127.0.0.1:2525", "recipients": ["x.org"], "users": users}
    with pytest.raises(ValidationError, match="'users' needs TLS"):
        config(**base)
    with pytest.raises(ValidationError, match="'users' needs TLS"):
        config(**base, tls=TLS, starttls="off")
    assert config(**base, tls=TLS).inbound_starttls == "optional"
    assert config(**base, tls=TLS, implicit_tls=True).inbound_starttls == "off"


def test_secrets_are_never_inline() -> None:
    with pytest.raises(ValidationError, match="never written inline"):
        config(url="smtps://relay:465", username="u", password="plain-text")
    with pytest.raises(ValidationError, match="never written inline"):
        config(listen="127.0.0.1:2525", recipients=["x.org"], tls=TLS, users="alice:$pbkdf2-sha256$...")


def test_outbound_defaults_to_required_starttls_and_hides_the_password() -> None:
    cfg = config(url="smtp://relay.example:587", username="u", password=FromEnv("s3cret"))
    assert cfg.outbound_starttls == "required"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())
    assert config(url="smtps://relay.example").outbound_starttls == "off"


@pytest.mark.parametrize("address,accepted", [
    ("ops@example.com", True),
    ("OPS@Example.Com", True),
    ("anyone@example.com", True),
    ("x@sub.example.com", False),
    ("x@alerts.example.org", True),
    ("x@deep.alerts.example.org", True),
    ("boss@example.net", True),
    ("other@example.net", False),
    ("alert-7@plant.example", True),
    ("report@plant.example", False),
    ("evil.com@example.com", True),       # a local part, not a route
    ("x%evil.com@example.com", False),    # %-hack relay trick
    ("evil.com!x@example.com", False),    # bang path
    ("postmaster", False),
    ("x@evil.com", False),
])
def test_recipient_policy(address: str, accepted: bool) -> None:
    cfg = config(listen="127.0.0.1:2525",
                 recipients=["example.com", "*.alerts.example.org", "alerts.example.org", "boss@example.net",
                             "alert-*@plant.example"])
    assert cfg.accepts(address) is accepted


# --- password file -----------------------------------------------------------------------


def test_password_file_roundtrip() -> None:
    users = Users.parse(f"# ops team\nalice:{hash_password('correct horse', rounds=1000)}\n\n"
                        f"bob:{hash_password('battery', rounds=1500)}\n")
    assert len(users) == 2
    assert users.verify(b"alice", b"correct horse")
    assert users.verify("bob", b"battery")
    assert not users.verify(b"alice", b"battery")
    assert not users.verify(b"mallory", b"correct horse")
    assert not users.verify(b"", b"")


@pytest.mark.parametrize("text,message", [
    ("alice:secret\n", "line 1: expected"),
    ("# c\nalice:$pbkdf2-sha256$10$c2FsdHNhbHQ$ZGlnZXN0ZGlnZXN0ZGlnZXN0\n", "line 2: 10 rounds is below"),
    ("alice:$pbkdf2-sha256$1000$c2$ZGlnZXN0ZGlnZXN0ZGlnZXN0\n", "too short"),
    ("\n# nobody\n", "no users"),
])
def test_password_file_errors_name_the_line_not_the_content(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        Users.parse(text)
    assert "secret" not in str(info.value) and "ZGln" not in str(info.value)


def test_passlib_format_vector() -> None:
    # passlib.hash.pbkdf2_sha256.hash("password", rounds=1000, salt=b"saltsalt"), computed independently
    import base64
    import hashlib
    digest = hashlib.pbkdf2_hmac("sha256", b"password", b"saltsalt", 1000, dklen=32)
    ab64 = base64.b64encode(digest).decode().rstrip("=").replace("+", ".")
    line = f"u:$pbkdf2-sha256$1000$c2FsdHNhbHQ${ab64}"
    assert hash_password("password", rounds=1000, salt=b"saltsalt") == line[2:]
    assert Users.parse(line).verify(b"u", b"password")


def test_hash_password_tool_reads_stdin() -> None:
    out = subprocess.run([sys.executable, "-m", "connectors.smtp", "hash-password", "alice"], input="s3cret pw\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True).stdout.strip()
    assert out.startswith("alice:$pbkdf2-sha256$600000$") and "s3cret" not in out
    assert Users.parse(out).verify(b"alice", b"s3cret pw")
    bad = subprocess.run([sys.executable, "-m", "connectors.smtp", "hash-password"], input="\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert bad.returncode == 1 and "empty password" in bad.stderr


# --- outcome → reply -----------------------------------------------------------------------


A = Outcome.accepted("A")
D = Outcome(Status.DEAD_LETTERED, "D", reason="template failed")
X = Outcome(Status.DROPPED, "X")
R = Outcome.retry("R", "spool full: /var/lib/secret-path")
J404 = Outcome.rejected("J", "no route matches this message", code=404)
J413 = Outcome.rejected("J", "too big", code=413)
J422 = Outcome.rejected("J", "route 'x' needs the parsed body: invalid JSON", code=422)
JX = Outcome.rejected("J", "POST http://10.1.2.3/internal: HTTP 400", code=None)


@pytest.mark.parametrize("outcomes,reply", [
    ([A], "250 2.0.0 OK: queued as A"),
    ([A, D, X], "250 2.0.0 OK: queued as A D X"),
    ([R], "451 4.3.0 Temporary failure, try again later (R)"),
    ([A, R], "451 4.3.0 Temporary failure, try again later (A R)"),
    ([J404, R], "451 4.3.0 Temporary failure, try again later (J R)"),
    ([J404], "550 5.1.1 No route accepts this recipient (J)"),
    ([A, J404], "550 5.1.1 No route accepts this recipient (A J)"),
    ([J413], "552 5.3.4 Message too big for its route (J)"),
    ([J422], "554 5.6.0 Message content refused (J)"),
    ([JX], "554 5.7.0 Message refused (J)"),
])
def test_reply_for_outcomes(outcomes: list[Outcome], reply: str) -> None:
    text = reply_for(outcomes)
    assert text == reply
    assert "secret-path" not in text and "10.1.2.3" not in text  # reasons stay in the log
