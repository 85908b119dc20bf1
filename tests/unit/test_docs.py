"""The docs site: it builds with `mkdocs build --strict` (what `make docs` runs), every connector
kind has a page that lists every option its config models have, and what is written by hand
beside the generated tables names only keys that exist.

The routes.yaml examples and the links of every page are checked in test_readme.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.registry import Registry
from tests.unit.test_readme import DOCS, ROOT, gen_reference

GEN = gen_reference()
KINDS = Registry().kinds()


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links and anchors, pages missing from the nav and generator errors all fail it."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    built = tmp_path / "site"
    assert (built / "index.html").exists()
    for kind in KINDS:
        html = (built / "connectors" / kind / "index.html").read_text()
        assert 'id="connector-options"' in html and "<!-- generated:" not in html


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in _nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    return []


def _option_names(model: type) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
def test_every_connector_kind_has_a_page_with_every_option(kind: str) -> None:
    page = DOCS / "connectors" / f"{kind}.md"
    assert page.exists(), f"no page for connector kind {kind!r}: add docs/connectors/{kind}.md"
    text = page.read_text()
    assert f"<!-- generated: connector {kind} -->" in text, f"{page.name} lacks its generated reference"
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert f"connectors/{kind}.md" in _nav_pages(config["nav"]), f"{page.name} is not in the nav"
    rendered = GEN.expand(text)
    cls = Registry().get(kind)
    missing = [name for name in _option_names(cls.Config) - {"type"} if f"| `{name}` |" not in rendered]
    missing += [f"target {name}" for name in _option_names(cls.Options) - set(GEN.CORE_TARGET_KEYS)
                if f"| `{name}` |" not in rendered]
    assert missing == []
    assert f"# {kind}\n" in text.split("\n", 1)[0] + "\n", f"{page.name} should open with '# {kind}'"


def _generated_keys(table: str) -> set[str]:
    return set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))


def _hand_written_keys(text: str, heading: str) -> list[str]:
    """The first column of the first table after ``heading``: each cell's `key`s."""
    section = text[text.index(heading):]
    rows = re.findall(r"^\| (.+?) \|", section[section.index("\n|"):].split("\n\n", 1)[0], re.MULTILINE)
    return [key for cell in rows[2:] for key in re.findall(r"`([^`]+)`", cell)]


def test_the_hand_written_gateway_settings_name_only_real_keys() -> None:
    text = (DOCS / "routes-yaml.md").read_text()
    assert "<!-- generated: gateway-settings -->" in text
    real = _generated_keys(GEN.gateway_settings())
    named = _hand_written_keys(text, "What they mean:")
    assert len(named) >= 15
    assert [key for key in named if key not in real] == []
    top = {key.split(".")[0] for key in real}
    assert top <= {key.split(".")[0] for key in named}, "a gateway: setting has no meaning written for it"


def test_the_generated_reference_covers_the_schema_gateway_schema_prints() -> None:
    schema = GEN.schema()
    gateway = schema["$defs"]["GatewaySettings"]["properties"]
    assert set(gateway) <= _generated_keys(GEN.gateway_settings())
    route = schema["$defs"]["RouteConfig"]["properties"]
    assert set(route) <= _generated_keys(GEN.route_keys())
    kinds = GEN.connector_kinds()
    assert all(f"[`{kind}`]({kind}.md)" in kinds for kind in KINDS)


def test_the_getting_started_page_is_the_readme_walkthrough() -> None:
    page = GEN.expand((DOCS / "getting-started.md").read_text())
    readme = (ROOT / "README.md").read_text()
    walkthrough = readme[readme.index("## Walkthrough"):readme.index("## Read on")]
    assert walkthrough.strip().replace("](docs/", "](") in page
