"""Storm control through a running gateway: REST alerts in, exactly the expected lines out."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gwtest import free_port, jsonl, running_gateway, wait_for

pytestmark = pytest.mark.integration


def lines(path: Path) -> list[dict[str, Any]]:
    return jsonl(path)


async def test_throttle_with_digest_and_dedupe_through_the_gateway(tmp_path: Path) -> None:
    port = free_port()
    out, dd = tmp_path / "alerts.jsonl", tmp_path / "dedupe.jsonl"
    cfg = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  alerts: {{type: file, path: "{out}"}}
  once: {{type: file, path: "{dd}"}}
routes:
  - name: once-per-sensor
    from: api
    continue: true
    dedupe: {{key: "{{{{ data.sensor }}}}", window: 1h}}
    to: [{{connector: once, format: body}}]
  - name: throttled
    from: api
    throttle: {{key: "{{{{ data.sensor }}}}", limit: 1, window: 4s, then: digest}}
    to:
      - connector: alerts
        format: body
        body: >-
          {{% if data.digest is defined %}}digest {{{{ data.digest.key }}}} count={{{{ data.digest.count }}}}
          last={{{{ data.n }}}}{{% else %}}alert {{{{ data.sensor }}}} n={{{{ data.n }}}}{{% endif %}}
"""
    async with running_gateway(tmp_path, cfg) as rt, httpx.AsyncClient() as http:
        # The first three one by one (so n=0..2 are the ones that pass), then a burst.
        for n in range(3):
            r = await http.post(f"http://127.0.0.1:{port}/alert", json={"sensor": "abc"[n], "n": n})
            assert r.status_code == 202, r.text
        burst = await asyncio.gather(*(http.post(f"http://127.0.0.1:{port}/alert",
                                                 json={"sensor": "abc"[n % 3], "n": n}) for n in range(3, 30)))
        assert {r.status_code for r in burst} == {202}
        # one immediate alert per sensor, then (after the 4 s window) one digest per sensor
        await wait_for(lambda: len(out.read_text().splitlines()) == 6 if out.exists() else False, timeout=15,
                       what="3 alerts and 3 digests")
        await asyncio.sleep(1.5)  # and nothing more arrives
        got = out.read_text().splitlines()
        assert len(got) == 6
        assert sorted(x for x in got if x.startswith("alert")) == ["alert a n=0", "alert b n=1", "alert c n=2"]
        digests = sorted(x.split(" last=")[0] for x in got if x.startswith("digest"))
        assert digests == ["digest a count=9", "digest b count=9", "digest c count=9"]
        assert [json.loads(x)["n"] for x in dd.read_text().splitlines()] == [0, 1, 2]  # dedupe: each sensor once
        metrics = rt.metrics.exposition().decode()
        assert 'gateway_messages_routed_total{outcome="digested",route="throttled"} 27.0' in metrics
        assert 'gateway_messages_routed_total{outcome="suppressed",route="once-per-sensor"} 27.0' in metrics


async def test_a_digest_window_survives_kill_9_with_every_acknowledged_alert(tmp_path: Path) -> None:
    from tests.hostile.harness import HostileGateway

    port, out = free_port(), tmp_path / "digests.jsonl"
    routes = f"""
        gateway:
          admin: {{listen: "127.0.0.1:{free_port()}"}}
          spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
          state_dir: "{tmp_path / 'state'}"
          log: {{format: json}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
          sink: {{type: file, path: "{out}"}}
        routes:
          - name: storm
            from: api
            digest: {{key: "{{{{ data.sensor }}}}", window: 6s, max_listed: 20}}
            to:
              - connector: sink
                format: body
                body: >-
                  {{"sensor": "{{{{ data.sensor }}}}", "count": {{{{ data.digest.count }}}},
                  "listed": {{{{ data.digest.listed }}}}, "id": "{{{{ id }}}}"}}
        """
    acked, sent = dict.fromkeys("abc", 0), dict.fromkeys("abc", 0)
    enough = asyncio.Event()

    async def alert(http: httpx.AsyncClient, i: int) -> None:
        sensor = "abc"[i % 3]
        sent[sensor] += 1
        try:
            r = await http.post(f"http://127.0.0.1:{port}/alert", json={"sensor": sensor, "n": i})
        except httpx.TransportError:
            return  # the gateway was killed before it answered: not acknowledged
        if r.status_code == 202:
            acked[sensor] += 1
            if sum(acked.values()) >= 60:
                enough.set()

    def listening() -> bool:
        # /readyz can answer 200 a few milliseconds before the REST port is bound.
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(limits=limits, timeout=10) as http:
        async with HostileGateway(tmp_path, routes) as gw:
            await wait_for(listening, what="the REST listener")
            storm = asyncio.gather(*(alert(http, i) for i in range(600)))
            await asyncio.wait_for(enough.wait(), timeout=30)
            assert gw.proc is not None
            gw.proc.kill()  # kill -9 inside the window, with alerts in flight
            await gw.proc.wait()
            await storm
        assert lines(out) == [] and sum(acked.values()) < 600
        async with HostileGateway(tmp_path, routes):
            await wait_for(listening, what="the REST listener")
            await asyncio.gather(*(alert(http, i) for i in range(600, 615)))  # the same windows go on
            await wait_for(lambda: len(lines(out)) == 3, timeout=30, what="a digest for each sensor")
            await asyncio.sleep(1.5)  # and nothing more arrives
    got = {d["sensor"]: d for d in lines(out)}
    assert len(lines(out)) == 3
    for sensor in "abc":  # every acknowledged alert counted; one the kill cut off may be too
        assert acked[sensor] <= got[sensor]["count"] <= sent[sensor], (sensor, acked, got)
        assert got[sensor]["listed"] == 20
