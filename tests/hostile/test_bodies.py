"""Large bodies within the size limits: parsing them for routing must not hold the event loop.

``json.loads`` holds the GIL for a whole document (about 60 ms a megabyte of small values, so
seconds for the 16 MiB a connector may accept), which no worker thread can hide. A route that
reads ``data`` gets large JSON bodies parsed in steps between which the loop runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port


def routes(port: int, out: Path) -> str:
    return f"""
        connectors:
          api:
            type: rest
            listen: "127.0.0.1:{port}"
            auth: {{type: none}}
            max_body: 16MiB
            endpoints: [{{path: "/events/**", methods: [POST]}}]
          sink: {{type: file, path: "{out}"}}
        routes:
          - name: big
            from: api
            match: {{when: 'data.kind == "big"'}}
            to: [{{connector: sink}}]
        """


async def test_megabytes_of_json_are_routed_without_holding_the_loop(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    # 6 MiB of JSON in a quarter million values (within the bound), and 8 MiB of the costliest shape
    # for a JSON parser: two million tiny values (over it).
    body = json.dumps({"kind": "big", "values": ["x" * 16] * 240_000}, separators=(",", ":")).encode()
    malformed = body[:-1]  # cut short: parsed as far as it goes, then dead-lettered
    tiny = json.dumps({"kind": "big", "values": [[1]] * (2 * 1024 * 1024)}, separators=(",", ":")).encode()
    async with HostileGateway(tmp_path, routes(port, out)) as gw:
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                headers = {"content-type": "application/json"}
                for _ in range(2):
                    async with http.post(f"http://127.0.0.1:{port}/events/a", data=body, headers=headers) as r:
                        assert r.status == 202, await r.text()
                async with http.post(f"http://127.0.0.1:{port}/events/b", data=malformed, headers=headers) as r:
                    answer = await r.json()  # kept as a dead letter, with the parser's reason
                    assert r.status == 202 and answer["status"] == "dead_lettered", answer
                    assert "invalid JSON" in answer["reason"]
                async with http.post(f"http://127.0.0.1:{port}/events/c", data=tiny, headers=headers) as r:
                    answer = await r.json()  # too many values to route on: a dead letter that says so
                    assert r.status == 202 and answer["status"] == "dead_lettered", answer
                    assert "more than 250000 values" in answer["reason"]
                await wait_for(lambda: len(jsonl(out)) == 2, timeout=60, what="both large messages delivered")
        probe.assert_responsive()
        assert gw.loop_lag_worst() <= 0.25
        await gw.alive()
