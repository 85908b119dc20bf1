"""The routes.yaml examples in the docs' mail authenticity section (docs/security.md) validate against
the real connectors (smtp, imap, file…), and their errors name the field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.smtp import SmtpConnector
from gateway.config.loader import LoadedConfig, load_config_text
from gateway.config.yamlsrc import ConfigError
from tests.mailauth_support import pem, rsa_key

PAGE = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def section() -> str:
    text = PAGE.read_text()
    start = text.index("## Mail authenticity and encryption")
    return text[start:text.index("\n## ", start + 10)]


def examples() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", section(), re.DOTALL)
    return [b for b in blocks if "connectors:" in b]


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    (tmp_path / "dkim.pem").write_text(pem(rsa_key()))
    encrypted = rsa_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "smime-key.pem").write_bytes(encrypted)
    (tmp_path / "pgp-keys.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    return tmp_path


def load(text: str, secrets_dir: Path) -> LoadedConfig:
    text = text.replace("/run/secrets/", f"{secrets_dir}/")
    env = {"SMTP_PASSWORD": "x", "SMIME_KEY_PASSWORD": "pw", "PGP_PASSPHRASE": "p", "IMAP_PASSWORD": "i"}
    return load_config_text(text, env=env)


def test_the_doc_has_inbound_outbound_and_by_hand_examples() -> None:
    found = examples()
    assert len(found) == 4
    smtp_in, imap_in, outbound, by_hand = found
    assert "auth_check:" in smtp_in and "type: smtp" in smtp_in
    assert "auth_check:" in imap_in and "type: imap" in imap_in
    assert "seal:" in outbound and "dkim:" in outbound
    assert "auth_check:" in by_hand and "127.0.0.1:5353" in by_hand


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_doc_example_validates_with_the_real_connectors(index: int, secrets_dir: Path) -> None:
    cfg = load(examples()[index], secrets_dir)
    assert cfg.connectors


def test_the_wired_settings_are_where_the_doc_says(secrets_dir: Path) -> None:
    inbound = load(examples()[0], secrets_dir)
    mx = inbound.connectors["mx"]
    assert inbound.kinds["mx"] is SmtpConnector
    assert mx.auth_check is not None and mx.auth_check.policy == "reject"  # type: ignore[attr-defined]
    outbound = load(examples()[2], secrets_dir)
    assert outbound.connectors["ops"].dkim is not None  # type: ignore[attr-defined]
    assert outbound.connectors["ops-pgp"].pgp is not None  # type: ignore[attr-defined]
    route = outbound.router.route_named("payroll-alerts")
    assert route is not None and route.targets[0].options.seal.encrypt is True  # type: ignore[attr-defined]


def test_doc_example_errors_name_the_field(secrets_dir: Path) -> None:
    broken = examples()[0].replace("policy: reject", "policy: bounce")
    with pytest.raises(ConfigError) as err:
        load(broken, secrets_dir)
    assert "auth_check.policy" in str(err.value)
    wrong = examples()[2].replace('key_password: "${SMIME_KEY_PASSWORD}"', 'key_password: "${PGP_PASSPHRASE}"')
    with pytest.raises(ConfigError, match="not a readable PEM private key"):
        load(wrong, secrets_dir)
    no_url = examples()[2].replace('    url: "smtp://relay.example.com:587"\n', '    listen: "127.0.0.1:2525"\n'
                                   '    recipients: [gw.example.com]\n', 1)
    with pytest.raises(ConfigError, match="dkim, smime and pgp seal mail this connector sends: they need 'url'"):
        load(no_url, secrets_dir)
