"""The README's routes.yaml examples are real: every block that declares connectors validates
against the real connectors, with its secrets and environment variables supplied."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from connectors.smtp.users import hash_password
from gateway.config.loader import load_config_text
from tests.mailauth_support import pem, rsa_key

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = [b for b in re.findall(r"```yaml\n(.*?)```", README, re.DOTALL) if "connectors:" in b]


def secret_file(path: Path, name: str) -> None:
    if "users" in name:
        path.write_text(f"alice:{hash_password('correct horse', rounds=1000)}\n")
    elif "smime" in name:
        key = rsa_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"dummy-secret-value"))
        path.write_bytes(key)
    elif name.endswith(".pem"):
        path.write_text(pem(rsa_key()))
    elif name.endswith(".asc"):
        path.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    else:
        path.write_text("dummy-secret-value\n")


def env_for(block: str) -> dict[str, str]:
    env = {}
    for name in set(re.findall(r"\$\{([A-Z0-9_]+)[:}]", block)):
        if name.endswith("_TOTP"):
            env[name] = "JBSWY3DPEHPK3PXP"
        elif name.endswith("_URL"):
            env[name] = "amqp://guest:guest@127.0.0.1:5672/"
        else:
            env[name] = "dummy-secret-value"
    return env


def test_the_readme_has_the_examples_it_promises() -> None:
    assert len(BLOCKS) >= 12
    kinds = {k for b in BLOCKS for k in re.findall(r"type: ([a-z0-9]+)", b)}
    assert {"rest", "file", "mqtt", "amqp", "smtp", "maildir", "soap", "imap", "pop3", "xmpp"} <= kinds


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_readme_config_example_validates(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index]
    for name in set(re.findall(r"/run/secrets/([A-Za-z0-9._-]+)", block)):
        secret_file(tmp_path / name, name)
    text = block.replace("/run/secrets/", f"{tmp_path}/")
    cfg = load_config_text(text, env=env_for(block), base_dir=str(ROOT))
    assert cfg.connectors


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "helm/gateway/README.md"])
def test_every_link_inside_the_repository_leads_somewhere(doc: str) -> None:
    path = ROOT / doc
    text = path.read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, fragment = target.partition("#")
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
        elif not file_part and fragment not in anchors:
            broken.append(target)
    assert broken == []
