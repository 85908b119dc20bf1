"""Hot reload against a real in-process gateway over real sockets: routes.yaml replaced 20 times
under a steady REST stream (invalid versions and connector changes included) with lost = 0,
a ConfigMap-style symlink swap, and SIGHUP + the file watcher of a real `gateway run` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.reload import ReloadRefused, version_of, watch
from gateway.runtime import Runtime
from tests.gwtest import free_port, jsonl, running_gateway, wait_for

pytestmark = pytest.mark.integration


def render(tmp_path: Path, api: int, admin: int, k: int, *, target: str, max_body: str = "1MiB",
           keep: int = 5, broken: str = "", mqtt: int | None = None, mqtt_inflight: int = 256) -> str:
    """Version k of the config: routes send to `target` and tag each message `v<k>`."""
    plant = f"""\
  plant:
    type: mqtt
    url: "mqtt://127.0.0.1:{mqtt}"
    client_id: gw-reload-test
    subscribe: ["load/#"]
    qos: 1
    max_inflight: {mqtt_inflight}
    content_type: application/json
""" if mqtt else ""
    plant_route = f"""\
  - name: plant
    from: plant
    match: {{subject: "load/#"}}
    to:
      - connector: {target}
        headers: {{x-config: "v{k}"}}
""" if mqtt else ""
    text = f"""\
# version {k}
gateway:
  admin: {{listen: "127.0.0.1:{admin}"}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  drain: 3s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
    max_body: {max_body}
  out-a: {{type: file, path: "{tmp_path / 'a.jsonl'}", keep: {keep}, max_bytes: 1GiB}}
  out-b: {{type: file, path: "{tmp_path / 'b.jsonl'}", max_bytes: 1GiB}}
{plant}routes:
  - name: events
    from: api
    match: {{subject: "/events/**"}}
    to:
      - connector: {target}
        headers: {{x-config: "v{k}"}}
{plant_route}"""
    if broken == "reference":
        text = text.replace(f"connector: {target}", "connector: out-c", 1)
    elif broken == "syntax":
        text = text.replace("routes:\n", "routes:\n  - name: [unclosed\n")
    return text


def replace_file(path: Path, text: str) -> None:
    """Like an editor or kubectl: write beside, then rename over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Sent:
    id: str
    started: float
    ended: float


@dataclass
class Load:
    url: str
    acked: list[Sent] = field(default_factory=list)
    retries: int = 0
    unexpected: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def sender(self, n: int) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            seq = 0
            while not self.stop.is_set():
                seq += 1
                body = {"sender": n, "seq": seq}
                started = time.monotonic()
                for _attempt in range(200):  # a 503 asks us to retry; anything else must not happen
                    try:
                        r = await client.post(f"{self.url}/events/{n}/{seq}", json=body)
                    except httpx.TransportError as exc:
                        self.unexpected.append(f"transport: {exc!r}")
                        await asyncio.sleep(0.05)
                        continue
                    if r.status_code == 202:
                        self.acked.append(Sent(r.json()["id"], started, time.monotonic()))
                        break
                    if r.status_code == 503:
                        self.retries += 1
                        await asyncio.sleep(0.02)
                        continue
                    self.unexpected.append(f"{r.status_code}: {r.text[:200]}")
                    break
                await asyncio.sleep(0.003)


def read_out(tmp_path: Path) -> dict[str, list[tuple[str, str]]]:
    """message key -> [(file, x-config)] for every line written. The key is the envelope id for
    REST (the id the 202 answered) and ``mqtt:<seq>`` for MQTT (each delivery gets a new id)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name in ("a", "b"):
        for rec in jsonl(tmp_path / f"{name}.jsonl"):
            key = rec["id"]
            if rec["source"] == "plant":
                key = f"mqtt:{json.loads(rec['body'])['mseq']}"
            found.setdefault(key, []).append((f"out-{name}", rec["headers"].get("x-config", "")))
    return found


class MqttLoad:
    """Publishes QoS 1 messages steadily from a thread; `acked` holds those the broker PUBACKed."""

    def __init__(self, port: int):
        from tests.integration.test_mqtt_amqp import MqttProbe

        self.probe = MqttProbe(port)
        self.acked: list[int] = []
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                self.probe.publish(f"load/{seq % 7}", json.dumps({"mseq": seq}), qos=1)
                self.acked.append(seq)
            except AssertionError as exc:
                self.failed.append(str(exc))
            time.sleep(0.005)
        self.probe.close()


def applied(rt: Runtime, version: str) -> bool:
    """The reload to ``version`` finished (routes swap before the connectors are all done)."""
    return rt.reloader.status.outcome == "applied" and rt.reloader.status.version == version


def reloads(rt: Runtime, outcome: str) -> float:
    return rt.metrics.registry.get_sample_value("gateway_config_reloads_total", {"outcome": outcome}) or 0.0


async def test_reload_under_load_loses_nothing_and_routes_by_version(tmp_path: Path) -> None:
    from tests.integration.test_mqtt import mosquitto

    api, admin = free_port(), free_port()
    with mosquitto(tmp_path / "mosquitto") as mqtt_port:
        await _reload_under_load(tmp_path, api, admin, mqtt_port)


async def _reload_under_load(tmp_path: Path, api: int, admin: int, mqtt_port: int) -> None:
    def version(k: int, broken: str = "") -> str:
        # Every 5th version changes the REST inbound (restart), every 5th+2 an outbound file
        # connector, every 5th+4 the MQTT inbound (same client id: its persistent session holds
        # what arrives meanwhile); versions 3, 7, 11... are invalid.
        return render(tmp_path, api, admin, k, target="out-a" if k % 2 == 0 else "out-b",
                      max_body="2MiB" if k % 5 == 0 else "1MiB", keep=3 if k % 5 == 2 else 5,
                      mqtt=mqtt_port, mqtt_inflight=128 if k % 5 == 4 else 256, broken=broken)

    async with running_gateway(tmp_path, version(0)) as rt:
        path = Path(rt.config_path or "")
        watcher = asyncio.create_task(watch(rt.reloader, str(path), debounce_ms=50, poll_seconds=1.0))
        out_b = rt.slots["out-b"].connector
        load = Load(f"http://127.0.0.1:{api}")
        mqtt_load = MqttLoad(mqtt_port)
        senders = [asyncio.create_task(load.sender(n)) for n in range(8)]
        publisher = asyncio.create_task(asyncio.to_thread(mqtt_load.run))
        valid: dict[str, int] = {rt.config.version: 0}
        invalid: set[str] = set()
        # Windows in which exactly one version was live, as the test observed it: (version k, from, to).
        windows: list[tuple[int, float, float]] = []
        live_since = time.monotonic()
        restarted: set[str] = set()
        try:
            await wait_for(lambda: len(load.acked) > 20 and len(mqtt_load.acked) > 20, timeout=10,
                           what="traffic before the first reload")
            for k in range(1, 21):
                kind = "syntax" if k % 8 == 3 else "reference" if k % 4 == 3 else ""
                text = version(k, kind)
                ver = version_of(text)
                before_invalid = reloads(rt, "invalid")
                await asyncio.sleep(0.15)  # let traffic flow under the current version
                windows.append((valid[rt.config.version], live_since, time.monotonic()))
                replace_file(path, text)
                if kind:
                    invalid.add(ver)
                    await wait_for(lambda b=before_invalid: reloads(rt, "invalid") > b, timeout=10,  # type: ignore[misc]
                                   what=f"version {k} to be refused")
                    assert rt.config.version != ver
                else:
                    await wait_for(lambda v=ver: applied(rt, v), timeout=15,  # type: ignore[misc]
                                   what=f"version {k} to go live")
                    valid[ver] = k
                    restarted.update(rt.reloader.status.result.get("restarted", []))
                live_since = time.monotonic()
            await asyncio.sleep(0.15)
            windows.append((valid[rt.config.version], live_since, time.monotonic()))
        finally:
            load.stop.set()
            mqtt_load.stop.set()
            await asyncio.gather(*senders, publisher)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        acked = {s.id: s for s in load.acked}
        expected = set(acked) | {f"mqtt:{n}" for n in mqtt_load.acked}

        def all_written() -> bool:
            return expected <= set(read_out(tmp_path))

        with contextlib.suppress(AssertionError):
            await wait_for(all_written, timeout=30, what="every acknowledged message to be delivered")
        out = read_out(tmp_path)
        lost = expected - set(out)
        duplicated = {i: w for i, w in out.items() if len(w) > 1}
        unexpected_ids = set(out) - expected
        print(f"\nreload under load: REST {len(acked)} + MQTT {len(mqtt_load.acked)} acknowledged, "
              f"lost {len(lost)}, duplicated {len(duplicated)}, unexpected {len(unexpected_ids)}, "
              f"REST 503 retries {load.retries}, restarted {sorted(restarted)}")
        assert not load.unexpected, load.unexpected[:5]
        assert not mqtt_load.failed, mqtt_load.failed[:5]
        assert not lost, sorted(lost)[:20]
        # MQTT may deliver a message again after an inbound restart (at least once); REST never.
        assert not unexpected_ids - {k for k in out if k.startswith("mqtt:")}
        assert len(acked) > 200 and len(mqtt_load.acked) > 200
        assert restarted == {"api", "out-a", "plant"}, "connector-changing versions restarted exactly those"
        assert rt.slots["out-b"].connector is out_b, "an unchanged connector keeps its instance"
        assert reloads(rt, "invalid") == len(invalid) and reloads(rt, "applied") == len(valid) - 1
        # Every message went where the version it was routed under says, and invalid ones never did.
        tags = {f"v{k}": k for k in valid.values()}
        for key, writes in out.items():
            for connector, tag in writes:
                assert tag in tags, f"{key} was routed under {tag!r}, which never went live"
                assert connector == ("out-a" if tags[tag] % 2 == 0 else "out-b"), f"{key} tagged {tag} in {connector}"
        # A REST message sent and acknowledged while only version k was live carries version k.
        checked = 0
        for k, start, end in windows:
            for s in load.acked:
                if s.started >= start and s.ended <= end:
                    assert out[s.id][0][1] == f"v{k}", (s.id, k, out[s.id])
                    checked += 1
        assert checked > 50
        assert {e.version for e in rt.reloader.history.entries()} & invalid == set()


async def test_configmap_symlink_swap_triggers_a_reload(tmp_path: Path) -> None:
    """Kubernetes mounts routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>/, and updates by
    writing a new timestamped directory and renaming a new ..data symlink over the old one."""
    api, admin = free_port(), free_port()
    mount = tmp_path / "config"
    mount.mkdir()
    v1 = render(tmp_path, api, admin, 1, target="out-a")
    stamp1 = mount / "..2026_01_01_00_00_00.000000001"
    stamp1.mkdir()
    (stamp1 / "routes.yaml").write_text(v1)
    (mount / "..data").symlink_to(stamp1.name)
    (mount / "routes.yaml").symlink_to("..data/routes.yaml")
    async with running_gateway(tmp_path, v1) as rt:
        rt.config_path = str(mount / "routes.yaml")
        watcher = asyncio.create_task(watch(rt.reloader, rt.config_path, debounce_ms=50, poll_seconds=0.5))
        try:
            await asyncio.sleep(0.3)
            assert rt.config.version == version_of(v1)
            v2 = render(tmp_path, api, admin, 2, target="out-b")
            stamp2 = mount / "..2026_01_01_00_01_00.000000002"
            stamp2.mkdir()
            (stamp2 / "routes.yaml").write_text(v2)
            (mount / "..data_tmp").symlink_to(stamp2.name)
            os.replace(mount / "..data_tmp", mount / "..data")
            for p in stamp1.iterdir():
                p.unlink()
            stamp1.rmdir()
            await wait_for(lambda: applied(rt, version_of(v2)), timeout=10, what="the swap to be applied")
            assert rt.reloader.status.by == "file"
            assert rt.config.router.routes[0].targets[0].connector == "out-b"
            # A swap to an invalid version is refused and the running one stays.
            v3 = render(tmp_path, api, admin, 3, target="out-a", broken="reference")
            stamp3 = mount / "..2026_01_01_00_02_00.000000003"
            stamp3.mkdir()
            (stamp3 / "routes.yaml").write_text(v3)
            (mount / "..data_tmp").symlink_to(stamp3.name)
            before = reloads(rt, "invalid")
            os.replace(mount / "..data_tmp", mount / "..data")
            await wait_for(lambda: reloads(rt, "invalid") == before + 1, timeout=10, what="the bad swap refused")
            await asyncio.sleep(1.5)  # three polls
            assert reloads(rt, "invalid") == before + 1, "one bad version is counted once"
            assert rt.config.version == version_of(v2)
            # The file holds an edit that is not live: the admin API must not overwrite it.
            with pytest.raises(ReloadRefused, match="not live"):
                await rt.reloader.save_and_apply(v2.replace("# version 2", "# edited"), base=version_of(v2), by="t")
            # Fixed by the next swap; then a write through the symlink keeps the link.
            v4 = render(tmp_path, api, admin, 4, target="out-a")
            (stamp3 / "routes.yaml").write_text(v4)
            await wait_for(lambda: applied(rt, version_of(v4)), timeout=10, what="the fixed file applied")
            result = await rt.reloader.save_and_apply(v4.replace("# version 4", "# edited"),
                                                      base=version_of(v4), by="test")
            assert result["outcome"] == "applied"
            assert (mount / "routes.yaml").is_symlink() and "# edited" in (stamp3 / "routes.yaml").read_text()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def test_changed_inbound_connector_answers_503_never_404_while_restarting(tmp_path: Path) -> None:
    api, admin = free_port(), free_port()
    async with running_gateway(tmp_path, render(tmp_path, api, admin, 0, target="out-a")) as rt:
        old_api, old_b = rt.slots["api"].connector, rt.slots["out-b"].connector
        statuses: list[int] = []
        stop = asyncio.Event()

        async def hammer() -> None:
            async with httpx.AsyncClient(timeout=5) as c:
                while not stop.is_set():
                    r = await c.post(f"http://127.0.0.1:{api}/events/x", json={})
                    statuses.append(r.status_code)

        tasks = [asyncio.create_task(hammer()) for _ in range(3)]
        try:
            await wait_for(lambda: len(statuses) > 10, timeout=5)
            for k, size in ((1, "2MiB"), (2, "3MiB"), (3, "4MiB")):
                path = Path(rt.config_path or "")
                replace_file(path, render(tmp_path, api, admin, k, target="out-a", max_body=size))
                result = await rt.reload_from_file()
                assert result["restarted"] == ["api"] and result["connectors"]["api"]["state"] == "up"
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        assert rt.slots["api"].connector is not old_api and rt.slots["out-b"].connector is old_b
        assert set(statuses) <= {202, 503}, sorted(set(statuses))
        assert statuses.count(202) > 10


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"gateway exited with {proc.returncode}: {err}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")


def _version(admin: int) -> Any:
    return httpx.get(f"http://127.0.0.1:{admin}/api/config", timeout=5).json()


def test_sighup_and_file_watch_in_a_real_process(tmp_path: Path) -> None:
    api, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    v1 = render(tmp_path, api, admin, 1, target="out-a")
    path.write_text(v1)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        _wait_http(f"http://127.0.0.1:{admin}/readyz", proc)
        assert _version(admin)["version"] == version_of(v1)
        # The watcher picks up an edit.
        v2 = render(tmp_path, api, admin, 2, target="out-b")
        replace_file(path, v2)
        end = time.monotonic() + 15
        while _version(admin)["version"] != version_of(v2) and time.monotonic() < end:
            time.sleep(0.1)
        cfg = _version(admin)
        assert cfg["version"] == version_of(v2) and cfg["last_reload"]["by"] == "file"
        # SIGHUP re-reads the file even when nothing changed: the outcome is confirmed.
        proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 10
        while _version(admin)["last_reload"]["by"] != "sighup" and time.monotonic() < end:
            time.sleep(0.1)
        cfg = _version(admin)
        assert cfg["last_reload"]["by"] == "sighup" and cfg["last_reload"]["outcome"] == "unchanged"
        # An invalid edit is refused; the metric says so; the process keeps serving v2.
        replace_file(path, render(tmp_path, api, admin, 3, target="out-a", broken="syntax"))
        end = time.monotonic() + 10
        while _version(admin)["last_reload"]["outcome"] != "invalid" and time.monotonic() < end:
            time.sleep(0.1)
        cfg = _version(admin)
        assert cfg["last_reload"]["outcome"] == "invalid" and cfg["version"] == version_of(v2)
        assert cfg["last_reload"]["errors"][0]["line"] is not None
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
        assert 'gateway_config_reloads_total{outcome="invalid"} 1.0' in metrics
        assert f'gateway_config_info{{version="{version_of(v2)}"}} 1.0' in metrics
        r = httpx.post(f"http://127.0.0.1:{api}/events/1", json={"a": 1})
        assert r.status_code == 202
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


async def test_a_file_caught_empty_while_being_rewritten_is_not_applied(tmp_path: Path) -> None:
    """An editor or script that truncates routes.yaml and then writes it leaves an empty file for a
    moment; the watcher may read it then. Applying it would stop every listener and route."""
    api, admin = free_port(), free_port()
    v1 = render(tmp_path, api, admin, 1, target="out-a")
    path = tmp_path / "routes.yaml"
    path.write_text(v1)
    async with running_gateway(tmp_path, v1) as rt:
        rt.config_path = str(path)
        watcher = asyncio.create_task(watch(rt.reloader, rt.config_path, debounce_ms=50, poll_seconds=0.5))
        try:
            await asyncio.sleep(0.3)
            before = reloads(rt, "invalid")
            path.write_text("")
            await wait_for(lambda: reloads(rt, "invalid") == before + 1, timeout=10, what="the empty file refused")
            assert rt.config.version == version_of(v1)
            assert rt.reloader.status.errors[0]["message"].startswith("the file has no connectors and no routes")
            async with httpx.AsyncClient() as client:  # still listening, still routing
                r = await client.post(f"http://127.0.0.1:{api}/events/x", json={"n": 1})
            assert r.status_code == 202, r.text
            v2 = render(tmp_path, api, admin, 2, target="out-b")
            path.write_text(v2)  # the rest of the write arrives
            await wait_for(lambda: applied(rt, version_of(v2)), timeout=10, what="the whole file applied")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
