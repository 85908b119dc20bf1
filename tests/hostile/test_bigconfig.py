"""A 10,000-route config served and reloaded under load: the data plane goes on, the loop is never
held long, every message lands where its route says, rendered by the version that took it.

A running ``gateway run`` gets REST requests for routes spread over the whole file while the whole
config (every route's templates changed) is reloaded three times, by SIGHUP and by the file
watcher. The bounds are the hostile tests' generous ones (``/healthz`` within 0.5 s throughout,
the watchdog's worst loop lag in a bucket of at most 0.5 s): a reload that builds the config on
the loop, walks it with the collector or frees the old one in one go holds it for seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import aiohttp

from bench.bigconfig import big_config
from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port

ROUTES = 10_000
RELOADS = 3


def lag_buckets(metrics: str) -> dict[float, float]:
    return {float(m.group(1)): float(m.group(2)) for m in re.finditer(
        r'gateway_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics)}


def worst_lag_between(before: dict[float, float], after: dict[float, float]) -> float:
    """The upper bound of the smallest bucket that holds every observation made between the two."""
    total = after[float("inf")] - before[float("inf")]
    return min(le for le in after if after[le] - before[le] >= total)


def applied(metrics: str) -> float:
    m = re.search(r'gateway_config_reloads_total\{outcome="applied"\} (\S+)', metrics)
    return float(m.group(1)) if m else 0.0


async def test_a_ten_thousand_route_config_reloads_under_load_without_holding_the_loop(tmp_path: Path) -> None:
    api, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path = tmp_path / "routes.yaml"

    def config(tag: str) -> str:
        return big_config(ROUTES, api=api, admin=admin, var=str(tmp_path), tag=tag)

    sent: list[int] = []
    async with HostileGateway(tmp_path, config("v0"), ready_timeout=120) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

            async def post(i: int) -> None:
                """A reading for route ``r<i>-readings`` (i = 4k), hot enough for its condition."""
                async with http.post(f"http://{api}/sites/s{i // 20:04d}/d{i % 20:02d}/x", json={"t": 99, "i": i}) as r:
                    assert r.status == 202, await r.text()
                sent.append(i)

            async def traffic(stop: asyncio.Event) -> None:
                k = 0
                while not stop.is_set():
                    await post(4 * (k * 613 % (ROUTES // 4)))
                    k += 1
                    await asyncio.sleep(0.01)

            before = lag_buckets(gw.metrics())
            stop = asyncio.Event()
            with LoopProbe(gw.admin) as probe:
                runner = asyncio.create_task(traffic(stop))
                for k in range(1, RELOADS + 1):
                    count = applied(gw.metrics())
                    tmp = tmp_path / "routes.yaml.new"
                    tmp.write_text(config(f"v{k}"))
                    os.replace(tmp, path)  # as an editor saves
                    if k % 2:
                        assert gw.proc is not None
                        gw.proc.send_signal(signal.SIGHUP)
                    await wait_for(lambda count=count: applied(gw.metrics()) > count, timeout=120,
                                   what=f"reload {k} applied")
                await asyncio.sleep(1.0)  # the last old config is taken apart meanwhile
                stop.set()
                await runner
            probe.assert_responsive()
            assert worst_lag_between(before, lag_buckets(gw.metrics())) <= 0.5

            # Every reading reached the archive through its own route, and the log line of the last
            # version says which config rendered it.
            await wait_for(lambda: len(jsonl(tmp_path / "archive.jsonl")) >= len(sent), timeout=60,
                           what="every reading archived")
            archived = jsonl(tmp_path / "archive.jsonl")
            assert sorted(json.loads(e["body"])["i"] for e in archived) == sorted(sent)
            assert all(e["subject"].startswith("/sites/") for e in archived)
            assert len(sent) > 10
            # Route r1-json's body template names its version: the last one renders it.
            async with http.post(f"http://{api}/sites/s0000/d01/status", json={"state": "hot"}) as r:
                assert r.status == 202, await r.text()
            await wait_for(lambda: jsonl(tmp_path / "events.jsonl"), timeout=30, what="the status event")
            assert jsonl(tmp_path / "events.jsonl") == [
                {"tag": f"v{RELOADS}", "site": "s0000", "device": "d01", "state": "hot"}]
        await gw.alive()
