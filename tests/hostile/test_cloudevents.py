"""Structured CloudEvents (``application/cloudevents+json``) are read as JSON before there is an
envelope: megabytes of them must be parsed without holding the event loop, on every connector
that takes them (REST here over HTTP, MQTT through the real Mosquitto)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port

CE = "application/cloudevents+json"


def routes(port: int, topic: str, out: Path) -> str:
    return f"""
        connectors:
          api:
            type: rest
            listen: "127.0.0.1:{port}"
            auth: {{type: none}}
            max_body: 16MiB
            endpoints: [{{path: "/events/**", methods: [POST]}}]
          bus:
            type: mqtt
            url: "mqtt://127.0.0.1:1883"
            protocol: "5"
            client_id: gw-hostile-ce-{port}
            subscribe: ["{topic}/#"]
            qos: 1
            max_payload: 16MiB
          sink: {{type: file, path: "{out}"}}
        routes:
          - name: events
            from: [api, bus]
            to: [{{connector: sink}}]
        """


def event(ident: str) -> bytes:
    """About 6 MiB of JSON in a quarter million small values: ~0.4 s for ``json.loads`` at once."""
    return json.dumps({"specversion": "1.0", "id": ident, "source": "/hostile", "type": "big",
                       "data": {"values": ["x" * 16] * 240_000}}, separators=(",", ":")).encode()


def swarm(ident: str) -> bytes:
    """12 MiB of the costliest JSON for a parser, three million tiny values: over a second for
    ``json.loads`` at once, past the gateway's bound on values a parsed body may hold."""
    return json.dumps({"specversion": "1.0", "id": ident, "source": "/hostile", "type": "big",
                       "data": [[1]] * (3 * 1024 * 1024)}, separators=(",", ":")).encode()


def publish(topic: str, payload: bytes) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = CE
        client.publish(topic, payload, qos=1, properties=props).wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()


async def test_megabytes_of_structured_cloudevents_do_not_hold_the_loop(tmp_path: Path) -> None:
    port, out, topic = free_port(), tmp_path / "out.jsonl", f"hostile-ce-{free_port()}"
    # built before the probe starts: json.dumps of a swarm holds this process's GIL, and the probe's
    bodies = {name: event(name) for name in ("rest-0", "rest-1", "mqtt-0")}
    cut, big, big_mqtt = event("cut")[:-1], swarm("swarm"), swarm("mqtt-swarm")
    async with HostileGateway(tmp_path, routes(port, topic, out)) as gw:
        await asyncio.sleep(1)  # the MQTT subscription
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                for n in range(2):
                    async with http.post(f"http://127.0.0.1:{port}/events/a", data=bodies[f"rest-{n}"],
                                         headers={"content-type": CE}) as r:
                        assert r.status == 202, await r.text()
                async with http.post(f"http://127.0.0.1:{port}/events/b", data=cut,
                                     headers={"content-type": CE}) as r:
                    assert r.status == 400 and "not JSON the gateway reads" in await r.text()
                async with http.post(f"http://127.0.0.1:{port}/events/c", data=big,
                                     headers={"content-type": CE}) as r:
                    assert r.status == 400 and "value bounds" in await r.text()
            await asyncio.to_thread(publish, f"{topic}/x", bodies["mqtt-0"])
            # MQTT cannot answer 400: the swarm is kept as a plain message (its bytes, not an event)
            await asyncio.to_thread(publish, f"{topic}/y", big_mqtt)
            await wait_for(lambda: len(jsonl(out)) == 4, timeout=60, what="four large messages delivered")
        probe.assert_responsive()
        assert gw.loop_lag_worst() <= 0.25
        records = jsonl(out)
        assert sorted(rec["id"] for rec in records if rec["content_type"] != CE) == ["mqtt-0", "rest-0", "rest-1"]
        assert [rec["subject"] for rec in records if rec["content_type"] == CE] == [f"{topic}/y"]
        await gw.alive()
