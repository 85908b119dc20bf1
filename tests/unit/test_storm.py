"""Alert-storm control: the exact number of messages each control lets through, with a fake clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config.loader import load_config_text
from gateway.envelope import Envelope
from gateway.routing.router import MessageScope
from gateway.routing.storm import StormControl, StormState


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
    state = StormState(str(tmp_path / "storm.db"))
    await state.open()
    emitted: list[tuple[str, Envelope]] = []

    async def emit(route_name: str, env: Envelope) -> bool:
        emitted.append((route_name, env))
        return True

    clock = Clock()
    ctl = StormControl(state, emit, clock=clock)
    ctl.emitted = emitted  # type: ignore[attr-defined]
    ctl.clock_obj = clock  # type: ignore[attr-defined]
    yield ctl
    await ctl.stop()
    await state.close()


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

    state = StormState(str(tmp_path / "s.db"))
    await state.open()
    ctl = StormControl(state, noop)
    assert actions(ctl, c, [alert("a")]) == ["pass"]
    await ctl.stop()
    await state.close()
    state2 = StormState(str(tmp_path / "s.db"))
    await state2.open()
    ctl2 = StormControl(state2, noop)
    assert actions(ctl2, c, [alert("a"), alert("b")]) == ["suppress", "pass"]
    await ctl2.stop()
    await state2.close()


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
