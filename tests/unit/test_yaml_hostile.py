"""Hostile routes.yaml text: every YAML construct loads or is a line-numbered issue, aliases have a
budget, a syntax error names the broken line, and loading keeps no state between loads."""

from __future__ import annotations

import gc
import string
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import MAX_NODES, ConfigError, load_data, load_file, load_text

ROUTES = """\
connectors:
  api: {type: rest, listen: "127.0.0.1:18080", auth: {type: none}, endpoints: [{path: "/in/**"}]}
  out: {type: file, path: /tmp/out.jsonl}
routes:
"""


def issues(text: str, **kw: object) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(text, env={}, **kw)  # type: ignore[arg-type]
    return [(i.line, i.dotted, i.message) for i in info.value.issues]


def billion_laughs(levels: int) -> str:
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text


# --- every construct loads or is an issue with its line ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        ("a: 1\nb: 2024-13-45\n", 2, "b", "'2024-13-45' is not a valid date (month must be in 1..12)"),
        ("a: 1\nb: !foo bar\n", 2, "b", "unknown tag !foo"),
        ("a: 1\nb: !foo {c: 1}\n", 2, "b", "unknown tag !foo"),
        ("a: !!set {x, y}\n", 1, "a", "unknown tag !!set"),
        ("a: !!python/object:os.system x\n", 1, "a", "unknown tag !!python/object:os.system"),
        ("a: 1\na: 2\n", 2, "a", "duplicate key"),
        ("a: 1\n? [x, y]\n: 2\n", 2, "", "a key must be a string, not a sequence"),
        ("a: 1\n? {x: 1}\n: 2\n", 2, "", "a key must be a string, not a mapping"),
        ("a: &x [1, *x]\n", 1, "a[1]", "alias *x is inside its own anchor &x"),
        ("a: 1\nb: *nowhere\n", 2, "b", "alias *nowhere has no anchor &nowhere before it"),
        ("a: 1\nb: " + "9" * 100_000 + "\n", 2, "b", "a number of 100000 characters (at most 100)"),
        ("a: 1\nb: 1." + "5" * 5000 + "\n", 2, "b", "a number of 5002 characters"),
        ("a: 1\nb: !!int twelve\n", 2, "b", "'twelve' is not a valid integer"),
        ("a: 1\nb: !!bool maybe\n", 2, "b", "'maybe' is not a valid boolean"),
        ("a: 1\nb: !!timestamp soon\n", 2, "b", "'soon' is not a valid date"),
        ("a: 1\nb: !!binary xx=\n", 2, "b", "'xx=' is not a valid base64 value"),
        ("a: 1\n---\nb: 2\n", 2, "", "a second YAML document starts here"),
        ("a:\n\tb: 1\n", 2, "", "YAML syntax error: found character that cannot start any token"),
        ("a: 1\nb: x\x00y\n", 2, "", "character U+0000 is not allowed in YAML"),
        ("a: 1\nb: \ud800\n", 2, "", "not valid Unicode (lone surrogate U+D800)"),
        ("a: &m [1]\nb:\n  <<: *m\n", 3, "b", "'<<' merges mappings; *m is not one"),
        ("a: 1\nb:\n  <<: 3\n", 3, "b", "'<<' merges a mapping"),
        ("a: " + "[" * 150 + "]" * 150 + "\n", 1, "", "mappings and sequences nested deeper than 100 levels"),
    ],
)
def test_hostile_construct_is_an_issue_with_its_line(text: str, line: int, path: str, message: str) -> None:
    got = issues(text)
    assert any(g[0] == line and g[1] == path and g[2].startswith(message) for g in got), got


def test_plain_keys_are_their_text_and_a_bom_is_ignored() -> None:
    src = load_text("\ufeffyes: 1\n1: 2\n0x1F: 3\n~: 4\n'': 5\n", env={})
    assert src.data == {"yes": 1, "1": 2, "0x1F": 3, "~": 4, "": 5}


def test_merge_keys_merge_and_lines_follow_the_merged_values() -> None:
    text = ("defaults: &defaults\n"      # 1
            "  attempts: 3\n"             # 2
            "  backoff: fixed\n"          # 3
            "other: &other {max: 60, attempts: 9}\n"  # 4
            "retry:\n"                    # 5
            "  <<: [*defaults, *other]\n"  # 6
            "  backoff: exponential\n")   # 7
    src = load_text(text, env={})
    assert src.data["retry"] == {"backoff": "exponential", "attempts": 3, "max": 60}
    assert src.line_of(("retry", "attempts")) == 2
    assert src.line_of(("retry", "max")) == 4
    assert src.line_of(("retry", "backoff")) == 7
    src = load_text("a:\n  <<: {b: 1}\n  c: 2\n", env={})
    assert src.data == {"a": {"c": 2, "b": 1}} and src.line_of(("a", "b")) == 2


def test_a_merged_bad_value_is_reported_where_it_is_written() -> None:
    text = ROUTES + ("  - name: r0\n"
                     "    from: api\n"
                     "    to: [{connector: out}]\n"
                     "    on_failure: &failure\n"
                     "      retry: {attempts: lots}\n"
                     "  - name: r1\n"
                     "    from: api\n"
                     "    to: [{connector: out}]\n"
                     "    on_failure:\n"
                     "      <<: *failure\n"
                     "      dead_letter: false\n")
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    where = {(i.dotted, i.line) for i in info.value.issues}
    attempts_line = text.splitlines().index("      retry: {attempts: lots}") + 1
    assert where == {("routes[0].on_failure.retry.attempts", attempts_line),
                     ("routes[1].on_failure.retry.attempts", attempts_line)}


# --- the alias budget ---------------------------------------------------------------------------------


def test_billion_laughs_is_refused_fast_naming_the_anchor() -> None:
    started = time.monotonic()
    got = issues(billion_laughs(10))
    assert time.monotonic() - started < 5
    (line, _, message), = got
    assert "alias *f (anchor at line 6)" in message and f"more than {MAX_NODES} values" in message
    assert line == 7


def test_alias_budget_counts_the_expansion_not_the_text() -> None:
    text = billion_laughs(4)  # 9**4 = 6,561 values from 130 bytes
    assert load_text(text, env={})
    assert "alias *c" in issues(text, max_nodes=5000)[0][2]


def test_a_10000_route_config_with_shared_anchors_is_within_the_budget() -> None:
    text = ROUTES + "".join(
        f"  - {{name: r{i}, from: api, match: {{subject: '/in/{i}/**'}}, to: [{{connector: out}}], on_failure: "
        + ("&failure {retry: {attempts: 3, backoff: fixed}}" if i == 0 else "*failure") + "}\n"
        for i in range(10_000))
    cfg = load_config_text(text, env={})
    assert len(cfg.router.routes) == 10_000
    assert cfg.model.routes[9_999].on_failure.retry.attempts == 3


# --- syntax errors name the broken line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: 1\nb: [1, 2\nc: 3\n", 2),                       # unclosed bracket
        ("a: 1\nb: {x: 1\n", 2),                             # unclosed brace at the end
        ("a: 1\nb: \"abc\nc: 3\n", 2),                      # unclosed quote
        ("a: 1\nb\nc: 3\n", 2),                              # key without its colon
        ("routes:\n  - name: x\n   from: y\n", 3),          # wrong indentation
        ("a: 1\nb: c: d\ne: 1\n", 2),                        # a second colon
        ("a:\n  b: 1\n  - c\n", 3),                          # a list item in a mapping
    ],
)
def test_a_syntax_error_names_the_broken_line(text: str, line: int) -> None:
    got = issues(text)
    assert got[0][0] == line and got[0][2].startswith("YAML syntax error"), got


# --- arbitrary input: a ConfigError or a result, nothing else --------------------------------------------

_yamlish = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
              st.sampled_from(["2024-13-45", "!foo x", "*a", "&a x", "<<", "!!binary x", "1:2:3", "~", "${X}",
                               "\t", "\ufeff", "---", "...", "? x", "- ", "|", ">-", "'", '"', "#"])),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)


def _render(value: object, indent: int = 0) -> str:
    pad = " " * indent
    if isinstance(value, dict):
        return "".join(f"{pad}{k}:\n{_render(v, indent + 2)}" if isinstance(v, dict | list)
                       else f"{pad}{k}: {v}\n" for k, v in value.items()) or f"{pad}{{}}\n"
    if isinstance(value, list):
        return "".join(f"{pad}- {_render(v, indent + 2).lstrip()}" for v in value) or f"{pad}[]\n"
    return f"{pad}{value}\n"


_fragments = st.lists(st.sampled_from([
    "a: ", "b:", "&x ", "*x", "<<: ", "[", "]", "{", "}", ", ", "\n", "  ", "- ", "!foo ", "!!str ", "!!int ",
    "2024-13-45", "9" * 5000, "'", '"', "? ", ": ", "---\n", "...\n", "\t", "\ufeff", "\x00", "${A}", "routes:",
    "connectors:", "#", "|\n", ">\n", "~", "yes", "1e9999", "0x", "&y [*x, *x, *x]\n",
]), max_size=40).map("".join)


def _only_config_errors(text: str) -> None:
    for load in (lambda: load_text(text, env={}), lambda: load_config_text(text, env={})):
        try:
            load()
        except ConfigError as exc:
            assert exc.issues
            assert all(isinstance(i.line, int) or i.line is None for i in exc.issues)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=string.printable + "\ufeff\x00\x85\u2028é", max_size=200))
def test_arbitrary_text_gives_a_config_error_or_a_result(text: str) -> None:
    _only_config_errors(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_fragments)
def test_yaml_fragments_give_a_config_error_or_a_result(text: str) -> None:
    _only_config_errors(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["gateway", "connectors", "routes", "x"]), _yamlish, max_size=3))
def test_yamlish_structures_give_a_config_error_or_a_result(doc: dict[str, object]) -> None:
    _only_config_errors(_render(doc))


# --- files, samples and state between loads --------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_file(str(path), env={})
    (issue,) = info.value.issues
    assert issue.line == 2 and "not valid UTF-8" in issue.message


def test_sample_data_is_bounded_and_not_interpolated() -> None:
    assert load_data("a: ${HOME}\n") == {"a": "${HOME}"}
    with pytest.raises(ConfigError):
        load_data(billion_laughs(10))


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_thousand_loads_keep_memory_flat() -> None:
    text = Path(__file__).resolve().parents[2].joinpath("routes.yaml").read_text()
    for _ in range(50):  # warm caches (pydantic, regexes, the allocator's arenas)
        load_config_text(text, env={})
    gc.collect()
    before = _rss_mib()
    for _ in range(1000):
        load_config_text(text, env={})
    gc.collect()
    assert _rss_mib() - before < 25, f"RSS grew from {before:.0f} to {_rss_mib():.0f} MiB"
