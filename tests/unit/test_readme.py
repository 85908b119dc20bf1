"""The routes.yaml examples in the README and in every page of the docs site (docs/) are real:
every block that declares connectors validates against the real connectors, with its secrets and
environment variables supplied. And every link inside the repository leads to a file and heading
that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import serialization
from markdown.extensions.toc import slugify

from connectors.smtp.users import hash_password
from gateway.config.loader import load_config_text
from tests.mailauth_support import pem, rsa_key

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
#: The README and every hand-written page of the site.
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))]
BLOCKS = [(page, b) for page in PAGES
          for b in re.findall(r"```yaml\n(.*?)```", (ROOT / page).read_text(), re.DOTALL) if "connectors:" in b]


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


def test_the_docs_have_the_examples_they_promise() -> None:
    assert len(BLOCKS) >= 12
    kinds = {k for _, b in BLOCKS for k in re.findall(r"type: ([a-z0-9]+)", b)}
    assert {"rest", "file", "mqtt", "amqp", "smtp", "maildir", "soap", "imap", "pop3", "xmpp"} <= kinds
    for kind in ("rest", "mqtt", "amqp", "smtp", "maildir", "soap", "imap", "pop3", "xmpp"):
        page = f"docs/connectors/{kind}.md"
        assert any(p == page and f"type: {kind}" in b for p, b in BLOCKS), f"{page} has no example that validates"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{page}-{i}" for i, (page, _) in enumerate(BLOCKS)])
def test_every_config_example_validates(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index][1]
    for name in set(re.findall(r"/run/secrets/([A-Za-z0-9._-]+)", block)):
        secret_file(tmp_path / name, name)
    text = block.replace("/run/secrets/", f"{tmp_path}/")
    cfg = load_config_text(text, env=env_for(block), base_dir=str(ROOT))
    assert cfg.connectors


def _github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _site_anchor(heading: str) -> str:
    """MkDocs' anchor for a heading (Python-Markdown's toc slugify)."""
    return slugify(heading.strip(), "-")


#: Pages the site builds from files elsewhere (docs/gen_reference.py's on_files).
GENERATED_PAGES = {"docs/deploy/helm-chart.md": ROOT / "helm/gateway/README.md"}


def _headings(text: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"^#+ (.+?)\s*$", text, re.MULTILINE)


def _page_text(path: Path) -> str:
    """A page as the site renders it: docs pages with their generated parts filled in."""
    text = path.read_text()
    if DOCS in path.parents:
        text = gen_reference().expand(text)
    return text


def gen_reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", [*PAGES, "helm/gateway/README.md"])
def test_every_link_inside_the_repository_leads_somewhere(doc: str) -> None:
    path = ROOT / doc
    in_site = DOCS in path.parents
    anchor = _site_anchor if in_site else _github_anchor
    text = _page_text(path)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if in_site and not linked.is_relative_to(DOCS):
            broken.append(f"{target} (outside docs/: not part of the site)")
            continue
        source = GENERATED_PAGES.get(str(linked.relative_to(ROOT)) if linked.is_relative_to(ROOT) else "", linked)
        if not source.exists():
            broken.append(target)
        elif fragment and fragment not in {anchor(h) for h in _headings(_page_text(source))}:
            broken.append(target)
    assert broken == []
