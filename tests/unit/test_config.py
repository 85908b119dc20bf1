"""Golden config files: the valid one loads; each broken one fails with the right line and path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from gateway.config.loader import load_config, load_config_text
from gateway.config.models import current_secret, parse_duration, parse_size
from gateway.config.yamlsrc import ConfigError, interpolate

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "config"


def problems(name: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(str(SAMPLES / name), env={})
    return [f"{i.line}: {i.dotted}: {i.message}" for i in info.value.issues]


def test_valid_full_config_loads_with_defaults_and_env_default() -> None:
    cfg = load_config(str(SAMPLES / "valid_full.yaml"), env={})
    assert sorted(cfg.connectors) == ["api", "backend", "sink"]
    assert [r.name for r in cfg.router.routes] == ["orders", "everything-else"]
    api = cfg.connectors["api"]
    token = api.auth.tokens[0]  # type: ignore[attr-defined]
    assert isinstance(token, SecretStr) and token.get_secret_value() == "dev-token-123"
    assert "dev-token-123" not in repr(api)
    assert cfg.model.gateway.drain == 5.0
    assert cfg.model.gateway.unmatched == "dead_letter"
    assert cfg.connectors["sink"].max_bytes == 10 * 1024 * 1024  # type: ignore[attr-defined]
    orders = cfg.router.routes[0]
    assert orders.retry.attempts == 3 and orders.retry.initial == 0.5 and orders.retry.max == 60
    assert orders.mode == "spooled"
    assert len(cfg.version) == 12


def test_env_interpolation_reads_the_environment() -> None:
    cfg = load_config(str(SAMPLES / "valid_full.yaml"), env={"API_TOKEN": "from-env-token"})
    assert cfg.connectors["api"].auth.tokens[0].get_secret_value() == "from-env-token"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad_yaml.yaml", ["2: : YAML syntax error: "]),
        ("bad_unknown_key.yaml", ["5: routes[0].to: required key is missing",
                                  "7: routes[0].too: unknown key 'too' (did you mean 'to'?)"]),
        ("bad_unknown_connector.yaml",
         ["14: routes[2].to[0].connector: unknown connector 'opps' (did you mean 'ops'?)"]),
        ("bad_expression.yaml", ["8: routes[0].match.when: only these functions can be called",
                                 "13: routes[1].match.when: unknown name 'dta' (did you mean 'data'?)",
                                 "18: routes[2].match.when: syntax error"]),
        ("bad_template.yaml", ["9: routes[0].to[0].body: template syntax error: unexpected '}'"]),
        ("bad_kind_and_secret.yaml",
         ["2: connectors.q.type: unknown connector type 'mqttt' (did you mean 'mqtt'?)",
          "6: connectors.api.auth.tokens[0]: secrets are never written inline",
          "7: connectors.out.fsync: Input should be a valid boolean",
          "10: routes[0].from: unknown connector 'q'"]),
        ("bad_env.yaml", ["2: connectors.out.path: environment variable GATEWAY_TEST_UNSET_VAR is not set"]),
        ("bad_patterns.yaml", ["8: routes[0].match.subject: '**' must be a whole segment",
                               "10: routes[1].name: duplicate route name 'r0'",
                               "11: routes[1].from: connector 'out' (type file) cannot receive messages"]),
    ],
)
def test_broken_configs_name_line_path_and_problem(name: str, expected: list[str]) -> None:
    got = problems(name)
    assert len(got) == len(expected), got
    for want, have in zip(expected, got, strict=True):
        assert have.startswith(want), (want, have)


def test_errors_are_formatted_with_file_line_and_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(SAMPLES / "bad_unknown_connector.yaml"), env={})
    text = str(info.value)
    assert text.endswith("bad_unknown_connector.yaml:14: routes[2].to[0].connector: unknown connector 'opps' "
                         "(did you mean 'ops'?)")


def test_unknown_target_option_suggests_connector_and_core_keys() -> None:
    text = """
connectors:
  api: {type: rest, listen: "127.0.0.1:1", auth: {type: none}}
  out: {type: file, path: x}
routes:
  - name: r
    from: api
    to: [{connector: out, formt: body}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert "unknown key 'formt' (did you mean 'format'?)" in str(info.value)


def test_inbound_rest_requires_an_explicit_auth_choice() -> None:
    text = """
connectors:
  api: {type: rest, listen: "0.0.0.0:8080"}
routes: []
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert "needs 'auth'" in str(info.value)


def test_secret_from_file_reference(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-file-token\n")
    text = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:1", auth: {{type: bearer, tokens: [{{file: "{secret}"}}]}}}}
routes: []
"""
    cfg = load_config_text(text, env={})
    assert cfg.connectors["api"].auth.tokens[0].get_secret_value() == "s3cret-file-token"  # type: ignore[attr-defined]


def test_a_file_secret_is_read_again_for_its_current_value(tmp_path: Path) -> None:
    """What a connector logging in with a short-lived token sees when the file is renewed,
    emptied mid-replace or removed; and an environment secret, which cannot change."""
    secret = tmp_path / "token"
    secret.write_text("first-token\n")
    text = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:1", auth: {{type: bearer, tokens: [{{file: "{secret}"}}, "${{TOK}}"]}}}}
routes: []
"""
    from_file, from_env = load_config_text(text, env={"TOK": "env-token"}).connectors["api"].auth.tokens  # type: ignore[attr-defined]
    assert current_secret(from_file) == "first-token"
    secret.write_text("renewed-token\n")
    assert current_secret(from_file) == "renewed-token"
    secret.write_text("")
    assert current_secret(from_file) == "renewed-token"  # the last good value, not an empty one
    secret.unlink()
    assert current_secret(from_file) == "renewed-token"
    replacement = tmp_path / "token.new"  # renewed as a Kubernetes volume or a careful script does
    replacement.write_text("third-token\n")
    replacement.rename(secret)
    assert current_secret(from_file) == "third-token"
    assert from_file.get_secret_value() == "first-token"  # what the config was loaded with
    assert current_secret(from_env) == "env-token"
    assert "token" not in repr(from_file) and "token" not in str(from_file)


def test_empty_file_is_an_empty_config() -> None:
    cfg = load_config_text("", env={})
    assert cfg.connectors == {} and len(cfg.router) == 0


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("- a\n- b\n", env={})
    assert "top level must be a mapping" in str(info.value)


def test_duplicate_keys_are_reported() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("routes: []\nroutes: []\n", env={})
    assert info.value.issues[0].line == 2 and "duplicate key" in info.value.issues[0].message


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [("${A}", {"A": "1"}, "1"), ("x-${A:-d}-y", {}, "x-d-y"), ("$$5", {}, "$5"), ("${A:-}", {}, ""),
     ("plain", {}, "plain")],
)
def test_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


def test_interpolation_of_unset_variable_raises() -> None:
    with pytest.raises(KeyError):
        interpolate("${NOPE}", {})


@pytest.mark.parametrize(("value", "seconds"), [("500ms", 0.5), ("10s", 10), ("5m", 300), ("1h", 3600), (3, 3.0),
                                                 ("1.5", 1.5), ("2d", 172800)])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", -1, True, "m"])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(("value", "size"), [("64KiB", 65536), ("10MB", 10**7), (12, 12), ("1GiB", 1024**3)])
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value) == size


def test_empty_or_short_auth_tokens_are_refused() -> None:
    text = """
connectors:
  api: {type: rest, listen: "127.0.0.1:1", auth: {type: bearer, tokens: ["${API_TOKEN:-}"]}}
routes: []
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert "empty or shorter than 8 characters" in str(info.value)
