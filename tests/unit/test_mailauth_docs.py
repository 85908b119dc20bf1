"""The routes.yaml examples in docs/mailauth.md validate, with the settings mixed into the smtp
connector's config the way docs/mailauth.md tells connector authors to (until the smtp connector
carries them itself)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.mailauth import AuthCheckSettings, SealOptions, SealSettings
from connectors.smtp import SmtpConfig, SmtpConnector, SmtpTarget
from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.registry import Registry
from tests.mailauth_support import pem, rsa_key

DOC = Path(__file__).resolve().parents[2] / "docs" / "mailauth.md"


class WiredSmtpConfig(SmtpConfig, AuthCheckSettings, SealSettings):
    pass


class WiredSmtpTarget(SmtpTarget):
    seal: SealOptions | None = None


class WiredSmtp(SmtpConnector):
    Config = WiredSmtpConfig
    Options = WiredSmtpTarget


def examples() -> list[str]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.DOTALL)
    return [b for b in blocks if "connectors:" in b]


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    (tmp_path / "dkim.pem").write_text(pem(rsa_key()))
    encrypted = rsa_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.BestAvailableEncryption(b"pw"))
    (tmp_path / "smime-key.pem").write_bytes(encrypted)
    (tmp_path / "pgp-keys.asc").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    return tmp_path


def load(text: str, secrets_dir: Path) -> object:
    text = text.replace("/run/secrets/", f"{secrets_dir}/")
    env = {"SMTP_PASSWORD": "x", "SMIME_KEY_PASSWORD": "pw", "PGP_PASSPHRASE": "p"}
    return load_config_text(text, registry=Registry({"smtp": WiredSmtp}), env=env)


def test_the_doc_has_an_inbound_and_an_outbound_example() -> None:
    found = examples()
    assert len(found) == 2
    assert "auth_check:" in found[0] and "seal:" in found[1]


@pytest.mark.parametrize("index", [0, 1])
def test_doc_example_validates(index: int, secrets_dir: Path) -> None:
    cfg = load(examples()[index], secrets_dir)
    assert cfg.connectors  # type: ignore[attr-defined]


def test_doc_example_errors_name_the_field(secrets_dir: Path) -> None:
    broken = examples()[0].replace("policy: reject", "policy: bounce")
    with pytest.raises(ConfigError) as err:
        load(broken, secrets_dir)
    assert "auth_check.policy" in str(err.value)
    wrong = examples()[1].replace('key_password: "${SMIME_KEY_PASSWORD}"', 'key_password: "${PGP_PASSPHRASE}"')
    with pytest.raises(ConfigError, match="not a readable PEM private key"):
        load(wrong, secrets_dir)
