"""The harness itself against a gateway under ordinary load: /healthz stays fast while REST
messages flow, and the watchdog's loop-lag histogram is exported from the first scrape."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.gwtest import jsonl
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port


async def test_ordinary_traffic_keeps_the_loop_free(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    routes = f"""
        connectors:
          api:
            type: rest
            listen: "127.0.0.1:{port}"
            auth: {{type: none}}
            endpoints: [{{path: "/events/**", methods: [POST]}}]
          sink: {{type: file, path: "{out}"}}
        routes:
          - {{name: events, from: api, to: [{{connector: sink}}]}}
        """
    async with HostileGateway(tmp_path, routes) as gw:
        assert "gateway_event_loop_lag_seconds_count" in gw.metrics()
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession() as http:
                for i in range(200):
                    async with http.post(f"http://127.0.0.1:{port}/events/{i}", json={"i": i}) as r:
                        assert r.status == 202
        probe.assert_responsive()
        assert gw.loop_lag_worst() < 0.5
        await gw.alive()
    assert len(jsonl(out)) == 200
