"""A 10,000-route config: it loads, validates and routes like a small one; its templates are checked
at load and compiled on first use; a replaced config is freed without the cycle collector.

Nothing here times anything: what makes a large config cheap is asserted structurally (how many
templates were compiled, what the collector has to find).
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from bench.bigconfig import big_config
from gateway.config.loader import LoadedConfig, load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.envelope import Envelope
from gateway.reload.worker import dismantle
from gateway.routing.router import Planned
from gateway.routing.templates import Template, make_environment

ROUTES = 10_000


@pytest.fixture(scope="module")
def big() -> LoadedConfig:
    return load_config_text(big_config(ROUTES, var="/nonexistent/var"))


def message(subject: str, data: dict[str, object]) -> Envelope:
    return Envelope(source="api", protocol="rest", subject=subject, body=json.dumps(data).encode(),
                    content_type="application/json")


def test_ten_thousand_routes_load_validate_and_route(big: LoadedConfig) -> None:
    assert len(big.router) == ROUTES
    assert len(big_config(ROUTES)) > 2_000_000  # the size the targets are about
    # Route 4 * k takes /sites/<site>/<device>/* when data.t is over its threshold.
    for i in (0, 4, 5_000, 9_996):
        site, device = f"s{i // 20:04d}", f"d{i % 20:02d}"
        picked = big.router.select(message(f"/sites/{site}/{device}/reading", {"t": 99}))
        assert [s.route.name for s in picked] == [f"r{i}-readings"]
        assert big.router.select(message(f"/sites/{site}/{device}/reading", {"t": 1})) == []
    # Route 4 * k + 1 renders a JSON body and a header from templates that only it has.
    i = 7_001
    picked = big.router.select(message(f"/sites/s{i // 20:04d}/d{i % 20:02d}/status", {"state": "hot"}))
    assert [s.route.name for s in picked] == [f"r{i}-json"]
    plans = big.router.reshape(message("/x", {"state": "hot"}), picked[0].route)
    assert isinstance(plans[0], Planned)
    assert json.loads(plans[0].envelope.body) == {"tag": "v0", "site": "s0350", "device": "d01", "state": "hot"}
    assert plans[0].envelope.headers["x-site"] == "/x"
    # Route 4 * k + 3 has a storm control; a subject no route names matches nothing.
    assert big.router.route_named("r9999-storm").storm is not None  # type: ignore[union-attr]
    assert big.router.select(message("/sites/s9999/d00/reading", {"t": 99})) == []


def test_a_large_config_compiles_each_template_shape_once_at_load(big: LoadedConfig) -> None:
    """12,500 templates, 7 shapes: the others are checked by their shape and compiled when first
    rendered, into a bounded cache."""
    compiled = sum(len(env.__dict__["_gateway_compiled"]._items) for env in big.router.envs
                   if "_gateway_compiled" in env.__dict__)
    assert compiled <= 10


def test_a_template_of_a_checked_shape_renders_its_own_text() -> None:
    env = make_environment()
    a, b = Template(env, "site 1: {{ data.t }}"), Template(env, "site 2:\n{{ data.t }}")
    c = Template(env, "site 3: {{ data.t }}")
    assert (a.render({"data": {"t": 1}}), b.render({"data": {"t": 2}}), c.render({"data": {"t": 3}})) == (
        "site 1: 1", "site 2:\n2", "site 3: 3")


@pytest.mark.parametrize(("good", "bad", "why"), [
    ("a {{ x | upper }}", "b {{ x | nosuch }}", "nosuch"),
    ("{% if x %}a{% endif %}", "{% if x %}b", "endif"),
    ("a {{ '}}' }}", "b {{ '}}' ] }}", "syntax"),
    ("a {{ 10 ** 3 }}", "b {{ 10 ** 10000000 }}", "refused"),
    ("{ {{ x }}", "{{{ x }}", "syntax"),
])
def test_a_template_whose_text_differs_from_a_checked_one_is_still_checked(good: str, bad: str, why: str) -> None:
    from gateway.routing.templates import TemplateError

    env = make_environment()
    Template(env, good)
    with pytest.raises(TemplateError, match=why):
        Template(env, bad)


def test_an_invalid_template_among_ten_thousand_is_refused_with_its_line() -> None:
    text = big_config(ROUTES).replace("{{ data.state | tojson }}", "{{ data.state | tojsn }}", 1)
    with pytest.raises(ConfigError) as exc:
        load_config_text(text)
    assert len(exc.value.issues) == 1
    assert "tojsn" in exc.value.issues[0].message and exc.value.issues[0].line is not None


def test_a_dismantled_config_is_freed_by_reference_counting_alone() -> None:
    """A config is frozen out of the collector's sight (gc.freeze) while it runs; once replaced it
    must not need the collector to be freed, or every reload would leak one."""
    config = load_config_text(big_config(200, var="/nonexistent/var"))
    # Compile some templates on first use, as messages do.
    bodies = [t.body for r in config.router.routes[:8] for t in r.targets if t.body is not None]
    assert [json.loads(b.render({"data": {"state": "x"}, "subject": "/s"}))["state"] for b in bodies] == ["x", "x"]
    del bodies
    alive = [weakref.ref(config.router), *(weakref.ref(env) for env in config.router.envs)]
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        graves = [config]
        del config
        assert dismantle(graves) == []
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        if enabled:
            gc.enable()


def test_a_config_still_in_use_waits() -> None:
    config = load_config_text(big_config(20, var="/nonexistent/var"))
    router = config.router  # a message in flight holds the routes it started with
    waiting = dismantle([config])
    assert waiting == [config] and len(router) == 20
