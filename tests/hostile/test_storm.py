"""Alert storms (issue 16, storm family): a digest route fed 6,000 MQTT QoS 1 alerts in 5 s.
Storing an alert in its digest costs the same for the 2,000th as for the first, off the loop,
so the gateway keeps up with the storm: ``/healthz`` stays quick, and the broker never has to
drop an alert it queued for the gateway (Mosquitto drops past its default
``max_queued_messages`` of 1,000) — every alert is counted in a digest, and the listed events
stop at ``max_listed``."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe

SENSORS = ("s1", "s2", "s3")
PER_SENSOR = 2000
SECONDS = 5.0  # 6,000 alerts in 5 s: twice the storm of the issue, and fast enough that a
#                gateway spending milliseconds per alert on the loop falls 1,000 behind


def publish(topic_prefix: str) -> int:
    """QoS 1 at an even pace, all sensors interleaved; returns how many the broker acknowledged."""
    total = PER_SENSOR * len(SENSORS)
    acked = [0]
    done = threading.Event()

    def on_publish(*_: object) -> None:
        acked[0] += 1
        if acked[0] >= total:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{topic_prefix}")
    client.max_inflight_messages = 1000
    client.max_queued_messages = 0
    client.on_publish = on_publish
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    start = time.monotonic()
    try:
        for i in range(total):
            time.sleep(max(0.0, start + i * SECONDS / total - time.monotonic()))
            sensor = SENSORS[i % len(SENSORS)]
            client.publish(f"{topic_prefix}/{sensor}/alert",
                           json.dumps({"sensor": sensor, "seq": i // len(SENSORS), "t": 97.5}), qos=1)
        assert done.wait(60), f"the broker acknowledged {acked[0]} of {total}"
    finally:
        client.disconnect()
        client.loop_stop()
    return acked[0]


async def test_a_storm_of_alerts_is_counted_whole_while_the_loop_stays_free(tmp_path: Path) -> None:
    prefix, out = f"storm-{uuid.uuid4().hex[:8]}", tmp_path / "digests.jsonl"
    routes = f"""
        connectors:
          plant:
            type: mqtt
            url: "mqtt://127.0.0.1:1883"
            client_id: "gw-{prefix}"
            subscribe: ["{prefix}/+/alert"]
            qos: 1
          sink: {{type: file, path: "{out}"}}
        routes:
          - name: storm
            from: plant
            digest: {{key: "{{{{ data.sensor }}}}", window: 3s}}
            to:
              - connector: sink
                format: body
                body: >-
                  {{"sensor": "{{{{ data.sensor }}}}", "count": {{{{ data.digest.count }}}},
                  "listed": {{{{ data.digest.listed }}}}, "events": {{{{ data.digest.events | length }}}}}}
        """

    def counted() -> dict[str, int]:
        totals = dict.fromkeys(SENSORS, 0)
        for d in jsonl(out):
            totals[d["sensor"]] += d["count"]
        return totals

    async with HostileGateway(tmp_path, routes) as gw:
        with LoopProbe(gw.admin) as probe:
            assert await asyncio.to_thread(publish, prefix) == PER_SENSOR * len(SENSORS)
            # Every alert is in a digest a window after the storm; one the broker dropped never is.
            await wait_for(lambda: counted() == dict.fromkeys(SENSORS, PER_SENSOR), timeout=30, interval=0.5,
                           what=f"{PER_SENSOR} alerts of each sensor counted in digests")
        probe.assert_responsive()
        assert gw.loop_lag_worst() < 0.5
        await gw.alive()
        digests = jsonl(out)
    assert counted() == dict.fromkeys(SENSORS, PER_SENSOR)  # nothing counted twice either
    for d in digests:
        assert d["listed"] == d["events"] == min(d["count"], 1000), d
