"""The MQTT connector against real Mosquitto brokers, through a real in-process gateway."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from connectors.mqtt import MqttTarget
from gateway.config.loader import load_config
from gateway.contract import PermanentError, Target
from gateway.envelope import Envelope
from gateway.registry import Registry
from gateway.runtime import Runtime
from tests.faultproxy import FaultProxy
from tests.gwtest import free_port, running_gateway, wait_for, write_config
from tests.integration.test_mqtt_amqp import RestPeer, gateway_yaml, mqtt_probe, require_port, unique

pytestmark = pytest.mark.integration


# --- a private Mosquitto ---------------------------------------------------------------------


class Mosquitto:
    """Our own Mosquitto on a free loopback port with a config that never drops messages:
    persistence on, no queue limit (the default of 1,000 per client drops silently)."""

    def __init__(self, tmp: Path, extra: str = "", *, port: int | None = None):
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed: apt-get install -y mosquitto mosquitto-clients")
        self.tmp = tmp
        self.port = port or free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"""
user root
per_listener_settings true
persistence true
persistence_location {tmp}/
autosave_interval 1
max_queued_messages 0
max_inflight_messages 0
log_dest file {tmp}/mosquitto.log
listener {self.port} 127.0.0.1
allow_anonymous true
{extra}
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            _wait_port(self.port, self.proc, self.tmp)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM: Mosquitto saves its persistence file and exits."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None


@contextmanager
def mosquitto(tmp: Path, extra: str = "", *, port: int | None = None) -> Iterator[int]:
    broker = Mosquitto(tmp, extra, port=port)
    broker.start()
    try:
        yield broker.port
    finally:
        broker.stop()


def _wait_port(port: int, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    import socket

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (tmp / "mosquitto.log").read_text() if (tmp / "mosquitto.log").exists() else ""
            pytest.fail(f"mosquitto exited: {log[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"mosquitto did not listen on {port}")


# --- readiness: not before the broker confirmed the subscriptions ----------------------------


class _ReadinessAtEvents(logging.Handler):
    """Records what the runtime's readiness said at the very moment a log event was emitted.

    The events are emitted synchronously where the state changes (``connector.up`` right after
    ``listen()`` sent SUBSCRIBE, ``mqtt.connected`` in the CONNACK callback, ``mqtt.subscribed``
    in the SUBACK callback), so this observes those instants without sleeping."""

    def __init__(self, rt: Runtime, connector: str, names: set[str]):
        super().__init__(logging.DEBUG)
        self.rt, self.connector, self.names = rt, connector, names
        self.seen: list[tuple[str, bool, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {}) or {}
        name = record.getMessage()
        if name in self.names and fields.get("connector") == self.connector:
            ready, detail = self.rt.readiness()
            self.seen.append((name, ready, detail["connectors"][self.connector]["detail"]))

    def events(self) -> list[str]:
        return [name for name, _, _ in self.seen]


@asynccontextmanager
async def _runtime_watched(tmp_path: Path, yaml: str, connector: str, names: set[str]) -> AsyncIterator[
        tuple[Runtime, _ReadinessAtEvents]]:
    """A runtime whose readiness is recorded at each of ``names`` from the very first connect."""
    registry = Registry()
    rt = Runtime(load_config(str(write_config(tmp_path, yaml)), registry), registry=registry)
    watch = _ReadinessAtEvents(rt, connector, names)
    log = logging.getLogger("gateway")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(watch)
    try:
        await rt.start()
        try:
            yield rt, watch
        finally:
            await rt.stop()
    finally:
        log.removeHandler(watch)
        log.setLevel(level)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_ready_only_once_the_suback_arrived_and_again_after_a_reconnect(tmp_path: Path, protocol: str) -> None:
    """/readyz must not say yes while a message published to the filters could still pass the
    gateway by: after listen() (SUBSCRIBE sent) and after a reconnect (CONNACK, the session
    kept by the broker) it waits for the SUBACK."""
    require_port(1883, "Mosquitto")
    root = unique("ready")
    out = tmp_path / "out.jsonl"
    async with FaultProxy("127.0.0.1", 1883) as proxy:
        yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{proxy.port}", protocol: "{protocol}", client_id: {unique("gw")},
           session_expiry: 60, reconnect_min: 0.1, reconnect_max: 0.5, subscribe: ["{root}/#"]}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")
        names = {"connector.up", "mqtt.connected", "mqtt.subscribed"}
        async with _runtime_watched(tmp_path, yaml, "plant", names) as (rt, watch):
            await wait_for(lambda: watch.events().count("mqtt.subscribed") == 1, 10, what="the first SUBACK")
            assert watch.events() == ["mqtt.connected", "connector.up", "mqtt.subscribed"]
            (_, ready_listening, why), (_, ready_subscribed, _) = watch.seen[1:]
            assert not ready_listening, "ready before the SUBACK"
            assert "SUBACK" in why and f"{root}/#" in why, why
            assert ready_subscribed

            proxy.cut()  # the connection dies; the connector reconnects by itself (same session)
            await wait_for(lambda: watch.events().count("mqtt.subscribed") == 2, 10, what="the SUBACK after reconnect")
            assert watch.events()[3:] == ["mqtt.connected", "mqtt.subscribed"]
            (_, ready_reconnected, why), (_, ready_resubscribed, _) = watch.seen[3:]
            assert not ready_reconnected, "ready again before the new SUBACK"
            assert "SUBACK" in why, why
            assert ready_resubscribed and rt.readiness()[0]
            async with mqtt_probe(v5=protocol == "5") as probe:
                probe.publish(f"{root}/x", b"after reconnect", qos=1)
                await wait_for(lambda: out.exists() and b"after reconnect" in out.read_bytes(), 5, what="message")


#: The dynamic-security administrator the tests use to change the rules while the broker runs.
DYNSEC_ADMIN = ("dynsec-admin", "admin-secret")


def _dynsec_password(password: str) -> dict[str, Any]:
    """A dynamic-security client password as the plugin stores it (PBKDF2-SHA512, base64)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": 101}


def _dynamic_security(tmp: Path, denied: str) -> str:
    """Mosquitto config lines that make it refuse subscriptions to ``denied`` for anonymous
    clients. Its ``acl_file`` cannot: it grants every subscription and filters at delivery; the
    dynamic-security plugin (shipped with the Debian package) answers SUBACK 0x87 / 0x80.
    ``DYNSEC_ADMIN`` may change the rules at run time (``$CONTROL/dynamic-security/v1``)."""
    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")) + sorted(
        Path("/usr/lib").glob("mosquitto_dynamic_security.so"))
    if not plugins:
        pytest.fail("mosquitto_dynamic_security.so not found (it comes with the mosquitto package)")
    control = "$CONTROL/dynamic-security/#"
    conf = tmp / "dynsec.json"
    conf.write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": True,
                             "unsubscribe": True},
        "clients": [{"username": DYNSEC_ADMIN[0], "roles": [{"rolename": "admin"}],
                     **_dynsec_password(DYNSEC_ADMIN[1])}],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "no-denied"}]}],
        "roles": [{"rolename": "no-denied",
                   "acls": [{"acltype": "subscribePattern", "topic": denied, "priority": 0, "allow": False}]},
                  {"rolename": "admin",
                   "acls": [{"acltype": kind, "topic": control, "priority": 0, "allow": True}
                            for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")]}],
        "anonymousGroup": "anonymous"}))
    return f"plugin {plugins[0]}\nplugin_opt_config_file {conf}\n"


def _dynsec_command(port: int, command: dict[str, Any]) -> dict[str, Any]:
    """Run one dynamic-security command as the administrator; its answer."""
    answers: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("dynsec"))
    client.username_pw_set(*DYNSEC_ADMIN)
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: answers.append(json.loads(m.payload))
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe("$CONTROL/dynamic-security/v1/response", 1)
        assert subscribed.wait(5), "no SUBACK for the dynamic-security responses"
        client.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": [command]}), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    assert answers, "no answer from the dynamic-security plugin"
    return answers[0]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_refused_subscription_keeps_the_connector_unready_with_the_filter_named(
        tmp_path: Path, protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    """Mosquitto refuses a filter its access control denies (SUBACK 0x87 in MQTT 5, 0x80 in
    3.1.1): the connector stays unready, names the filter, logs an error — and still consumes
    the filter that was granted."""
    root = unique("acl")
    out = tmp_path / "out.jsonl"
    with mosquitto(tmp_path / "broker", _dynamic_security(tmp_path, f"{root}/denied/#")) as port:
        yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{port}", protocol: "{protocol}", client_id: {unique("gw")},
           subscribe: ["{root}/allowed/#", "{root}/denied/#"]}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")
        async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
            await wait_for(lambda: any(r.getMessage() == "mqtt.subscribe_refused" for r in caplog.records), 10,
                           what="the refused SUBACK")
            # the granted filter works (and the SUBACK is long processed once its message is through)
            async with mqtt_probe(port=port, v5=protocol == "5") as probe:
                probe.publish(f"{root}/allowed/a", b"granted", qos=1)
                await wait_for(lambda: out.exists() and b"granted" in out.read_bytes(), 5, what="message")
            ready, detail = rt.readiness()
            why = detail["connectors"]["plant"]["detail"]
            assert not ready and not detail["connectors"]["plant"]["up"]
            assert f"'{root}/denied/#'" in why and "refused" in why, why
            assert "allowed" not in why, why
            admin = rt.config.model.gateway.admin.listen
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://{admin}/readyz")
            assert r.status_code == 503 and f"{root}/denied/#" in r.text
    refused = [r for r in caplog.records if r.getMessage() == "mqtt.subscribe_refused"]
    assert refused and all(r.levelno >= logging.WARNING for r in refused)
    assert f"{root}/denied/#" in refused[0].fields["error"]  # type: ignore[attr-defined]


async def test_a_refused_subscription_is_asked_for_again_and_an_access_rule_fixed_on_the_broker_takes_effect(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = unique("acl")
    out = tmp_path / "out.jsonl"
    with mosquitto(tmp_path / "broker", _dynamic_security(tmp_path, f"{root}/denied/#")) as port:
        yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{port}", client_id: {unique("gw")}, reconnect_min: 0.2,
           reconnect_max: 0.5, subscribe: ["{root}/denied/#"]}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")
        async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
            def refusals() -> int:
                return sum(r.getMessage() == "mqtt.subscribe_refused" for r in caplog.records)

            await wait_for(lambda: refusals() >= 3, 10, what="the SUBSCRIBE asked for again, with backoff")
            assert not rt.readiness()[0]
            answer = await asyncio.to_thread(_dynsec_command, port, {
                "command": "removeRoleACL", "rolename": "no-denied", "acltype": "subscribePattern",
                "topic": f"{root}/denied/#"})
            assert "error" not in answer["responses"][0], answer
            await wait_for(lambda: rt.readiness()[0], 10, what="ready once the broker grants the filter")
            async with mqtt_probe(port=port) as probe:
                probe.publish(f"{root}/denied/a", b"now allowed", qos=1)
                await wait_for(lambda: out.exists() and b"now allowed" in out.read_bytes(), 5, what="message")
    waits = [r.fields["retry_in"] for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "mqtt.subscribe_refused"]
    # doubling from reconnect_min up to reconnect_max, each wait 50-100 % of its bound (jitter)
    bounds = [0.2, 0.4, 0.5]
    assert len(waits) >= 3 and all(b / 2 - 0.01 <= w <= b + 0.01 for w, b in zip(waits, bounds, strict=False)), waits



# --- inbound ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_wildcards_qos_and_properties_reach_the_route(tmp_path: Path, protocol: str) -> None:
    root = unique("site")
    out = tmp_path / "out.jsonl"
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, protocol: "{protocol}", client_id: {unique("gw")}, session_expiry: 60,
           subscribe: ["{root}/+/alert", {{filter: "{root}/hall/#", qos: 2}}]}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: all
    from: plant
    match: {subject: ["SITE/+/alert", "SITE/hall/#"]}
    to: [{connector: out}]
""".replace("SITE", root))
    v5 = protocol == "5"
    async with running_gateway(tmp_path, yaml), mqtt_probe(v5=v5) as probe:
        probe.publish(f"{root}/a/alert", b'{"n": 0}', qos=0)
        probe.publish(f"{root}/b/alert", b'{"n": 1}', qos=1, user=[("k", "v"), ("k", "w")],
                      content_type="application/json", correlation=b"c1", response_topic=f"{root}/r")
        probe.publish(f"{root}/hall/x/y", b'{"n": 2}', qos=2)
        probe.publish(f"{root}/a/other", b'{"n": 3}', qos=1)  # matches no subscription
        await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, 10, what="3 lines")
        await asyncio.sleep(0.3)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_n = {json.loads(x["body"])["n"]: x for x in lines}
    assert sorted(by_n) == [0, 1, 2]
    assert by_n[0]["attributes"]["mqtt.qos"] == 0
    assert by_n[2]["attributes"]["mqtt.qos"] == 2
    assert by_n[2]["subject"] == f"{root}/hall/x/y"
    one = by_n[1]
    assert one["attributes"]["mqtt.topic"] == f"{root}/b/alert"
    if v5:
        assert one["headers"] == {"k": "v, w"}
        assert one["content_type"] == "application/json"
        assert one["correlation_id"] == "c1"
        assert one["reply_to"] == f"{root}/r"
    else:
        assert one["headers"] == {} and one["content_type"] == "application/octet-stream"


@pytest.mark.parametrize("qos", [1, 2])
async def test_retry_outcome_keeps_message_unacknowledged_and_the_broker_redelivers_it(tmp_path: Path,
                                                                                        qos: int) -> None:
    """Direct route to a REST peer that keeps failing: the gateway retries the hand-over (same
    envelope id) without PUBACK/PUBREC; stopped and started again with the same session, the
    broker redelivers the message, and this time it is delivered."""
    root = unique("retry")
    client_id = unique("gw")

    def yaml(url: str) -> str:
        return gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {client_id}, session_expiry: 60, qos: {qos}, subscribe: ["{root}/#"]}}
  api: {{type: rest, base_url: "{url}"}}
""", """
  - name: direct
    from: plant
    mode: direct
    to: [{connector: api, path: /in}]
""")

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with RestPeer(lambda seen, n: (503, b"{}")) as failing, mqtt_probe() as probe:
        async with running_gateway(tmp_path / "one", yaml(failing.url)):
            probe.publish(f"{root}/x", b'{"v": 1}', qos=qos)
            await wait_for(lambda: len(failing.seen) >= 3, 10, what="retries")
        assert {s.headers["idempotency-key"] for s in failing.seen} == {failing.seen[0].headers["idempotency-key"]}
        async with RestPeer() as working, running_gateway(tmp_path / "two", yaml(working.url)):
            await wait_for(lambda: working.seen, 10, what="the redelivered message")
            await asyncio.sleep(0.3)
    assert [s.body for s in working.seen] == [b'{"v": 1}']


async def test_persistent_session_keeps_messages_while_the_gateway_is_away(tmp_path: Path) -> None:
    root = unique("away")
    out = tmp_path / "out.jsonl"
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60, subscribe: ["{root}/#"]}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    async with mqtt_probe() as probe:
        async with running_gateway(tmp_path / "one", yaml):
            probe.publish(f"{root}/0", b'{"n": 0}', qos=1)
            await wait_for(out.exists, 5, what="first message")
        for n in range(1, 6):  # the gateway is away
            probe.publish(f"{root}/{n}", json.dumps({"n": n}), qos=1 + n % 2)
        async with running_gateway(tmp_path / "two", yaml):
            await wait_for(lambda: len(out.read_text().splitlines()) >= 6, 10, what="the queued messages")
    got = sorted(json.loads(json.loads(line)["body"])["n"] for line in out.read_text().splitlines())
    assert got == list(range(6))


async def test_payload_over_limit_goes_to_dead_letters_and_is_acknowledged(tmp_path: Path) -> None:
    root = unique("big")
    out = tmp_path / "out.jsonl"
    client_id = unique("gw")
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {client_id}, session_expiry: 60, subscribe: ["{root}/#"], max_payload: 1KiB}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")
    async with mqtt_probe() as probe:
        async with running_gateway(tmp_path, yaml) as rt:
            probe.publish(f"{root}/x", b"x" * 1025, qos=1)
            probe.publish(f"{root}/x", b"small", qos=1)
            await wait_for(out.exists, 10, what="the small message")
            if getattr(rt.slots["plant"].connector.ctx, "dead_letter", None) is not None:
                # the runtime offers the core's dead letters to connectors
                await wait_for(rt.spool.dead_letters, 5, what="the dead letter")
                [dead] = await rt.spool.dead_letters()
                reason, error, env = dead.reason, dead.last_error, json.loads(dead.envelope)
            else:  # until then: the connector's own fsync'd dead-letter file
                dl = Path(rt.config.model.gateway.state_dir) / "plant" / "dead-letters.jsonl"
                await wait_for(dl.exists, 5, what="the dead letter")
                [line] = dl.read_text().splitlines()
                entry = json.loads(line)
                reason, error, env = entry["reason"], entry["error"], entry["envelope"]
        assert reason == "too_large" and "1025 bytes" in error
        assert env["attributes"]["mqtt.topic"] == f"{root}/x"
        # acknowledged: a restart with the same session gets nothing again
        (tmp_path / "again").mkdir()
        async with running_gateway(tmp_path / "again", yaml.replace(str(out), str(tmp_path / "again.jsonl"))):
            await asyncio.sleep(1.0)
        assert not (tmp_path / "again.jsonl").exists()


async def test_shared_subscription_splits_messages_between_replicas(tmp_path: Path) -> None:
    root = unique("shared")
    group = unique("g")
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]

    def yaml(i: int) -> str:
        return gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60, share: {group}, subscribe: ["{root}/+"]}}
  out: {{type: file, path: "{outs[i]}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with running_gateway(tmp_path / "a", yaml(0)), running_gateway(tmp_path / "b", yaml(1)), \
            mqtt_probe() as probe:
        for i in range(40):
            probe.publish(f"{root}/{i % 4}", json.dumps({"i": i}), qos=1)

        def total() -> int:
            return sum(len(o.read_text().splitlines()) for o in outs if o.exists())

        await wait_for(lambda: total() >= 40, 10, what="40 messages")
        await asyncio.sleep(0.5)
    got = [json.loads(json.loads(line)["body"])["i"] for o in outs for line in o.read_text().splitlines()]
    assert sorted(got) == list(range(40))  # each message exactly once across the two replicas
    assert all(o.exists() and o.read_text() for o in outs)  # and both replicas took a share


# --- outbound --------------------------------------------------------------------------------


async def test_rest_to_mqtt_publishes_with_properties_and_refuses_topic_injection(tmp_path: Path) -> None:
    root = unique("pub")
    port = free_port()
    yaml = gateway_yaml(f"""
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60}}
""", f"""
  - name: api-to-plant
    from: api
    mode: direct
    to:
      - connector: plant
        topic: "{root}/{{{{ data.site }}}}/cmd"
        qos: 2
        retain: false
        message_expiry: 60
        response_topic: "{root}/replies"
        headers: {{x-origin: "gw-{{{{ data.site | length }}}}"}}
""")
    async with mqtt_probe() as probe:
        probe.subscribe(f"{root}/#", qos=2)
        async with running_gateway(tmp_path, yaml) as rt, httpx.AsyncClient() as http:
            ok = await http.post(f"http://127.0.0.1:{port}/x", json={"site": "s7"})
            assert ok.status_code == 202, ok.text
            for bad in ("a/b", "+", "#", "a\u0000b"):
                r = await http.post(f"http://127.0.0.1:{port}/x", json={"site": bad})
                assert r.status_code == 202 and r.json()["status"] == "dead_lettered", r.text
            await wait_for(lambda: len(probe.messages()) >= 1, 5, what="published message")
            await asyncio.sleep(0.3)
            dead = await rt.spool.dead_letters()
    msgs = probe.messages()
    assert [m.topic for m in msgs] == [f"{root}/s7/cmd"]
    m = msgs[0]
    assert m.qos == 2 and json.loads(m.payload) == {"site": "s7"}
    assert m.props["ContentType"] == "application/json"
    assert m.props["ResponseTopic"] == f"{root}/replies"
    assert 0 < m.props["MessageExpiryInterval"] <= 60
    assert ("x-origin", "gw-2") in m.props["UserProperty"]
    assert len(dead) == 4
    assert all("topic" in d.last_error for d in dead), [d.last_error for d in dead]


async def test_unreachable_broker_leaves_a_gateway_with_a_listener_ready(tmp_path: Path) -> None:
    """The REST listener takes work while the broker is away, so the pod stays in service; the
    MQTT consumer is shown down (``state`` and ``up`` agree) until the broker appears."""
    port, api = free_port(), free_port()
    out = tmp_path / "out.jsonl"
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:{port}", client_id: {unique("gw")}, subscribe: ["a/#"],
           connect_timeout: 0.5, reconnect_min: 0.1, reconnect_max: 0.5}}
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: from-plant
    from: plant
    to: [{connector: out}]
  - name: from-api
    from: api
    to: [{connector: out}]
""")
    async with running_gateway(tmp_path, yaml, wait_ready=False) as rt, httpx.AsyncClient() as http:
        await asyncio.sleep(1.5)
        ready, detail = rt.readiness()
        assert ready and detail["inbound"] == {"api": "up", "plant": "down"}
        plant = detail["connectors"]["plant"]
        assert (plant["state"], plant["up"]) == ("down", False)
        assert "refused" in plant["detail"].lower()
        r = await http.post(f"http://127.0.0.1:{api}/e", json={"a": 1})
        assert r.status_code == 202  # the rest of the gateway goes on
        # the broker appears: the connector comes up by itself and consumes
        with mosquitto(tmp_path / "broker", port=port):
            await wait_for(lambda: rt.readiness()[1]["connectors"]["plant"]["state"] == "up", 15,
                           what="the connector up once the broker is")
            async with mqtt_probe(port=port) as probe:
                probe.publish("a/b", b"hello", qos=1)
                await wait_for(lambda: out.exists() and b"hello" in out.read_bytes(), 5, what="message")


async def test_tls_with_password_and_bad_password(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path / "tls"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    passwd = d / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "alice", "s3cret"], check=True)
    tls_port = free_port()
    extra = f"""
listener {tls_port} 127.0.0.1
cafile {d}/ca.pem
certfile {d}/cert.pem
keyfile {d}/key.pem
allow_anonymous false
password_file {passwd}
"""
    os.environ["GW_TEST_MQTT_PW"] = "s3cret"
    os.environ["GW_TEST_MQTT_BAD"] = "wrong"
    out = tmp_path / "out.jsonl"

    def yaml(pw: str) -> str:
        return gateway_yaml(f"""
  plant: {{type: mqtt, url: "mqtts://127.0.0.1:{tls_port}", client_id: {unique("gw")}, username: alice,
           password: "${{{pw}}}", tls: {{ca_file: "{d}/ca.pem", server_name: localhost}}, subscribe: ["t/#"],
           connect_timeout: 2, reconnect_min: 0.2}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: plant
    to: [{connector: out}]
""")

    with mosquitto(tmp_path / "broker", extra) as plain:
        require_port(plain, "private Mosquitto")
        (tmp_path / "good").mkdir()
        async with running_gateway(tmp_path / "good", yaml("GW_TEST_MQTT_PW")):
            async with mqtt_probe(port=plain) as probe:
                probe.publish("t/1", b"over tls", qos=1)
            # one broker, one topic space: published on the plain listener, received over TLS
            await wait_for(lambda: out.exists() and b"over tls" in out.read_bytes(), 5, what="message over TLS")
        (tmp_path / "bad").mkdir()
        async with running_gateway(tmp_path / "bad", yaml("GW_TEST_MQTT_BAD"), wait_ready=False) as rt:
            await asyncio.sleep(1.5)
            ready, detail = rt.readiness()
            assert not ready
            text = detail["connectors"]["plant"]["detail"]
            assert "s3cret" not in text and "wrong" not in text
            assert "refused" in text.lower() or "authori" in text.lower(), text
        # a password file is read at every connection: corrected while refused, it is used next
        secret = tmp_path / "mqtt-password"
        secret.write_text("wrong-password\n")
        (tmp_path / "file").mkdir()
        by_file = yaml("GW_TEST_MQTT_PW").replace('password: "${GW_TEST_MQTT_PW}"', f'password: {{file: "{secret}"}}')
        async with running_gateway(tmp_path / "file", by_file, wait_ready=False) as rt:
            def detail() -> str:
                return str(rt.readiness()[1]["connectors"]["plant"]["detail"]).lower()

            await wait_for(lambda: "refused" in detail() or "authori" in detail(), what="the wrong password refused")
            secret.write_text("s3cret\n")
            await wait_for(lambda: rt.readiness()[0], what="connected with the corrected password file")
            async with mqtt_probe(port=plain) as probe:
                probe.publish("t/2", b"after the correction", qos=1)
            await wait_for(lambda: b"after the correction" in out.read_bytes(), 5, what="the message")


async def test_status_topic_online_and_last_will_on_connection_loss(tmp_path: Path) -> None:
    status = unique("gw-status")
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {unique("gw")}, session_expiry: 60, keepalive: 5, reconnect_min: 0.2,
           status: {{topic: "{status}", online: "up", offline: "down"}}}}
  api: {{type: rest, listen: "127.0.0.1:{free_port()}", auth: {{type: none}}}}
""", """
  - name: r
    from: api
    to: [{connector: plant, topic: "never/used"}]
""")
    async with mqtt_probe() as probe:
        probe.subscribe(status, qos=1)
        async with running_gateway(tmp_path, yaml) as rt:
            await wait_for(lambda: [m.payload for m in probe.messages()] == [b"up"], 5, what="online")
            conn = rt.slots["plant"].connector
            import socket

            conn._client.socket().shutdown(socket.SHUT_RDWR)  # the connection dies without a DISCONNECT
            await wait_for(lambda: [m.payload for m in probe.messages()][:3] == [b"up", b"down", b"up"], 10,
                           what="last will, then online again after the reconnect")
        await asyncio.sleep(0.3)
        assert probe.messages()[-1].payload == b"up"  # a clean stop sends no last will
        probe.publish(status, b"", qos=1, retain=True)  # clear the retained status


async def test_a_batch_is_published_at_once_and_each_publish_answers_for_itself(tmp_path: Path) -> None:
    """``send_batch`` (spooled jobs due together): every publish goes out at once and each is
    answered on its own; the one over the payload limit fails alone, the others arrive."""
    root = unique("batch")
    yaml = gateway_yaml(f"""
  plant: {{type: mqtt, client_id: {unique("gw")}, max_payload: 1KiB}}
""", "  []")
    async with running_gateway(tmp_path, yaml) as rt, mqtt_probe() as probe:
        probe.subscribe(f"{root}/#", 1)
        await asyncio.sleep(0.3)
        conn = rt.slots["plant"].connector
        assert type(conn).batches
        items = [(Envelope(source="t", protocol="test", subject="s",
                           body=b"x" * 2000 if n == 2 else json.dumps({"n": n}).encode()),
                  Target(route="r", connector="plant", options=MqttTarget(topic=f"{root}/{n}", qos=1)))
                 for n in range(6)]
        answers = await conn.send_batch(items)
        await wait_for(lambda: len(probe.received) == 5, 5, what="the five that fit")
    assert [a is None for a in answers] == [n != 2 for n in range(6)]
    assert isinstance(answers[2], PermanentError) and "limit" in str(answers[2])
    assert sorted(m.topic for m in probe.received) == [f"{root}/{n}" for n in (0, 1, 3, 4, 5)]
