"""Dry runs: which routes take a sample message and what every target would receive.

Shared by ``gateway routes test``, the admin API and the web editor. Nothing is sent.

A sample message (YAML or JSON)::

    source: plant            # the inbound connector it arrives on
    subject: plant/7/boiler/alert
    json: {temperature: 97}  # or body: "text", plus optional content_type, headers, attributes

A route test file (like Benthos' config unit tests) lists cases with expectations::

    tests:
      - name: hot boiler alerts go to ops
        message: {source: plant, subject: plant/7/boiler/alert, json: {temperature: 97}}
        expect:
          routes: [boiler-alerts-to-ops]          # exactly these routes, in order
          targets:
            - connector: ops
              body_contains: "97"                 # or body: exact text
              options: {subject: "Boiler 7 at 97 °C"}
      - name: cold ones do not
        message: {source: plant, subject: plant/7/boiler/alert, json: {temperature: 20}}
        expect: {routes: []}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config.loader import LoadedConfig
from gateway.envelope import Envelope
from gateway.routing.router import Planned


class SampleError(ValueError):
    pass


def sample_envelope(raw: Any, config: LoadedConfig) -> Envelope:
    if not isinstance(raw, Mapping):
        raise SampleError("a sample message is a mapping with source, subject and body or json")
    allowed = {"source", "subject", "body", "json", "content_type", "headers", "attributes", "id"}
    unknown = set(raw) - allowed
    if unknown:
        raise SampleError(f"unknown key(s) in sample message: {', '.join(sorted(unknown))}")
    source = raw.get("source")
    if source is None and len(config.connectors) >= 1:
        inbound = sorted({s for r in config.router.routes for s in r.sources})
        if len(inbound) == 1:
            source = inbound[0]
    if source not in config.connectors:
        raise SampleError(f"sample source {source!r} is not a configured connector")
    protocol = config.kinds[str(source)].kind
    if "json" in raw:
        body = json.dumps(raw["json"], ensure_ascii=False).encode("utf-8")
        ctype = raw.get("content_type", "application/json")
    else:
        b = raw.get("body", "")
        body = b.encode("utf-8") if isinstance(b, str) else json.dumps(b).encode("utf-8")
        ctype = raw.get("content_type", "text/plain; charset=utf-8")
    env = Envelope(source=str(source), protocol=protocol, subject=str(raw.get("subject", "")), body=body,
                   content_type=str(ctype), headers=dict(raw.get("headers") or {}),
                   attributes=dict(raw.get("attributes") or {}))
    return env.evolve(id=str(raw["id"])) if "id" in raw else env


def dry_run(config: LoadedConfig, env: Envelope) -> dict[str, Any]:
    """The routing decision for ``env`` as plain data."""
    selected = config.router.select(env)
    result: dict[str, Any] = {"envelope_id": env.id, "routes": [], "unmatched": not selected}
    if not selected:
        result["unmatched_policy"] = config.model.gateway.unmatched
    for sel in selected:
        entry: dict[str, Any] = {"route": sel.route.name, "mode": sel.route.mode, "targets": []}
        if sel.error:
            entry["error"] = sel.error
            entry["outcome"] = "dead_letter" if sel.route.dead_letter else "reject"
        else:
            for plan in config.router.reshape(env, sel.route):
                if isinstance(plan, Planned):
                    entry["targets"].append({
                        "connector": plan.spec.connector,
                        "options": plan.spec.options.model_dump(mode="json"),
                        "content_type": plan.envelope.content_type,
                        "headers": dict(plan.envelope.headers),
                        "body": plan.envelope.text,
                        "reply": plan.target.reply,
                    })
                else:
                    target, reason = plan
                    entry["targets"].append({"connector": target.connector, "error": reason,
                                             "outcome": "dead_letter"})
        result["routes"].append(entry)
    return result


@dataclass
class CaseResult:
    name: str
    failures: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


def run_tests(config: LoadedConfig, spec: Any) -> list[CaseResult]:
    if not isinstance(spec, Mapping) or not isinstance(spec.get("tests"), list):
        raise SampleError("a route test file has a 'tests:' list")
    out = []
    for i, case in enumerate(spec["tests"]):
        name = str(case.get("name", f"tests[{i}]")) if isinstance(case, Mapping) else f"tests[{i}]"
        res = CaseResult(name)
        out.append(res)
        try:
            env = sample_envelope(case.get("message") if isinstance(case, Mapping) else None, config)
        except SampleError as exc:
            res.failures.append(str(exc))
            continue
        res.result = dry_run(config, env)
        expect = case.get("expect") or {}
        _check(expect, res)
    return out


def _check(expect: Mapping[str, Any], res: CaseResult) -> None:
    routes = [r["route"] for r in res.result["routes"]]
    if "routes" in expect and list(expect["routes"]) != routes:
        res.failures.append(f"routes: expected {list(expect['routes'])}, got {routes}")
    if "unmatched" in expect and bool(expect["unmatched"]) != res.result["unmatched"]:
        res.failures.append(f"unmatched: expected {expect['unmatched']}, got {res.result['unmatched']}")
    targets = [t for r in res.result["routes"] for t in r["targets"]]
    for j, want in enumerate(expect.get("targets") or []):
        if j >= len(targets):
            res.failures.append(f"targets[{j}]: expected a target for {want.get('connector')!r}, got none")
            continue
        got = targets[j]
        if "connector" in want and want["connector"] != got.get("connector"):
            res.failures.append(f"targets[{j}].connector: expected {want['connector']!r}, got {got.get('connector')!r}")
        if "error" in got and not want.get("error"):
            res.failures.append(f"targets[{j}]: rendering failed: {got['error']}")
            continue
        if "body" in want and want["body"] != got.get("body"):
            res.failures.append(f"targets[{j}].body: expected {want['body']!r}, got {got.get('body')!r}")
        if "body_contains" in want and str(want["body_contains"]) not in str(got.get("body", "")):
            res.failures.append(f"targets[{j}].body: {want['body_contains']!r} not in {got.get('body')!r}")
        for key, value in (want.get("options") or {}).items():
            if got.get("options", {}).get(key) != value:
                res.failures.append(f"targets[{j}].options.{key}: expected {value!r}, "
                                    f"got {got.get('options', {}).get(key)!r}")
        for key, value in (want.get("headers") or {}).items():
            if got.get("headers", {}).get(key) != value:
                res.failures.append(f"targets[{j}].headers.{key}: expected {value!r}, "
                                    f"got {got.get('headers', {}).get(key)!r}")
