"""`gateway schema` describes what `gateway validate` accepts: every routes.yaml in the repository
(the root one, deploy/, the chart's values and CI values, the README's examples) passes the
schema, and configs the validator refuses for a reason a schema can see fail the schema too."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.registry import Registry
from gateway.schema import build_schema

ROOT = Path(__file__).resolve().parents[2]


def _configs() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for path in [ROOT / "routes.yaml", *sorted((ROOT / "deploy").rglob("*.y*ml")),
                 *sorted((ROOT / "examples").rglob("*.y*ml")),
                 *sorted((ROOT / "tests/samples/config").glob("valid*.yaml"))]:
        data = yaml.safe_load(path.read_text())
        if isinstance(data, dict) and "connectors" in data:
            found.append((str(path.relative_to(ROOT)), data))
    for path in [ROOT / "helm/gateway/values.yaml", *sorted((ROOT / "helm/gateway/ci").glob("*.yaml"))]:
        routes = ((yaml.safe_load(path.read_text()) or {}).get("config") or {}).get("routes")
        if isinstance(routes, str):
            found.append((f"{path.relative_to(ROOT)}: config.routes", yaml.safe_load(routes)))
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(re.findall(r"```ya?ml\n(.*?)```", doc.read_text(), re.S)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "connectors" in data:
                found.append((f"{doc.relative_to(ROOT)} yaml block {i}", data))
    return found


CONFIGS = _configs()


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = build_schema(Registry())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_repository_has_the_configs_this_test_reads() -> None:
    names = [name for name, _ in CONFIGS]
    assert "routes.yaml" in names and "deploy/compose/gateway/routes.yaml" in names
    assert "helm/gateway/values.yaml: config.routes" in names
    assert sum(name.startswith(("README.md", "docs/")) for name in names) >= 5


@pytest.mark.parametrize(("name", "data"), CONFIGS, ids=[name for name, _ in CONFIGS])
def test_every_config_in_the_repository_passes_the_schema(
    name: str, data: Any, validator: jsonschema.Draft202012Validator,
) -> None:
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
    assert errors == [], name


VALID_SPELLINGS = """\
gateway:
  drain: 10s
  spool: {min_free_bytes: 10MiB}
connectors:
  api: {type: rest, listen: "127.0.0.1:8080", auth: {type: bearer, tokens: [{file: %(secret)s}]}}
  out: {type: file, path: out.jsonl, max_bytes: 64KiB}
routes:
  - name: r
    from: api
    timeout: 1500ms
    dedupe: {window: 5m}
    throttle: {limit: 2, window: 1h, then: digest}
    digest: {window: 1d}
    on_failure: {retry: {initial: 0.5, max: 1m, max_age: 2h}}
    to: [{connector: out}]
"""


def test_durations_sizes_and_secret_files_are_written_as_the_validator_reads_them(
    tmp_path: Path, validator: jsonschema.Draft202012Validator,
) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-token-0123\n")
    text = VALID_SPELLINGS % {"secret": secret}
    load_config_text(text, base_dir=str(tmp_path))  # the validator accepts it ...
    assert [e.message for e in validator.iter_errors(yaml.safe_load(text))] == []  # ... and so does the schema


BASE = {"connectors": {"api": {"type": "rest", "listen": "127.0.0.1:8080", "auth": {"type": "none"}},
                       "out": {"type": "file", "path": "out.jsonl"}},
        "routes": [{"name": "r", "from": "api", "to": [{"connector": "out"}]}]}
INVALID = {
    "unknown top-level key": {"extra": 1},
    "unknown route key": {"routes": [{"name": "r", "from": "api", "to": [{"connector": "out"}], "fro": "x"}]},
    "duration without a number": {"gateway": {"drain": "soon"}},
    "negative duration": {"gateway": {"drain": -1}},
    "duration in weeks": {"routes": [{"name": "r", "from": "api", "to": [{"connector": "out"}],
                                      "dedupe": {"window": "2w"}}]},
    "size in parsecs": {"connectors": {**BASE["connectors"], "out": {"type": "file", "path": "o", "max_bytes": "3pc"}}},
    "inline secret": {"connectors": {**BASE["connectors"],
                                     "api": {"type": "rest", "listen": "127.0.0.1:8080",
                                             "auth": {"type": "bearer", "tokens": [{"value": "x"}]}}}},
    "secret file with extra keys": {"connectors": {
        **BASE["connectors"],
        "api": {"type": "rest", "listen": "127.0.0.1:8080",
                "auth": {"type": "bearer", "tokens": [{"file": "/t", "mode": 1}]}},
    }},
    "connector of no known kind": {"connectors": {**BASE["connectors"], "x": {"type": "carrier-pigeon"}}},
    "route without targets": {"routes": [{"name": "r", "from": "api", "to": []}]},
    "route name with spaces": {"routes": [{"name": "my route", "from": "api", "to": [{"connector": "out"}]}]},
    "throttle limit zero": {"routes": [{"name": "r", "from": "api", "to": [{"connector": "out"}],
                                        "throttle": {"limit": 0}}]},
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_configs_the_schema_can_judge_are_refused_by_both(
    case: str, validator: jsonschema.Draft202012Validator,
) -> None:
    data = {**BASE, **INVALID[case]}
    with pytest.raises(ConfigError):
        load_config_text(yaml.safe_dump(data))
    assert list(validator.iter_errors(data)), f"the schema accepts {case}"
