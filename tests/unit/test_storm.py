"""Alert-storm control: the exact number of messages each control lets through, with a fake clock."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.config.loader import load_config_text
from gateway.delivery.stormstore import SqliteStormStore
from gateway.envelope import Envelope
from gateway.routing.router import MessageScope
from gateway.routing.storm import StormControl


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def route(controls: str):  # type: ignore[no-untyped-def]
    cfg = load_config_text(f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:1", auth: {{type: none}}}}
  out: {{type: log}}
routes:
  - name: alerts
    from: api
    to: [{{connector: out}}]
{controls}
""", env={})
    return cfg.router.routes[0].storm


def alert(sensor: str, **data: object) -> Envelope:
    return Envelope(source="api", protocol="rest", subject=f"/plant/{sensor}/alert",
                    body=json.dumps({"sensor": sensor, **data}).encode(), content_type="application/json")


@pytest.fixture
async def control(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = SqliteStormStore(str(tmp_path / "storm.db"))
    emitted: list[tuple[str, Envelope]] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append((route_name, env))
        return True

    clock = Clock()
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    ctl.emitted = emitted  # type: ignore[attr-defined]
    ctl.clock_obj = clock  # type: ignore[attr-defined]
    yield ctl
    await ctl.stop()
    await store.close()


def actions(ctl: StormControl, compiled, envs: list[Envelope]) -> list[str]:  # type: ignore[no-untyped-def]
    return [ctl.admit(compiled, e, dict(MessageScope(e))).action for e in envs]


async def test_dedupe_passes_each_key_once_per_window(control: StormControl) -> None:
    c = route("    dedupe: {key: '{{ data.sensor }}', window: 60s}")
    envs = [alert(s) for s in ["a", "b", "a", "a", "c", "b"]]
    assert actions(control, c, envs) == ["pass", "pass", "suppress", "suppress", "pass", "suppress"]
    control.clock_obj.now += 61  # type: ignore[attr-defined]
    assert actions(control, c, [alert("a")]) == ["pass"]


async def test_throttle_limits_per_key_and_window(control: StormControl) -> None:
    c = route("    throttle: {key: '{{ data.sensor }}', limit: 2, window: 5m}")
    got = actions(control, c, [alert("a") for _ in range(5)] + [alert("b")])
    assert got == ["pass", "pass", "suppress", "suppress", "suppress", "pass"]
    control.clock_obj.now += 300  # type: ignore[attr-defined]
    assert actions(control, c, [alert("a")]) == ["pass"]


async def test_throttle_then_digest_folds_the_rest_into_one_message(control: StormControl) -> None:
    c = route("    throttle: {key: '{{ data.sensor }}', limit: 1, window: 1m, then: digest}")
    envs = [alert("a", n=i) for i in range(10)]
    decisions = [control.admit(c, e, dict(MessageScope(e))) for e in envs]
    assert [d.action for d in decisions] == ["pass"] + ["digest"] * 9
    for d, e in zip(decisions[1:], envs[1:], strict=True):
        await control.fold(c, d.key, e)
    assert await control.flush_due() == 0  # the window is still open
    control.clock_obj.now += 61  # type: ignore[attr-defined]
    assert await control.flush_due() == 1
    [(route_name, digest)] = control.emitted  # type: ignore[attr-defined]
    assert route_name == "alerts"
    data = digest.data
    assert data["digest"]["count"] == 9 and data["digest"]["key"] == "a"
    assert [e["data"]["n"] for e in data["digest"]["events"]] == list(range(1, 10))
    assert data["n"] == 9  # the last event's fields stay readable by the same templates
    assert digest.attributes["digest"] is True
    assert await control.flush_due() == 0


async def test_alarm_fires_once_on_raise_and_once_on_clear(control: StormControl) -> None:
    c = route("    alarm: {key: '{{ data.sensor }}', raise_when: 'data.t > 90', clear_when: 'data.t < 80'}")
    temps = [70, 95, 97, 99, 85, 79, 75, 91]
    decisions = [control.admit(c, e, dict(MessageScope(e))) for e in (alert("a", t=t) for t in temps)]
    assert [d.action for d in decisions] == ["suppress", "pass", "suppress", "suppress", "suppress", "pass",
                                             "suppress", "pass"]
    assert [d.envelope.attributes["alarm"] for d in decisions if d.envelope] == ["raised", "resolved", "raised"]


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    c = route("    dedupe: {key: '{{ data.sensor }}', window: 1h}\n")

    async def noop(route_name: str, env: Envelope) -> bool:
        return True

    store = SqliteStormStore(str(tmp_path / "s.db"))
    ctl = StormControl(store, noop)
    await ctl.open()
    assert actions(ctl, c, [alert("a")]) == ["pass"]
    await ctl.stop()
    await store.close()
    store2 = SqliteStormStore(str(tmp_path / "s.db"))
    ctl2 = StormControl(store2, noop)
    await ctl2.open()
    assert actions(ctl2, c, [alert("a"), alert("b")]) == ["suppress", "pass"]
    await ctl2.stop()
    await store2.close()


async def test_undo_forgets_a_dedupe_key_when_the_message_could_not_be_stored(control: StormControl) -> None:
    c = route("    dedupe: {key: '{{ data.sensor }}', window: 1h}")
    d = control.admit(c, alert("a"), dict(MessageScope(alert("a"))))
    assert d.action == "pass" and d.undo is not None
    d.undo()
    assert actions(control, c, [alert("a")]) == ["pass"]


def test_bad_controls_are_config_errors() -> None:
    from gateway.config.yamlsrc import ConfigError

    with pytest.raises(ConfigError) as info:
        route("    alarm: {raise_when: 'data.t >', clear_when: 'data.t < 1'}")
    assert "routes[0].alarm" in str(info.value)


async def fold_all(ctl: StormControl, c, envs: list[Envelope]) -> None:  # type: ignore[no-untyped-def]
    for e in envs:
        d = ctl.admit(c, e, dict(MessageScope(e)))
        assert d.action == "digest"
        await ctl.fold(c, d.key, e)


async def test_a_digest_lists_up_to_max_listed_and_counts_every_event(control: StormControl) -> None:
    c = route("    digest: {key: '{{ data.sensor }}', window: 1m, max_listed: 3}")
    await fold_all(control, c, [alert("a", n=i) for i in range(10)])
    control.clock_obj.now += 61  # type: ignore[attr-defined]
    assert await control.flush_due() == 1
    [(_, digest)] = control.emitted  # type: ignore[attr-defined]
    summary = json.loads(digest.body)["digest"]
    assert summary["count"] == 10 and summary["listed"] == 3
    assert [e["data"]["n"] for e in summary["events"]] == [0, 1, 2]


async def test_max_listed_defaults_to_a_thousand(control: StormControl) -> None:
    c = route("    throttle: {key: '{{ data.sensor }}', limit: 1, window: 1m, then: digest}")
    envs = [alert("a", n=i) for i in range(1102)]
    assert control.admit(c, envs[0], dict(MessageScope(envs[0]))).action == "pass"
    await fold_all(control, c, envs[1:])
    control.clock_obj.now += 61  # type: ignore[attr-defined]
    assert await control.flush_due() == 1
    summary = control.emitted[0][1].data["digest"]  # type: ignore[attr-defined]
    assert (summary["count"], summary["listed"], len(summary["events"])) == (1101, 1000, 1000)


def io_written() -> int:
    """Bytes this process has handed to write() so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


async def test_storing_an_event_costs_the_same_late_in_a_window_as_early(control: StormControl) -> None:
    c = route("    digest: {key: '{{ data.sensor }}', window: 1h}")
    payload = "x" * 200
    early0 = io_written()
    await fold_all(control, c, [alert("a", n=i, p=payload) for i in range(100)])
    early = io_written() - early0
    await fold_all(control, c, [alert("a", n=i, p=payload) for i in range(100, 900)])
    late0 = io_written()
    await fold_all(control, c, [alert("a", n=i, p=payload) for i in range(900, 1000)])
    late = io_written() - late0
    # Rewriting the window on every event made the 900th..1000th cost about ten times the first hundred.
    assert late < 2 * early, (early, late)


async def test_a_window_open_at_a_restart_is_sent_after_it_with_every_event(tmp_path: Path) -> None:
    c = route("    digest: {key: '{{ data.sensor }}', window: 1m, max_listed: 50}")
    clock = Clock()
    emitted: list[Envelope] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append(env)
        return True

    store = SqliteStormStore(str(tmp_path / "s.db"))
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    await fold_all(ctl, c, [alert("a", n=i) for i in range(60)])
    await ctl.stop()
    await store.close()

    store = SqliteStormStore(str(tmp_path / "s.db"))
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    await fold_all(ctl, c, [alert("a", n=i) for i in range(60, 65)])  # the same window goes on
    assert await ctl.flush_due() == 0
    clock.now += 61
    assert await ctl.flush_due() == 1
    await ctl.stop()
    await store.close()
    [digest] = emitted
    summary = digest.data["digest"]
    assert (summary["count"], summary["listed"]) == (65, 50)
    assert [e["data"]["n"] for e in summary["events"]] == list(range(50))
    assert digest.data["n"] == 64


async def test_a_digest_that_could_not_be_sent_is_sent_again_with_its_id(tmp_path: Path) -> None:
    c = route("    digest: {key: '{{ data.sensor }}', window: 1m}")
    clock = Clock()
    answers = [False, True, True]
    emitted: list[Envelope] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append(env)
        return answers.pop(0)

    store = SqliteStormStore(str(tmp_path / "s.db"))
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    await fold_all(ctl, c, [alert("a", n=i) for i in range(3)])
    clock.now += 61
    assert await ctl.flush_due() == 0
    await fold_all(ctl, c, [alert("a", n=i) for i in range(3, 5)])  # a new window meanwhile
    assert await ctl.flush_due() == 1
    clock.now += 61
    assert await ctl.flush_due() == 1
    await ctl.stop()
    await store.close()
    first, again, second = emitted
    assert again.id == first.id and second.id != first.id
    assert [e.data["digest"]["count"] for e in emitted] == [3, 3, 2]


async def test_state_files_of_the_single_table_layout_are_taken_up(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    last = alert("a", n=2)
    events = [{"id": f"e{i}", "subject": "/plant/a/alert", "time": f"2024-01-01T00:00:0{i}+00:00",
               "data": {"sensor": "a", "n": i}} for i in range(3)]
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE kv (kind TEXT, route TEXT, key TEXT, value TEXT, PRIMARY KEY (kind, route, key))")
        db.execute("INSERT INTO kv VALUES ('alarm', 'alerts', 'a', 'true')")
        db.execute("INSERT INTO kv VALUES ('digest', 'alerts', 'a', ?)", (json.dumps(
            {"window_end": 1_000_030.0, "events": events, "count": 7, "first": 999_990.0, "last": 999_999.0,
             "last_env": last.to_json()}),))
    clock = Clock()
    emitted: list[Envelope] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append(env)
        return True

    store = SqliteStormStore(str(path))
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    alarm = route("    alarm: {key: '{{ data.sensor }}', raise_when: 'data.n > 1', clear_when: 'data.n < 0'}")
    assert actions(ctl, alarm, [alert("a", n=5)]) == ["suppress"]  # still raised: not raised again
    clock.now += 31
    assert await ctl.flush_due() == 1
    await ctl.stop()
    await store.close()
    summary = emitted[0].data["digest"]
    assert summary["count"] == 7 and [e["data"]["n"] for e in summary["events"]] == [0, 1, 2]


def test_max_listed_is_bounded() -> None:
    from gateway.config.yamlsrc import ConfigError

    with pytest.raises(ConfigError) as info:
        route("    digest: {max_listed: 1000000}")
    assert "max_listed" in str(info.value) and "10000" in str(info.value)


async def test_a_window_that_ends_while_an_event_is_being_written_keeps_that_event(tmp_path: Path) -> None:
    """The window's end comes while a fold's group commit is still pending: the digest waits for
    the commit, so the acknowledged event is in it (it was read without it, then forgotten)."""

    class SlowStore(SqliteStormStore):
        gate = asyncio.Event()

        async def add_to_digest(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if args[2] is not None and args[2] == 2:  # the third listed event: hold its commit
                await self.gate.wait()
            return await super().add_to_digest(*args, **kwargs)

    store = SlowStore(str(tmp_path / "s.db"))
    emitted: list[Envelope] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append(env)
        return True

    clock = Clock()
    ctl = StormControl(store, emit, clock=clock)
    await ctl.open()
    try:
        c = route("    digest: {key: '{{ data.sensor }}', window: 1m}")
        envs = [alert("a", n=i) for i in range(3)]
        keys = [ctl.admit(c, e, dict(MessageScope(e))).key for e in envs]
        await ctl.fold(c, keys[0], envs[0])
        await ctl.fold(c, keys[1], envs[1])
        pending = asyncio.ensure_future(ctl.fold(c, keys[2], envs[2]))  # acknowledged once it returns
        await asyncio.sleep(0.05)
        clock.now += 61
        flushing = asyncio.ensure_future(ctl.flush_due())
        await asyncio.sleep(0.05)
        SlowStore.gate.set()
        await pending
        await flushing
        await ctl.flush_due()
        [digest] = emitted
        assert digest.data["digest"]["count"] == 3
        assert [e["data"]["n"] for e in digest.data["digest"]["events"]] == [0, 1, 2]
    finally:
        await ctl.stop()
        await store.close()
