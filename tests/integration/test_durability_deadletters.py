"""Dead letters end to end: made by a real peer's 400s, then listed, shown, replayed (to the
original target and to another connector) and purged through the admin API and the CLI while
the gateway runs."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Runtime
from tests.faultproxy import HttpSink
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration

GATEWAY = str(Path(sys.executable).with_name("gateway"))


def config(port: int, main: HttpSink, other: HttpSink) -> str:
    return f"""
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {{type: none}}
    endpoints: [{{path: "/in/**", methods: [POST]}}]
  out: {{type: rest, base_url: "{main.url}"}}
  archive: {{type: rest, base_url: "{other.url}"}}
routes:
  - name: orders
    from: api
    match: {{subject: "/in/orders/**"}}
    to: [{{connector: out, path: "/orders/{{{{ data.id }}}}"}}]
  - name: events
    from: api
    to: [{{connector: out, path: /events}}]
"""


@pytest.fixture
async def sinks() -> AsyncIterator[tuple[HttpSink, HttpSink]]:
    async with HttpSink() as main, HttpSink() as other:
        yield main, other


async def cli(rt: Runtime, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(GATEWAY, "dead-letters", "--config", str(rt.config_path), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def make_dead(session: aiohttp.ClientSession, port: int, rt: Runtime, main: HttpSink) -> dict[str, str]:
    """Three orders and one event the peer rejects (HTTP 400 → permanent → dead letter at once)."""
    ids = {"o1": "orders/1", "o2": "orders/2", "o3": "orders/3", "e1": "events/x"}
    main.reject_ids.update(ids)
    envelope_ids = {}
    for ident, path in ids.items():
        async with session.post(f"http://127.0.0.1:{port}/in/{path}", json={"id": ident}) as r:
            assert r.status == 202
            envelope_ids[ident] = (await r.json())["id"]
    await wait_for(lambda: _count(rt, 4), what="four dead letters")
    main.reject_ids.clear()
    return envelope_ids


async def _count(rt: Runtime, n: int) -> bool:
    return await rt.spool.count_dead_letters() == n


async def test_dead_letters_through_the_admin_api(tmp_path: Path, sinks: tuple[HttpSink, HttpSink]) -> None:
    main, other = sinks
    port = free_port()
    async with running_gateway(tmp_path, config(port, main, other)) as rt, aiohttp.ClientSession() as s:
        envelope_ids = await make_dead(s, port, rt, main)
        api = f"http://{rt.config.model.gateway.admin.listen}/api/dead-letters"

        async def get(url: str, **params: Any) -> Any:
            async with s.get(url, params=params) as r:
                assert r.status == 200, await r.text()
                return await r.json()

        async def post(url: str, body: Any) -> tuple[int, Any]:
            async with s.post(url, json=body) as r:
                return r.status, await r.json()

        listing = await get(api)
        assert listing["total"] == 4
        assert {d["reason"] for d in listing["dead_letters"]} == {"permanent"}
        assert "envelope" not in listing["dead_letters"][0]  # a listing carries no bodies
        orders = await get(api, route="orders")
        assert orders["total"] == 3 and {d["route"] for d in orders["dead_letters"]} == {"orders"}
        assert (await get(api, route="orders", limit=1))["total"] == 3
        assert (await get(api, reason="attempts"))["total"] == 0
        by_env = {d["envelope_id"]: d for d in listing["dead_letters"]}
        o1 = by_env[envelope_ids["o1"]]
        shown = await get(f"{api}/{o1['id']}")
        assert shown["envelope"]["id"] == envelope_ids["o1"]
        assert json.loads(shown["envelope"]["body"]) == {"id": "o1"}
        assert shown["options"]["path"] == "/orders/o1"  # the rendered options are kept
        assert "HTTP 400" in shown["last_error"]
        async with s.get(f"{api}/999999") as r:
            assert r.status == 404

        # replay one to its original target: the same envelope id reaches the peer
        assert await post(f"{api}/replay", {"ids": [o1["id"]]}) == (200, {"replayed": 1})
        await wait_for(lambda: main.got("o1"), what="replayed o1 delivered")
        assert main.keys[envelope_ids["o1"]] == 1 and main.paths[-1] == "/orders/o1"
        # replay the other orders, by filter, to another connector
        assert await post(f"{api}/replay", {"filter": {"route": "orders"}, "connector": "archive"}) == (
            200, {"replayed": 2})
        await wait_for(lambda: other.got("o2") and other.got("o3"), what="replayed to archive")
        status, body = await post(f"{api}/replay", {"ids": [1], "connector": "nope"})
        assert status == 422 and "nope" in body["detail"]

        # purge: an empty request selects nothing and is refused; then by filter
        assert (await post(f"{api}/purge", {}))[0] == 422
        assert (await post(f"{api}/purge", {"ids": "all"}))[0] == 422
        assert await post(f"{api}/purge", {"route": "orders"}) == (200, {"purged": 0})
        assert await post(f"{api}/purge", {"reason": "permanent", "route": "events"}) == (200, {"purged": 1})
        assert (await get(api))["total"] == 0


async def test_dead_letters_through_the_cli_while_the_gateway_runs(tmp_path: Path,
                                                                   sinks: tuple[HttpSink, HttpSink]) -> None:
    main, other = sinks
    port = free_port()
    async with running_gateway(tmp_path, config(port, main, other)) as rt, aiohttp.ClientSession() as s:
        envelope_ids = await make_dead(s, port, rt, main)

        code, out, _ = await cli(rt, "list", "--json", "--route", "orders")
        assert code == 0
        listed = json.loads(out)
        assert sorted(d["envelope_id"] for d in listed) == sorted(envelope_ids[i] for i in ("o1", "o2", "o3"))
        code, out, _ = await cli(rt, "list", "--since", "1h")
        assert code == 0 and "4 of 4 dead letter(s)" in out
        code, out, _ = await cli(rt, "list", "--until", "1h")
        assert code == 0 and "0 of 0" in out

        first = listed[0]
        code, out, _ = await cli(rt, "show", str(first["id"]))
        assert code == 0 and json.loads(out)["envelope"]["id"] == first["envelope_id"]
        assert (await cli(rt, "show", "999999"))[0] == 1

        # replay and purge refuse an empty selection
        code, _, err = await cli(rt, "replay")
        assert code == 2 and "give ids" in err
        assert (await cli(rt, "purge"))[0] == 2
        assert (await cli(rt, "replay", "--to", "nope", "--all"))[0] == 1

        # replay into the running gateway's spool: its worker picks the job up by itself
        code, out, _ = await cli(rt, "replay", str(first["id"]))
        assert code == 0 and "replayed 1" in out
        delivered = next(i for i, e in envelope_ids.items() if e == first["envelope_id"])
        await wait_for(lambda: main.got(delivered), timeout=10, what="CLI replay delivered")
        code, out, _ = await cli(rt, "replay", "--reason", "permanent", "--route", "events", "--to", "archive")
        assert code == 0 and "replayed 1" in out
        await wait_for(lambda: other.got("e1"), timeout=10, what="CLI replay to archive delivered")

        code, out, _ = await cli(rt, "purge", "--route", "orders")
        assert code == 0 and "purged 2" in out
        assert await rt.spool.count_dead_letters() == 0
