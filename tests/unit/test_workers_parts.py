"""The pieces of ``gateway.workers`` that need no process: the metrics merge, the per-worker files,
the usable cores, the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.metrics import Metrics
from gateway.reload.plan import plan_reload
from gateway.workers import WorkerIdentity, cgroup_quota, resolve_count, usable_cores
from gateway.workers.parent import _Collected, merge_metrics


def _exposition(received: int, ready: int, version: str, lag: float) -> str:
    m = Metrics()
    m.received.labels("api").inc(received)
    m.ready.set(ready)
    m.config_info.labels(version).set(1)
    m.routes_loaded.set(3)
    m.loop_lag.observe(lag)
    return m.exposition().decode()


def _values(metrics: list) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[type-arg]
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(metrics))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_merged_metrics_add_counters_and_histograms_and_keep_gauges_meaningful() -> None:
    merged = _values(merge_metrics([_exposition(7, 1, "v1", 0.002), _exposition(5, 0, "v1", 0.2)]))
    assert merged[("gateway_messages_received_total", (("connector", "api"),))] == 12
    assert merged[("gateway_event_loop_lag_seconds_count", ())] == 2
    assert merged[("gateway_event_loop_lag_seconds_bucket", (("le", "0.0025"),))] == 1
    assert merged[("gateway_ready", ())] == 0  # one worker not ready: the least
    assert merged[("gateway_config_info", (("version", "v1"),))] == 1  # not 2
    assert merged[("gateway_routes_loaded", ())] == 3


def test_each_worker_has_its_own_state_files_worker_0_the_configured_ones() -> None:
    peers = ("127.0.0.1:1", "127.0.0.1:2")
    w0 = WorkerIdentity(0, 2, peers[0], peers, "s")
    w1 = WorkerIdentity(1, 2, peers[1], peers, "s")
    assert w0.own_file("var/spool.db") == "var/spool.db"
    assert w1.own_file("var/spool.db") == "var/spool.w1.db"
    assert WorkerIdentity(**{**w1.__dict__}) == w1


def test_the_environment_carries_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    peers = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    w = WorkerIdentity(1, 3, peers[1], peers, "secret")
    assert WorkerIdentity.from_env() is None
    for k, v in w.env().items():
        monkeypatch.setenv(k, v)
    assert WorkerIdentity.from_env() == w


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cgroup_quota_in_v1_and_v2(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(str(tmp_path)) == quota


def test_auto_is_the_affinity_bounded_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr("gateway.workers.cgroup_quota", lambda: 1.5)
    assert usable_cores() == 2  # a pod limited to 1.5 CPUs on a 64-core node
    assert resolve_count("auto") == 2
    assert resolve_count(3) == 3
    monkeypatch.setattr("gateway.workers.cgroup_quota", lambda: None)
    assert usable_cores() == 64


def _cfg(workers: str) -> str:
    return f"gateway: {{workers: {workers}}}\nconnectors: {{}}\nroutes: []\n"


def test_the_setting_takes_a_number_or_auto_and_needs_a_restart() -> None:
    one = load_config_text(_cfg("1"))
    assert one.model.gateway.workers == 1
    auto = load_config_text(_cfg("auto"))
    assert auto.model.gateway.workers == "auto"
    assert "gateway.workers" in plan_reload(one, auto).restart_required
    for bad in ("0", "257", "many"):
        with pytest.raises(ConfigError):
            load_config_text(_cfg(bad))
