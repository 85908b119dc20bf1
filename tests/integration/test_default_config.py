"""The default routes.yaml, as `make run` runs it, against the real Mosquitto and RabbitMQ: what
the README's walkthrough tells a new user to try (curl, swaks, mosquitto_pub, /metrics) does
what it says. Only the listening ports, the MQTT client id and the name of the queue the `bus`
connector reads are changed (so the test runs beside a `make run`, which would otherwise take
the alerts off the same queue); everything else — paths, templates, routes — is the file itself."""

from __future__ import annotations

import asyncio
import json
import mailbox
import re
import shutil
import sys
import time
import uuid
from email.header import decode_header, make_header
from pathlib import Path

import aio_pika
import aiohttp
import pytest

from tests.gwtest import free_port, wait_for
from tests.integration.test_crash import GatewayProcess
from tests.integration.test_smtp_peers import swaks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _default_config(tmp_path: Path, queue: str) -> tuple[Path, dict[str, str]]:
    text = (ROOT / "routes.yaml").read_text()
    ports = {"rest": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}",
             "smtp": f"127.0.0.1:{free_port()}"}
    for default, key in (("127.0.0.1:8080", "rest"), ("127.0.0.1:8081", "admin"), ("127.0.0.1:2525", "smtp")):
        assert f'"{default}"' in text, f"routes.yaml no longer listens on {default}: update this test"
        text = text.replace(f'"{default}"', f'"{ports[key]}"')
    assert "client_id: gateway-plant " in text
    text = text.replace("client_id: gateway-plant ", f"client_id: {CLIENT_ID} ")
    assert "name: plant-alerts\n" in text
    text = text.replace("name: plant-alerts\n", f"name: {queue}\n")
    (tmp_path / "routes.yaml").write_text(text)
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    return tmp_path / "routes.yaml", ports


#: The test's MQTT client id: fixed, so its persistent session is one the test can clear.
CLIENT_ID = "gateway-plant-default-test"


def _clear_mqtt_session() -> None:
    """Drop the broker's persistent session for CLIENT_ID (and what it queued while offline): the
    default config subscribes with clean start off, so alerts published to plant/… between two
    runs (a README walkthrough, say) would otherwise arrive at the next run."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, clean_session=True)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        for _ in range(100):
            if client.is_connected():
                break
            time.sleep(0.05)
        assert client.is_connected(), "cannot reach Mosquitto on 127.0.0.1:1883"
    finally:
        client.disconnect()
        client.loop_stop()


async def _mosquitto_pub(topic: str, payload: dict[str, object]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", topic, "-m", json.dumps(payload))
    assert await proc.wait() == 0


async def _delete_queue(name: str) -> None:
    conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        channel = await conn.channel()
        await channel.queue_delete(name)
    finally:
        await conn.close()


async def test_the_readme_walkthrough_on_the_default_config(tmp_path: Path) -> None:
    queue = f"plant-alerts-test-{uuid.uuid4().hex[:8]}"  # bound to plant.events like plant-alerts
    config, ports = _default_config(tmp_path, queue)
    _clear_mqtt_session()
    log = tmp_path / "gateway.log"
    gateway = str(Path(sys.executable).with_name("gateway"))
    # Started in the config's directory, as `make run` starts it in the repository's.
    gw = GatewayProcess(config, ports["admin"], log, command=[
        "sh", "-c", f'cd "{tmp_path}" && exec "$0" run --config routes.yaml', gateway])
    await gw.start(timeout=30)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{ports['admin']}/readyz?verbose") as r:
                ready = await r.json()
            # every connector is up: the brokers are there
            assert all(c["up"] for c in ready["connectors"].values()), ready

            # curl -X POST localhost:8080/events/boiler ...: 202, one line in the events file
            async with http.post(f"http://{ports['rest']}/events/boiler",
                                 json={"site": "north", "severity": "critical"}) as r:
                assert r.status == 202, await r.text()
                accepted = await r.json()
            events = tmp_path / "var/out/events.jsonl"
            await wait_for(lambda: events.exists() and events.read_text().count("\n") == 1, what="events.jsonl")
            assert json.loads(events.read_text())["id"] == accepted["id"]

            # swaks --server 127.0.0.1:2525 --to ops@example.com ...: into the Maildir; a relay is refused
            rc, out = await swaks("--server", ports["smtp"], "--from", "me@laptop.test", "--to", "ops@example.com",
                                  "--header", "Subject: hello", "--body", "it works")
            assert rc == 0 and "250 2.0.0 OK" in out, out
            rc, out = await swaks("--server", ports["smtp"], "--from", "me@laptop.test", "--to", "me@elsewhere.test")
            assert rc != 0 and "550 5.7.1" in out, out
            box = mailbox.Maildir(str(tmp_path / "var/mail/Maildir"), factory=None, create=False)
            await wait_for(lambda: len(box) == 1, what="the swaks mail in the Maildir")

            # mosquitto_pub -t plant/7/boiler/alert ...: the alerts file, RabbitMQ (and back), one email
            await _mosquitto_pub("plant/7/boiler/alert", {"site": "north", "temperature": 97})
            alerts = tmp_path / "var/out/alerts.jsonl"
            await wait_for(lambda: alerts.exists() and alerts.read_text().count("\n") == 1, what="alerts.jsonl")
            await wait_for(lambda: "plant alert back from RabbitMQ: plant.7.boiler.alert" in log.read_text(),
                           what="the alert read back from RabbitMQ through the bus connector's queue")
            await wait_for(lambda: len(box) == 2, what="the boiler email")
            subjects = sorted(str(make_header(decode_header(m["Subject"]))) for m in box)
            assert subjects == ["Boiler north at 97 °C", "hello"], subjects

            # /metrics counts what happened
            async with http.get(f"http://{ports['admin']}/metrics") as r:
                metrics = await r.text()
        for route, connector in (("events-to-file", "events-file"), ("plant-alerts-to-bus", "bus"),
                                 ("plant-alerts-to-file", "alerts-file"), ("bus-to-log", "console"),
                                 ("mail-to-maildir", "mailbox"), ("hot-boilers-to-ops", "mailbox")):
            pattern = (rf'^gateway_messages_delivered_total\{{connector="{connector}",route="{route}"\}} '
                       rf"([0-9.]+)$")
            found = re.search(pattern, metrics, re.MULTILINE)
            assert found and float(found.group(1)) >= 1, f"{route} → {connector} not counted"
        assert '"event": "delivery.dead_lettered"' not in log.read_text()
        assert await gw.terminate() == 0
    finally:
        await gw.ensure_stopped()
        _clear_mqtt_session()
        await _delete_queue(queue)
