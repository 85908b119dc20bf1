"""Templates and conditions are bounded (issue 16): a template that breaks a bound with its
constants is refused at load with its line; data that makes a render too big or too long fails
that render quickly and permanently (a reason to dead-letter, never an exception that asks for a
retry); ``matches()`` runs in linear time."""

from __future__ import annotations

import json
import time

import pytest

from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.contract import Connector, ConnectorConfig, TargetOptions
from gateway.envelope import Envelope
from gateway.registry import Registry
from gateway.routing.expr import ExpressionError, compile_expression
from gateway.routing.router import Planned
from gateway.routing.templates import Template, TemplateError, make_environment

#: Each refusal below takes milliseconds; unbounded, each would take seconds to hours.
QUICK = 2.0


class _Cfg(ConnectorConfig):
    pass


class _Opts(TargetOptions):
    topic: str = ""


KIND = type("mq", (Connector,), {"kind": "mq", "Config": _Cfg, "Options": _Opts, "supports_inbound": True,
                                 "supports_outbound": True, "subject_syntax": "topic"})
REGISTRY = Registry({"mq": KIND}, use_entry_points=False)


def load(body: str, gateway: str = "{}", when: str = ""):  # type: ignore[no-untyped-def]
    match = f"\n    match: {{when: {when!r}}}" if when else ""
    text = f"""gateway: {gateway}
connectors:
  plant: {{type: mq}}
  out: {{type: mq}}
routes:
  - name: r
    from: plant{match}
    to:
      - connector: out
        body: {body!r}
"""
    return load_config_text(text, registry=REGISTRY, env={})


def reshape(cfg, data: bytes, subject: str = "t") -> str | Planned:  # type: ignore[no-untyped-def]
    """The rendered body, or the reason the target would be dead-lettered."""
    t0 = time.monotonic()
    [result] = cfg.router.reshape(Envelope(source="plant", protocol="x", subject=subject, body=data,
                                           content_type="application/json"), cfg.router.routes[0])
    assert time.monotonic() - t0 < QUICK
    return result[1] if isinstance(result, tuple) else result.envelope.text


@pytest.mark.parametrize(
    ("template", "line"),
    [
        ("{{ 10**10000000 }}", 1),
        ("first\nsecond {{ 'x' * 10**9 }}", 2),
        ("{{ 'x' * 1000 * 1000 * 1000 }}", 1),
        ("{{ 'ab' ~ ('x' * 2**20) ~ ('x' * 2**20) }}", 1),
        ("{{ 'x'|center(10**9) }}", 1),
        ("{{ '%999999999d' % 1 }}", 1),
        ("{{ [0] * 10**9 }}", 1),
    ],
)
def test_a_template_whose_constants_break_a_bound_is_refused_at_load_with_its_line(template: str, line: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load(template)
    assert time.monotonic() - t0 < QUICK
    [issue] = caught.value.issues
    assert issue.path == ("routes", 0, "to", 0, "body") and "template refused" in issue.message, issue
    assert issue.line == 10 and (line == 1 or f"(template line {line})" in issue.message), issue


@pytest.mark.parametrize(
    ("template", "data", "reason"),
    [
        ("{% for i in range(data.n) %}{% for j in range(data.n) %}.{% endfor %}{% endfor %}", b'{"n": 100000}',
         "max_iterations"),
        ("{% for i in data.l %}{% for j in data.l %}{% for k in data.l %}.{% endfor %}{% endfor %}{% endfor %}",
         b'{"l": [' + b",".join([b"1"] * 100) + b"]}", "max_iterations"),
        ("{{ range(data.n)|list|length }}", b'{"n": 1000000}', "max_iterations"),
        ("{{ data.s * data.n }}", b'{"s": "xy", "n": 1000000000}', "max_output"),
        ("{{ data.b ** data.e }}", b'{"b": 10, "e": 10000000}', "digits"),
        ("{{ ([data.s] * 100)|join }}", b'{"s": "' + b"x" * 100_000 + b'"}', "max_output"),
        ("{{ {}.fromkeys(range(100), data.s) }}", b'{"s": "' + b"x" * 100_000 + b'"}', "max_output"),
        ("{{ '%*s' % (data.n, 'x') }}", b'{"n": 1000000000}', "'*' widths"),
        ("{{ '%s' | format(data.s) | center(data.n) }}", b'{"s": "x", "n": 1000000000}', "max_output"),
        ("{{ '{:{}}'.format('x', data.n) }}", b'{"n": 1000000000}', "max_output"),
        ("{{ 'x'.rjust(data.n) }}", b'{"n": 1000000000}', "max_output"),
        ("{{ data.s | indent(data.n) }}", b'{"s": "a\\nb", "n": 1000000000}', "max_output"),
        ("{{ data.s | wordwrap(1, wrapstring=data.w) }}", b'{"s": "' + b"a " * 5000 + b'", "w": "' + b"w" * 1000
         + b'"}', "max_output"),
        ("{{ data.s | replace('a', data.w) }}", b'{"s": "' + b"a" * 10_000 + b'", "w": "' + b"w" * 1000 + b'"}',
         "max_output"),
        ("{{ [1] | batch(data.n, 0) | list }}", b'{"n": 1000000000}', "max_output"),
        ("{{ data.l | slice(data.n) | list }}", b'{"l": [1], "n": 1000000000}', "parts"),
        ("{{ data.l | sum(start=[]) }}", b'{"l": [[1], [2]]}', "numbers only"),
        ("{% set ns = namespace(s=data.s) %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
         b'{"s": "ab"}', "max_output"),
        ("{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% endif %}{% endmacro %}{{ d(data.n) }}",
         b'{"n": 60}', "gateway.templates"),
        ("{% set x %}{% for i in range(data.n) %}{{ data.s }}{% endfor %}{% endset %}{{ x|length }}",
         b'{"n": 2000, "s": "' + b"x" * 10_000 + b'"}', "the text of a block"),
        # RecursionError, or the deadline on a busy machine:
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(data.n) }}", b'{"n": 1}', "template"),
        ("{% for x in [1] recursive %}{{ loop(range(data.n)) }}{% endfor %}", b'{"n": 100000}', "template"),
        ("{{ lipsum(data.n) }}", b'{"n": 1000000}', "missing value"),
    ],
)
def test_data_that_would_blow_up_a_render_fails_that_render_quickly(template: str, data: bytes, reason: str) -> None:
    result = reshape(load(template), data)
    assert isinstance(result, str) and result.startswith("route 'r' target 0 (out): template"), result
    assert reason in result, result


def test_ordinary_templates_render_as_before() -> None:
    template = ("{% macro item(x) %}[{{ x.name|upper }}:{{ '%03d' % x.n }}]{% endmacro %}"
                "{% for x in data.rows|sort(attribute='n') %}{{ item(x) }}{% endfor %} "
                "{{ data.rows|map(attribute='name')|join(', ') }} {{ data|tojson }} {{ '{}/{}'.format(subject, 2) }} "
                "{{ range(3)|sum }} {{ 2 ** 10 }} {{ 'ab' * 2 }} {{ 'x'|center(5) }}|")
    data = b'{"rows": [{"name": "b", "n": 2}, {"name": "a", "n": 1}]}'
    assert reshape(load(template), data, subject="s/1") == (
        '[A:001][B:002] b, a {"rows": [{"name": "b", "n": 2}, {"name": "a", "n": 1}]} s/1/2 3 1024 abab   x  |')


def test_the_bounds_are_set_in_the_gateway_section() -> None:
    cfg = load("{% for i in range(data.n) %}.{% endfor %}", gateway="{templates: {max_iterations: 100}}")
    assert reshape(cfg, b'{"n": 50}') == "." * 50
    assert "max_iterations" in reshape(cfg, b'{"n": 200}')
    cfg = load("{{ data.s * 3 }}", gateway="{templates: {max_output: 2KiB}}")
    assert "over the limit of 2048" in reshape(cfg, b'{"s": "' + b"x" * 1000 + b'"}')
    cfg = load("{{ data.s }}{{ data.s }}", gateway="{templates: {max_output: 2KiB}}")
    assert "the rendered text" in reshape(cfg, b'{"s": "' + b"x" * 1500 + b'"}')
    with pytest.raises(ConfigError) as caught:
        load("x", gateway="{templates: {max_iteration: 5}}")
    assert "did you mean 'max_iterations'" in str(caught.value)


def test_a_body_that_cannot_be_encoded_is_a_reason_not_a_crash() -> None:
    assert "not valid text" in reshape(load("{{ data.s }}"), b'{"s": "\\ud800"}')


def test_memory_and_recursion_errors_while_rendering_are_template_errors() -> None:
    class Exhausting:
        def __init__(self, error: type[BaseException]) -> None:
            self.error = error

        def __str__(self) -> str:
            raise self.error()

    template = Template(make_environment(), "{{ value }}")
    for error in (MemoryError, RecursionError):
        with pytest.raises(TemplateError, match=error.__name__):
            template.render({"value": Exhausting(error)})


def test_the_render_deadline_is_checked_as_the_render_goes() -> None:
    cfg = load("{% for i in range(data.n) %}{{ data.s|replace('a', 'b') }}{% endfor %}",
               gateway="{templates: {render_timeout: 10ms, max_output: 64MiB}}")
    assert "render_timeout" in reshape(cfg, b'{"n": 100000, "s": "' + b"a" * 5000 + b'"}')


# --- conditions ----------------------------------------------------------------------------

def test_matches_runs_in_linear_time_on_a_catastrophic_pattern() -> None:
    when = compile_expression("matches(subject, data.p)")
    t0 = time.monotonic()
    assert when({"subject": "a" * 100_000 + "b", "data": {"p": "(a+)+$"}}) is False
    assert when({"subject": "a" * 100_000, "data": {"p": "(a+)+$"}}) is True
    assert time.monotonic() - t0 < QUICK


@pytest.mark.parametrize("pattern", [r"(a)\\1", "(?=a)b", "(?<!a)b", "x" * 600])
def test_a_constant_pattern_re2_cannot_run_is_refused_at_load(pattern: str) -> None:
    with pytest.raises(ExpressionError, match="regular expression"):
        compile_expression(f"matches(subject, '{pattern}')")


def test_a_pattern_from_the_message_that_does_not_compile_does_not_match() -> None:
    cfg = load("x", when="matches(subject, data.p)")
    for pattern in [r"(a)\1", "(", "x" * 600]:
        body = json.dumps({"p": pattern}).encode()
        assert cfg.router.select(Envelope(source="plant", protocol="x", subject="aa", body=body,
                                          content_type="application/json")) == []


@pytest.mark.parametrize("expr", [" * ".join(["data.n"] * 20), " + ".join(["subject"] * 20)])
def test_condition_arithmetic_past_its_bounds_is_null(expr: str) -> None:
    assert compile_expression(expr)({"subject": "x" * 1024 * 1024, "data": {"n": 2**4000}}) is None
