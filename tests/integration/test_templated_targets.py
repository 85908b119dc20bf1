"""A value from a message cannot change the shape of the address a route writes, against real peers.

REST in; out to the Mosquitto on 1883 (a ``$`` topic the route did not write is never published)
and to a real SMTP relay (aiosmtpd: only the one recipient the route allows ever reaches
``RCPT TO``). The hostile messages are dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_mqtt_amqp import gateway_yaml, mqtt_probe, unique
from tests.integration.test_smtp_peers import Relay

pytestmark = pytest.mark.integration


async def _post(port: int, payload: dict[str, str]) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"http://127.0.0.1:{port}/in", json=payload)
    assert r.status_code == 202, r.text
    return dict(r.json())


async def test_a_templated_topic_never_becomes_a_dollar_topic_on_the_broker(tmp_path: Path) -> None:
    root = unique("gwdollar")
    port = free_port()
    yaml = gateway_yaml(f"""
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  plant: {{type: mqtt, client_id: {unique("gw")}}}
""", """
  - name: api-to-plant
    from: api
    mode: direct
    to: [{connector: plant, topic: "{{ data.area }}/alerts", qos: 1}]
""")
    async with mqtt_probe() as probe:
        # "#" never matches a $ topic: a subscriber has to name it
        probe.subscribe(f"${root}/#")
        probe.subscribe(f"{root}/#")
        async with running_gateway(tmp_path, yaml) as rt:
            hostile = await _post(port, {"area": f"${root}"})
            assert hostile["status"] == "dead_lettered"
            ok = await _post(port, {"area": root})
            assert ok["status"] == "accepted"
            await wait_for(lambda: len(probe.messages()) >= 1, 10, what="the allowed publish")
            await asyncio.sleep(0.5)  # room for a wrong publish to arrive after the right one
            dead = await rt.spool.dead_letters()
    assert [m.topic for m in probe.messages()] == [f"{root}/alerts"]
    assert [d.envelope_id for d in dead] == [hostile["id"]]
    assert "'$'" in dead[0].last_error and "topic" in dead[0].last_error


async def test_a_templated_recipient_reaches_rcpt_to_as_the_one_address_the_route_allows(tmp_path: Path) -> None:
    port = free_port()
    with Relay() as relay:
        smtp = {"type": "smtp", "url": f"smtp://127.0.0.1:{relay.port}", "starttls": "off",
                "sender": "Gateway <gw@example.com>", "timeout": "5s"}
        yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  mail: {json.dumps(smtp)}
routes:
  - name: notify
    from: api
    to:
      - connector: mail
        to: "{{{{ data.user }}}}@example.com"
        subject: "Note for {{{{ data.user }}}}"
    on_failure: {{retry: {{attempts: 40, initial: 0.05s, max: 0.2s}}}}
"""
        async with running_gateway(tmp_path, yaml) as rt:
            hostile = [await _post(port, {"user": user}) for user in (
                "evil@example.net, ops",        # a second recipient
                "evil@example.net (",           # the fixed domain turned into a comment
                "x\r\nBcc: evil@example.net",   # a header line
            )]
            ok = await _post(port, {"user": "alice"})
            await wait_for(lambda: ["alice@example.com"] in [m.rcpt_tos for m in relay.handler.messages],
                           what="the allowed message")
            await asyncio.sleep(0.5)  # room for a wrong delivery to show up
            dead = {d.envelope_id: d for d in await rt.spool.dead_letters()}
    assert relay.handler.rcpts_seen == ["alice@example.com"]
    assert [m.rcpt_tos for m in relay.handler.messages] == [["alice@example.com"]]
    assert ok["status"] == "accepted"
    assert set(dead) == {h["id"] for h in hostile}
    assert all(d.reason == "template" for d in dead.values())
    assert "2 addresses" in dead[hostile[0]["id"]].last_error
    assert "example.com" in dead[hostile[1]["id"]].last_error
    assert "header injection refused" in dead[hostile[2]["id"]].last_error
