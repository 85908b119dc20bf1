"""Reload planning, versions, atomic writes, round-trip edits and the config history (pure)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from ruamel.yaml import YAML

from gateway.config.loader import load_config_text
from gateway.config.yamlsrc import ConfigError
from gateway.history import History, atomic_write, unified_diff
from gateway.reload import merge_document, plan_reload, version_of

BASE = textwrap.dedent("""\
    # the demo gateway
    gateway:
      drain: 5s
    connectors:
      api:                      # inbound REST
        type: rest
        listen: "127.0.0.1:18080"
        auth: {type: none}
      out:
        type: file
        path: var/out.jsonl     # keep this comment
      console: {type: log}
    routes:
      - name: to-file           # first route
        from: api
        match: {subject: "/events/**"}
        to:
          - connector: out
      - name: to-log
        from: api
        to: [{connector: console}]
    """)


def load(text: str):  # type: ignore[no-untyped-def]
    return load_config_text(text, env={})


def test_version_is_the_loaders_content_hash() -> None:
    assert version_of(BASE) == load(BASE).version
    assert version_of(BASE + "\n") != version_of(BASE)


def test_plan_restarts_only_changed_connectors() -> None:
    old = load(BASE)
    new = load(BASE.replace("path: var/out.jsonl", "path: var/other.jsonl"))
    plan = plan_reload(old, new)
    assert plan.restart == {"out"}
    assert not plan.added and not plan.removed and not plan.start_listening and not plan.stop_listening


def test_plan_route_only_change_touches_no_connector() -> None:
    plan = plan_reload(load(BASE), load(BASE.replace('"/events/**"', '"/orders/**"')))
    assert plan.untouched
    assert plan.restart_required == ()


def test_plan_added_removed_and_listening_changes() -> None:
    new_text = BASE.replace("  console: {type: log}\n", "  audit: {type: log}\n").replace(
        "to: [{connector: console}]", "to: [{connector: audit}]")
    plan = plan_reload(load(BASE), load(new_text))
    assert plan.added == {"audit"} and plan.removed == {"console"} and not plan.restart
    # A connector no route reads from any more stops listening without a restart.
    only_out = textwrap.dedent("""\
        connectors:
          api: {type: rest, listen: "127.0.0.1:18080", auth: {type: none}, base_url: "http://127.0.0.1:1"}
          out: {type: file, path: var/out.jsonl}
        routes:
          - {name: a, from: api, to: [{connector: out}]}
        """)
    no_source = only_out.replace("- {name: a, from: api, to: [{connector: out}]}",
                                 "- {name: a, from: api, to: [{connector: api}]}")
    assert plan_reload(load(only_out), load(no_source)).untouched
    gone = load(only_out.replace("routes:\n  - {name: a, from: api, to: [{connector: out}]}\n", "routes: []\n"))
    plan = plan_reload(load(only_out), gone)
    assert plan.stop_listening == {"api"} and not plan.restart
    plan = plan_reload(gone, load(only_out))
    assert plan.start_listening == {"api"} and not plan.restart


def test_plan_flags_settings_that_need_a_restart() -> None:
    plan = plan_reload(load(BASE), load(BASE.replace("  drain: 5s\n", "  drain: 5s\n  spool: {path: x.db}\n")))
    assert plan.restart_required == ("gateway.spool",)
    assert plan_reload(load(BASE), load(BASE.replace("drain: 5s", "drain: 7s"))).restart_required == ()


def test_atomic_write_replaces_and_keeps_mode_and_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text("old\n")
    os.chmod(real, 0o640)
    link = tmp_path / "routes.yaml"
    link.symlink_to(real)
    atomic_write(str(link), "new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    assert (real.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_write_failure_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("old\n")
    os.chmod(tmp_path, 0o500)
    try:
        if os.geteuid() == 0:  # root ignores directory permissions: use a missing directory instead
            with pytest.raises(OSError):
                atomic_write(str(tmp_path / "missing" / "routes.yaml"), "new\n")
        else:
            with pytest.raises(OSError):
                atomic_write(str(path), "new\n")
    finally:
        os.chmod(tmp_path, 0o700)
    assert path.read_text() == "old\n"


def test_merge_keeps_comments_and_edits_one_route() -> None:
    doc = YAML(typ="safe").load(BASE)
    routes = doc["routes"]
    routes[0]["match"]["subject"] = "/orders/**"
    merged = merge_document(BASE, {"routes": routes})
    assert "# the demo gateway" in merged and "# keep this comment" in merged and "# first route" in merged
    assert "/orders/**" in merged and "/events/**" not in merged
    assert load(merged).router.routes[0].subjects == ["/orders/**"]
    # Unchanged content stays byte for byte.
    assert merged.splitlines()[:12] == BASE.splitlines()[:12]


def test_merge_adds_removes_and_reorders_named_routes() -> None:
    doc = YAML(typ="safe").load(BASE)
    new_route = {"name": "third", "from": "api", "to": [{"connector": "console"}]}
    merged = merge_document(BASE, {"routes": [doc["routes"][1], new_route]})
    cfg = load(merged)
    assert [r.name for r in cfg.router.routes] == ["to-log", "third"]
    assert "# keep this comment" in merged


def test_merge_refuses_unparseable_yaml() -> None:
    with pytest.raises(ConfigError):
        merge_document("routes: [unclosed\n", {"routes": []})


def test_history_keeps_the_last_n_on_disk_and_survives_a_restart(tmp_path: Path) -> None:
    h = History(str(tmp_path / "h"), keep=3)
    texts = {f"{i:012x}": f"v{i}\n" for i in range(5)}
    for i, (v, t) in enumerate(texts.items()):
        h.record(v, t, by=f"user{i}", at=1000.0 + i)
    assert [e.version for e in h.entries()] == [f"{i:012x}" for i in (4, 3, 2)]
    assert h.text(f"{0:012x}") is None
    assert h.text(f"{2:012x}") == "v2\n"
    files = sorted(p.name for p in (tmp_path / "h").iterdir())
    assert files == sorted([f"{i:012x}.yaml" for i in (2, 3, 4)] + ["index.json"])
    again = History(str(tmp_path / "h"), keep=3)
    assert [(e.version, e.by) for e in again.entries()] == [(f"{i:012x}", f"user{i}") for i in (4, 3, 2)]
    assert again.text(f"{3:012x}") == "v3\n"


def test_history_ignores_a_corrupt_index_and_never_reads_outside(tmp_path: Path) -> None:
    d = tmp_path / "h"
    d.mkdir()
    (d / "index.json").write_text(json.dumps([{"version": "../../etc/passwd", "applied_at": 1, "by": "x"},
                                              {"nonsense": True}]))
    h = History(str(d))
    assert h.entries() == []
    assert h.text("../../etc/passwd") is None
    (d / "index.json").write_text("{not json")
    assert History(str(d)).entries() == []


def test_history_falls_back_to_memory_when_the_directory_is_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    h = History(str(blocker / "h"))
    h.record("aaaaaaaaaaaa", "one\n", by="a")
    h.record("bbbbbbbbbbbb", "two\n", by="b")
    assert h.text("bbbbbbbbbbbb") == "two\n" and h.text("aaaaaaaaaaaa") == "one\n"


def test_a_diff_of_a_change_to_every_route_of_a_large_config_is_bounded() -> None:
    old = "".join(f"- name: r{i}\n  to: x{i}\n" for i in range(20_000))
    new = old.replace("  to: x", "  to: y")
    d = unified_diff(old, new, "old", "new")
    assert d.splitlines()[2] == "@@ -2,39999 +2,39999 @@ 39999 lines differ: too many to list line by line"
    one = unified_diff(old, old.replace("to: x77\n", "to: z77\n"), "old", "new")
    assert "-  to: x77\n+  to: z77\n" in one


def test_unified_diff() -> None:
    assert unified_diff("a\nb\n", "a\nb\n", "x", "y") == ""
    d = unified_diff("a\nb\n", "a\nc", "old", "new")
    assert "-b\n" in d and "+c\n" in d and "No newline at end of file" in d


async def test_the_watcher_looks_at_the_config_not_at_a_spool_beside_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool or output file in the config's directory changes for every message: those changes
    must not make the gateway re-read the config; a change of the config itself must."""
    import asyncio
    import importlib

    watching = importlib.import_module("gateway.reload.watch")  # the module (the package exports the function)

    config = tmp_path / "routes.yaml"
    config.write_text("routes: []\n")
    checks: list[str] = []

    async def check_file(_reloader: object, path: str) -> None:
        checks.append(path)

    monkeypatch.setattr(watching, "check_file", check_file)
    # What the watcher reads of the reloader: the running config's directory and the files it reads.
    reloader = SimpleNamespace(host=SimpleNamespace(config=SimpleNamespace(base_dir=str(tmp_path), files={})))
    task = asyncio.create_task(watching.watch(reloader, str(config), debounce_ms=20, poll_seconds=60))
    try:
        await asyncio.sleep(0.3)  # the watcher is set up
        for i in range(20):
            (tmp_path / "spool.db-wal").write_bytes(b"x" * i)
            (tmp_path / "events.jsonl").write_text(f"{i}\n")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert checks == []
        config.write_text("routes: []\n# edited\n")
        for _ in range(100):
            if checks:
                break
            await asyncio.sleep(0.05)
        assert checks == [str(config)]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_kubernetes_configmap_entries_concern_the_watcher(tmp_path: Path) -> None:
    from gateway.reload.watch import _concerns

    concerns = _concerns(str(tmp_path / "routes.yaml"))
    for name in ("routes.yaml", "..data", "..data_tmp", "..2026_11_28_13_00_00.123"):
        assert concerns(None, str(tmp_path / name)), name
    for name in ("spool.db", "spool.db-wal", "out.jsonl", "routes.yaml.swp", ".routes.yaml.tmp"):
        assert not concerns(None, str(tmp_path / name)), name
