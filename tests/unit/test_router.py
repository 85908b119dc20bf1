"""The router is pure: table tests for matching, conditions, templates and reshaping."""

from __future__ import annotations

import pytest

from gateway.config.loader import load_config_text
from gateway.contract import Connector, ConnectorConfig, TargetOptions
from gateway.envelope import Envelope
from gateway.registry import Registry
from gateway.routing.expr import ExpressionError, compile_expression
from gateway.routing.router import MessageScope, Planned
from gateway.routing.trie import SubjectTrie, validate_pattern


class _Cfg(ConnectorConfig):
    pass


class _Opts(TargetOptions):
    topic: str = ""
    to: list[str] = []
    qos: int = 0


def _kind(name: str, syntax: str) -> type[Connector]:
    return type(name, (Connector,), {"kind": name, "Config": _Cfg, "Options": _Opts, "supports_inbound": True,
                                     "supports_outbound": True, "subject_syntax": syntax})


REGISTRY = Registry({"mq": _kind("mq", "topic"), "amqp9": _kind("amqp9", "dotted"), "web": _kind("web", "glob")},
                    use_entry_points=False)


def load(routes: str, unmatched: str = "reject"):  # type: ignore[no-untyped-def]
    text = f"""
gateway: {{unmatched: {unmatched}}}
connectors:
  plant: {{type: mq}}
  bus: {{type: amqp9}}
  api: {{type: web}}
  out: {{type: mq}}
  mail: {{type: mq}}
routes:
{routes}
"""
    return load_config_text(text, registry=REGISTRY, env={})


def env(source: str, subject: str, body: bytes = b"", ctype: str = "application/json", **kw: object) -> Envelope:
    return Envelope(source=source, protocol="x", subject=subject, body=body, content_type=ctype, **kw)  # type: ignore[arg-type]


# --- trie --------------------------------------------------------------------------------

TOPIC_CASES = [
    ("plant/+/boiler/alert", "plant/7/boiler/alert", True),
    ("plant/+/boiler/alert", "plant/7/pump/alert", False),
    ("plant/+/boiler/alert", "plant/7/boiler/alert/x", False),
    ("plant/#", "plant", True),
    ("plant/#", "plant/a/b/c", True),
    ("#", "anything/at/all", True),
    ("#", "$SYS/broker/load", False),
    ("+/status", "$SYS/status", False),
    ("$SYS/#", "$SYS/broker", True),
    ("a/+", "a/", True),
    ("a//b", "a//b", True),
]
DOTTED_CASES = [
    ("orders.*.created", "orders.eu.created", True),
    ("orders.*.created", "orders.eu.x.created", False),
    ("orders.#", "orders", True),
    ("orders.#.created", "orders.created", True),
    ("orders.#.created", "orders.a.b.created", True),
    ("#.created", "x.y.created", True),
    ("#.created", "x.y.deleted", False),
    ("*", "a.b", False),
]
GLOB_CASES = [
    ("/orders/*", "/orders/42", True),
    ("/orders/*", "/orders/42/items", False),
    ("/orders/**", "/orders", True),
    ("/orders/**", "/orders/42/items/1", True),
    ("/v?/x", "/v1/x", True),
    ("*@example.com", "ops@example.com", True),
    ("*@example.com", "ops@example.org", False),
    ("alerts@example.com", "alerts@example.com", True),
]


@pytest.mark.parametrize(("syntax", "pattern", "subject", "hit"),
                         [("topic", *c) for c in TOPIC_CASES] + [("dotted", *c) for c in DOTTED_CASES]
                         + [("glob", *c) for c in GLOB_CASES])
def test_trie_matches_like_the_protocol(syntax: str, pattern: str, subject: str, hit: bool) -> None:
    trie = SubjectTrie(syntax)
    assert validate_pattern(pattern, syntax) is None
    trie.add(pattern, 1)
    assert (1 in trie.match(subject)) is hit


@pytest.mark.parametrize(("pattern", "syntax"), [("a/#/b", "topic"), ("a/b+", "topic"), ("a.b*", "dotted"),
                                                 ("/a/**b", "glob"), ("", "topic")])
def test_invalid_patterns_are_explained(pattern: str, syntax: str) -> None:
    assert validate_pattern(pattern, syntax)


def test_trie_cost_does_not_depend_on_unrelated_routes() -> None:
    trie = SubjectTrie("topic")
    for i in range(10_000):
        trie.add(f"site/{i}/+/alert", i)
    assert trie.match("site/4711/boiler/alert") == {4711}


# --- expressions -------------------------------------------------------------------------

SCOPE = {"data": {"temperature": 97, "site": "North", "tags": ["a", "b"], "nested": {"x": [1, {"y": 2}]}},
         "subject": "plant/7/boiler/alert", "headers": {"x-priority": "high"}}


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("data.temperature > 90", True),
        ("data.temperature > 90 and data.site == 'North'", True),
        ("data.missing > 90", False),  # missing → None → ordering comparison is false
        ("data.missing == null", True),
        ("not data.missing", True),
        ("lower(data.site) == 'north'", True),
        ("'b' in data.tags", True),
        ("'z' not in data.tags", True),
        ("len(data.tags) == 2", True),
        ("data.nested.x[1].y == 2", True),
        ("data['temperature'] - 7 == 90", True),
        ("headers['x-priority'] in ['high', 'urgent']", True),
        ("matches(subject, '^plant/[0-9]+/boiler')", True),
        ("startswith(subject, 'plant/')", True),
        ("80 < data.temperature <= 97", True),
        ("default(data.level, 'info') == 'info'", True),
        ("data.site > 3", False),  # type mismatch → false, not an error
        ("data.temperature / 0 == null", True),
        ("int('12') + 1 == 13", True),
        ("data.temperature if data.site == 'North' else 0", 97),
    ],
)
def test_expressions(expr: str, expected: object) -> None:
    assert compile_expression(expr)(SCOPE) == expected


@pytest.mark.parametrize(
    "expr",
    ["__import__('os')", "data.__class__", "open('/etc/passwd')", "lambda: 1", "[x for x in data]", "a := 1",
     "data.x(1)", "subject.startswith('p')", "f'{data}'", "data[1:2]", "unknown_name == 1", "1 is 1",
     "matches(subject, '(')"],
)
def test_unsafe_or_invalid_expressions_do_not_compile(expr: str) -> None:
    with pytest.raises(ExpressionError):
        compile_expression(expr)


# --- select ---------------------------------------------------------------------------

ROUTES = """
  - name: boiler
    from: plant
    match: {subject: "plant/+/boiler/alert", when: "data.temperature > 90"}
    to: [{connector: out, topic: "ops/{{ data.site }}"}]
  - name: all-plant
    from: plant
    match: {subject: "plant/#"}
    continue: true
    to: [{connector: out}]
  - name: plant-tail
    from: plant
    to: [{connector: out}]
  - name: orders
    from: bus
    match: {subject: ["orders.*.created", "orders.#.cancelled"]}
    to: [{connector: out}]
  - name: api-orders
    from: api
    match: {subject: "/orders/**"}
    to: [{connector: out}]
"""

SELECT_CASES = [
    ("plant", "plant/7/boiler/alert", b'{"temperature": 97, "site": "n"}', ["boiler"]),
    ("plant", "plant/7/boiler/alert", b'{"temperature": 20}', ["all-plant", "plant-tail"]),
    ("plant", "plant/7/pump/alert", b"{}", ["all-plant", "plant-tail"]),
    ("plant", "elsewhere", b"{}", ["plant-tail"]),
    ("bus", "orders.eu.created", b"{}", ["orders"]),
    ("bus", "orders.eu.x.cancelled", b"{}", ["orders"]),
    ("bus", "orders.eu.updated", b"{}", []),
    ("api", "/orders/1", b"{}", ["api-orders"]),
    ("api", "/customers/1", b"{}", []),
    ("mail", "x", b"{}", []),
]


@pytest.mark.parametrize(("source", "subject", "body", "expected"), SELECT_CASES)
def test_select(source: str, subject: str, body: bytes, expected: list[str]) -> None:
    cfg = load(ROUTES)
    assert [s.route.name for s in cfg.router.select(env(source, subject, body))] == expected


def test_route_needing_json_reports_unparseable_body() -> None:
    cfg = load(ROUTES)
    selected = cfg.router.select(env("plant", "plant/7/boiler/alert", b"not json"))
    assert selected[0].route.name == "boiler"
    assert selected[0].error and "needs the parsed body" in selected[0].error


def test_ten_thousand_routes_select_the_right_one() -> None:
    routes = "".join(
        f"  - name: r{i}\n    from: plant\n    match: {{subject: \"site/{i}/+/alert\"}}\n    to: [{{connector: out}}]\n"
        for i in range(2000))
    cfg = load(routes)
    assert [s.route.name for s in cfg.router.select(env("plant", "site/1234/boiler/alert", b"{}"))] == ["r1234"]


# --- reshape ----------------------------------------------------------------------------

def test_reshape_renders_body_headers_and_options() -> None:
    cfg = load("""
  - name: r
    from: plant
    to:
      - connector: out
        topic: "ops/{{ data.site | lower }}/{{ subject.split('/')[1] }}"
        to: ["{{ data.site }}@example.com", "fixed@example.com"]
        qos: 1
        body: "Boiler {{ data.site }} at {{ data.temperature }} °C"
        headers: {x-site: "{{ data.site }}", x-fixed: "yes"}
""")
    e = env("plant", "plant/7/boiler/alert", b'{"temperature": 97, "site": "North"}', headers={"x-in": "1"})
    route = cfg.router.routes[0]
    [plan] = cfg.router.reshape(e, route)
    assert isinstance(plan, Planned)
    assert plan.envelope.body.decode() == "Boiler North at 97 °C"
    assert plan.envelope.content_type.startswith("text/plain")
    assert plan.envelope.id == e.id
    assert dict(plan.envelope.headers) == {"x-in": "1", "x-site": "North", "x-fixed": "yes"}
    opts = plan.spec.options
    assert isinstance(opts, _Opts)
    assert opts.topic == "ops/north/7" and opts.to == ["North@example.com", "fixed@example.com"] and opts.qos == 1
    assert e.body == b'{"temperature": 97, "site": "North"}'  # the original is untouched


@pytest.mark.parametrize(
    ("template", "body", "reason"),
    [
        ("{{ data.missing }}", b"{}", "missing value"),
        ("{{ data.__class__.__mro__ }}", b"{}", "sandbox"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", b"{}", "sandbox"),
    ],
)
def test_template_failures_become_reasons_not_crashes(template: str, body: bytes, reason: str) -> None:
    cfg = load(f"""
  - name: r
    from: plant
    to: [{{connector: out, body: "{template}"}}]
""")
    [result] = cfg.router.reshape(env("plant", "t", body), cfg.router.routes[0])
    assert isinstance(result, tuple)
    assert reason in result[1]


def test_header_injection_through_a_template_is_refused() -> None:
    cfg = load("""
  - name: r
    from: plant
    to: [{connector: out, headers: {subject: "{{ data.s }}"}}]
""")
    [result] = cfg.router.reshape(env("plant", "t", b'{"s": "x\\r\\nBcc: evil@x"}'), cfg.router.routes[0])
    assert isinstance(result, tuple) and "header injection" in result[1]


def test_message_scope_is_lazy_and_complete() -> None:
    e = env("plant", "s", b"not json", ctype="application/json")
    scope = MessageScope(e)
    assert scope["subject"] == "s" and scope["data"] is None and scope.get("nope") is None
    assert set(scope) >= {"data", "subject", "headers", "attributes", "id"}
