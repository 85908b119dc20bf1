"""The IoT scenario end to end: `mosquitto_pub` sends 1,000 alerts from 3 sensors within a few
seconds; a real SMTP server (aiosmtpd) receives exactly the emails the routes' throttle, digest,
alarm and dedupe settings call for — counted exactly and read."""

from __future__ import annotations

import asyncio
import email
import json
import shutil
import subprocess
import uuid
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration


class Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))  # type: ignore[attr-defined]
        return "250 OK"

    def to(self, address: str) -> list[Message]:
        return [m for m in self.messages if address in m["To"]]


def readings(sensor: str, n: int) -> list[dict[str, object]]:
    if sensor == "s1":  # hot all along: one alarm
        temps = [95.0] * n
    elif sensor == "s2":  # hot, then cooled down: alarm raised and resolved
        temps = [95.0] * (n // 2) + [70.0] * (n - n // 2)
    else:  # never hot: no alarm
        temps = [60.0] * n
    return [{"sensor": sensor, "seq": i, "temperature": t} for i, t in enumerate(temps)]


async def test_a_thousand_alerts_become_exactly_the_expected_emails(tmp_path: Path) -> None:
    assert shutil.which("mosquitto_pub"), "mosquitto_pub missing: scripts/peers.sh installs mosquitto-clients"
    sink = Sink()
    smtp_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    prefix = f"it-{uuid.uuid4().hex[:8]}"
    cfg = f"""
connectors:
  plant:
    type: mqtt
    url: "mqtt://127.0.0.1:1883"
    client_id: "gw-{prefix}"
    subscribe: ["{prefix}/+/alert"]
    qos: 1
  ops:
    type: smtp
    url: "smtp://127.0.0.1:{smtp_port}"
    starttls: "off"
    sender: "Plant gateway <gw@example.com>"
routes:
  - name: throttled
    from: plant
    continue: true
    # One throttle window for the whole storm, also on a slow machine (each sensor's alerts take
    # well under a second here): the test counts exact emails, so no alert may fall into a second
    # window, whose digest would only come a window later.
    throttle: {{key: "{{{{ data.sensor }}}}", limit: 1, window: 15s, then: digest}}
    to:
      - connector: ops
        to: ["throttle@example.com"]
        subject: >-
          {{% if data.digest is defined %}}digest {{{{ data.sensor }}}}: {{{{ data.digest.count }}}} alerts{{%
          else %}}alert {{{{ data.sensor }}}} at {{{{ data.temperature }}}}{{% endif %}}
        text: >-
          {{% if data.digest is defined %}}{{{{ data.digest.events | map(attribute='data.seq') | join(',')
          }}}}{{% else %}}first{{% endif %}}
  - name: alarms
    from: plant
    continue: true
    alarm: {{key: "{{{{ data.sensor }}}}", raise_when: "data.temperature > 90", clear_when: "data.temperature < 80"}}
    to:
      - connector: ops
        to: ["alarm@example.com"]
        subject: "{{{{ data.sensor }}}} {{{{ attributes.alarm }}}} at seq {{{{ data.seq }}}}"
  - name: once
    from: plant
    dedupe: {{key: "{{{{ data.sensor }}}}", window: 1h}}
    to:
      - connector: ops
        to: ["once@example.com"]
        subject: "first alert from {{{{ data.sensor }}}}"
"""
    counts = {"s1": 334, "s2": 333, "s3": 333}
    try:
        async with running_gateway(tmp_path, cfg) as rt:
            for sensor, n in counts.items():
                lines = "\n".join(json.dumps(r) for r in readings(sensor, n)) + "\n"
                done = await asyncio.get_running_loop().run_in_executor(None, lambda s=sensor, x=lines: subprocess.run(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", f"{prefix}/{s}/alert", "-l"],
                    input=x, text=True, capture_output=True, timeout=60, check=False))
                assert done.returncode == 0, done.stderr
            expected = 3 + 3 + 3 + 3  # throttle: first + digest per sensor; alarms: s1, s2 up, s2 down; dedupe: 3
            await wait_for(lambda: len(sink.messages) >= expected, timeout=60, interval=0.2,
                           what=f"{expected} emails (have {len(sink.messages)})")
            await asyncio.sleep(2)  # nothing more may arrive
            received = rt.metrics.exposition().decode()
    finally:
        controller.stop()

    assert len(sink.messages) == expected, [m["Subject"] for m in sink.messages]
    assert 'gateway_messages_received_total{connector="plant"} 1000.0' in received

    throttle = sink.to("throttle@example.com")
    firsts = sorted(m["Subject"] for m in throttle if m["Subject"].startswith("alert"))
    assert firsts == ["alert s1 at 95.0", "alert s2 at 95.0", "alert s3 at 60.0"]
    digests = {m["Subject"]: m.get_payload(decode=True).decode().strip() for m in throttle
               if m["Subject"].startswith("digest")}
    assert set(digests) == {f"digest {s}: {n - 1} alerts" for s, n in counts.items()}
    for s, n in counts.items():  # every held-back alert is in its digest, in order
        assert digests[f"digest {s}: {n - 1} alerts"] == ",".join(str(i) for i in range(1, n))

    alarms = sorted(m["Subject"] for m in sink.to("alarm@example.com"))
    assert alarms == ["s1 raised at seq 0", "s2 raised at seq 0", "s2 resolved at seq 166"]
    assert sorted(m["Subject"] for m in sink.to("once@example.com")) == [
        "first alert from s1", "first alert from s2", "first alert from s3"]
    assert all(m["From"] == "Plant gateway <gw@example.com>" and m["Message-ID"] for m in sink.messages)
