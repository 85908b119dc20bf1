"""Follow one message after the fact: a real ``gateway run`` process sends an order to a peer that
answers 503, 503, then 400; the order is dead-lettered; the gateway restarts; then ``gateway
trace`` (the CLI, reading the store and asking the admin API) and ``GET /api/messages/{id}``
show every hop, by the envelope id and by the Idempotency-Key; a replay joins the record. The
restart is a ``kill -9``: what was written survives a crash."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import pytest
from aiohttp import web

from gateway.admin import hash_token
from tests.faultproxy import HttpSink
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_crash import GatewayProcess

pytestmark = pytest.mark.integration

GATEWAY = str(Path(sys.executable).with_name("gateway"))
TRACE = "0af7651916cd43dd8448eb211c80319c"
VIEWER, EDITOR = "viewer-token-for-the-provenance-test", "editor-token-for-the-provenance-test"


class ScriptedPeer(HttpSink):
    """Answers the scripted (status, body) pairs first, then accepts as an :class:`HttpSink`."""

    def __init__(self, script: list[tuple[int, str]]) -> None:
        super().__init__()
        self.script = script

    async def _handle(self, request: web.Request) -> web.Response:
        if self.script:
            await request.read()
            self.requests += 1
            status, text = self.script.pop(0)
            return web.Response(status=status, text=text)
        return await super()._handle(request)


async def trace(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(GATEWAY, "trace", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _kinds(record: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in record["events"]]


async def test_gateway_trace_shows_every_hop_of_a_dead_lettered_message_after_a_restart(tmp_path: Path) -> None:
    api, admin = free_port(), f"127.0.0.1:{free_port()}"
    config = tmp_path / "routes.yaml"
    async with ScriptedPeer([(503, "busy"), (503, "still busy"), (400, "order 7 is invalid")]) as peer:
        config.write_text(textwrap.dedent(f"""\
            gateway:
              admin:
                listen: "{admin}"
                tokens:
                  - {{name: ops, sha256: "{hash_token(VIEWER)}", role: viewer}}
                  - {{name: alice, sha256: "{hash_token(EDITOR)}", role: editor}}
              spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
              state_dir: "{tmp_path / 'state'}"
              drain: 2s
              provenance: {{retention: 1d, max_size: 64MiB}}
            connectors:
              api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
              erp: {{type: rest, base_url: "{peer.url}"}}
            routes:
              - name: orders
                from: api
                to: [{{connector: erp, path: /orders}}]
                on_failure: {{retry: {{attempts: 3, initial: 0.05, max: 0.1}}}}
            """))
        gw = GatewayProcess(config, admin, tmp_path / "gateway.log")
        viewer = {"Authorization": f"Bearer {VIEWER}"}
        editor = {"Authorization": f"Bearer {EDITOR}"}
        try:
            await gw.start()
            async with aiohttp.ClientSession() as http:
                async with http.post(f"http://127.0.0.1:{api}/orders", json={"order": 7},
                                     headers={"Idempotency-Key": "order-7",
                                              "traceparent": f"00-{TRACE}-b7ad6b7169203331-01"}) as r:
                    assert r.status == 202
                    envelope_id = (await r.json())["id"]
                    answered_trace = r.headers.get("traceparent")

                async def dead() -> list[dict[str, Any]]:
                    async with http.get(f"http://{admin}/api/dead-letters", headers=viewer) as r:
                        return list((await r.json())["dead_letters"])

                await wait_for(dead, what="the order dead-lettered")
                assert peer.requests == 3

            async def recorded_dead() -> bool:  # read from the file while the gateway runs and writes
                code, out, _ = await trace(envelope_id, "--config", str(config), "--json")
                return code == 0 and _kinds(json.loads(out)[0])[-1] == "dead_letter"

            await wait_for(recorded_dead, what="the dead letter in the record")
            await gw.kill9()  # what was written survives a crash
            await gw.start()  # the record is read back from disk by a new process

            code, out, err = await trace(envelope_id, "--config", str(config))
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0] == f"envelope {envelope_id}"
            assert "received   from api (rest) subject '/orders'  answered accepted" in out
            assert "idempotency_key=order-7" in out
            assert "route      orders: matched" in out
            attempts = [line for line in lines if line.split()[2:3] == ["attempt"]]
            assert [line.split()[3:8] for line in attempts] == [
                ["1", "erp", "via", "orders", "(spooled):"], ["2", "erp", "via", "orders", "(spooled):"],
                ["3", "erp", "via", "orders", "(spooled):"]]
            assert [line.split()[8] for line in attempts] == ["retry", "retry", "permanent"]
            assert "HTTP 503: busy" in out and "HTTP 503: still busy" in out and "HTTP 400: order 7 is invalid" in out
            assert "dead letter orders → erp: permanent" in out

            code, out, _ = await trace("order-7", "--config", str(config), "--json")
            assert code == 0
            [record] = json.loads(out)
            assert record["envelope_id"] == envelope_id
            assert _kinds(record) == ["received", "route", "attempt", "attempt", "attempt", "dead_letter"]
            attempts = [e for e in record["events"] if e["kind"] == "attempt"]
            assert [(a["attempt"], a["outcome"], a["connector"], a["route"]) for a in attempts] == [
                (1, "retry", "erp", "orders"), (2, "retry", "erp", "orders"), (3, "permanent", "erp", "orders")]
            assert [a["answer"].rsplit(": ", 1)[1] for a in attempts] == ["busy", "still busy", "order 7 is invalid"]
            assert attempts[0]["at"] < attempts[1]["at"] < attempts[2]["at"]

            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{admin}/api/messages/{envelope_id}") as r:
                    assert r.status == 401  # a viewer's token, as the other reads
                async with http.get(f"http://{admin}/api/messages/{envelope_id}", headers=viewer) as r:
                    assert r.status == 200
                    body = await r.json()
                assert [m["envelope_id"] for m in body["messages"]] == [envelope_id]
                assert _kinds(body["messages"][0]) == _kinds(record)
                async with http.get(f"http://{admin}/api/messages/order-7", headers=viewer) as r:
                    assert [m["envelope_id"] for m in (await r.json())["messages"]] == [envelope_id]
                async with http.get(f"http://{admin}/api/messages/no-such-message", headers=viewer) as r:
                    assert r.status == 404
                if answered_trace:  # the REST inbound continues a sent trace (the propagation work)
                    async with http.get(f"http://{admin}/api/messages/{TRACE}", headers=viewer) as r:
                        assert [m["envelope_id"] for m in (await r.json())["messages"]] == [envelope_id]

                # replay: the peer accepts now; the replay and the fourth attempt join the record
                [dl] = (await (await http.get(f"http://{admin}/api/dead-letters", headers=viewer)).json())[
                    "dead_letters"]
                async with http.post(f"http://{admin}/api/dead-letters/replay", json={"ids": [dl["id"]]},
                                     headers=editor) as r:
                    assert r.status == 200 and (await r.json())["replayed"] == 1
                await wait_for(lambda: peer.paths, what="the replayed order delivered")

            async def replayed_and_sent() -> bool:
                code, out, _ = await trace(envelope_id, "--url", f"http://{admin}", "--token", VIEWER, "--json")
                return code == 0 and _kinds(json.loads(out)[0])[-2:] == ["replay", "attempt"]

            await wait_for(replayed_and_sent, what="the replay in the record")
            code, out, _ = await trace(envelope_id, "--url", f"http://{admin}", "--token", VIEWER, "--json")
            events = json.loads(out)[0]["events"]
            assert events[-2]["by"] == "alice"
            assert (events[-1]["attempt"], events[-1]["outcome"]) == (1, "ok")
            code, _, err = await trace(envelope_id, "--url", f"http://{admin}", "--token", "wrong")
            assert code == 1 and "401" in err
        finally:
            await gw.ensure_stopped()


async def test_the_messages_api_takes_any_id_and_says_when_provenance_is_off(tmp_path: Path) -> None:
    api = free_port()
    cfg = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  console: {{type: log}}
routes:
  - {{name: r, from: api, mode: direct, to: [{{connector: console}}]}}
"""
    (tmp_path / "on").mkdir()
    async with running_gateway(tmp_path / "on", cfg) as rt, httpx.AsyncClient() as http:
        admin = f"http://{rt.config.model.gateway.admin.listen}"
        r = await http.post(f"http://127.0.0.1:{api}/x", json={}, headers={"Idempotency-Key": "orders/7 (north)"})
        envelope_id = r.json()["id"]
        r = await http.get(f"{admin}/api/messages/{quote('orders/7 (north)', safe='')}")
        assert r.status_code == 200, r.text
        [message] = r.json()["messages"]
        assert message["envelope_id"] == envelope_id
        assert [(e["kind"], e.get("outcome")) for e in message["events"]] == [
            ("received", None), ("route", "matched"), ("attempt", "ok")]
        assert (await http.get(f"{admin}/api/messages/{'x' * 1001}")).status_code == 422
    off = tmp_path / "off"
    off.mkdir()
    gateway = (f'gateway:\n  admin: {{listen: "127.0.0.1:{free_port()}"}}\n'
               f'  spool: {{path: "{off / "spool.db"}", min_free_bytes: 0}}\n  state_dir: "{off / "state"}"\n'
               "  provenance: {enabled: false}\n")
    async with running_gateway(off, gateway + cfg) as rt, httpx.AsyncClient() as http:
        r = await http.get(f"http://{rt.config.model.gateway.admin.listen}/api/messages/{envelope_id}")
        assert r.status_code == 404 and "provenance is off" in r.json()["detail"]
        assert not (off / "provenance.db").exists()
