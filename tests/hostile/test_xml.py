"""Hostile XML against the SOAP connector: requests to its service and replies from a backend.

Every body below is refused with a SOAP Client fault (HTTP 500 as SOAP 1.1's binding and WS-I
Basic Profile R1126 prescribe, or 413 over the size limit) while
``/healthz`` keeps answering, and a backend's hostile reply is a permanent failure of the call
(dead-lettered after one call, not retried). A regex pre-scan that backtracked over unclosed
tags held the loop for seconds on 24 KB of ``<a``; every parse here is one linear pass, and
large bodies are parsed in a worker thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web
from lxml import etree

from tests.gwtest import wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CALC = ROOT / "deploy" / "examples" / "calculator.wsdl"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"


def envelope(inner: bytes) -> bytes:
    return f'<s:Envelope xmlns:s="{SOAP11}"><s:Body>'.encode() + inner + b"</s:Body></s:Envelope>"


def within_a_megabyte(unit: bytes, head: bytes = b"<r>", tail: bytes = b"</r>") -> bytes:
    return envelope(head + unit * ((1_000_000 - len(head) - len(tail) - 120) // len(unit)) + tail)


LAUGHS = ('<!DOCTYPE s:Envelope [<!ENTITY l0 "lol">'
          + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)) + "]>").encode()

#: name → (body, status, a phrase of the fault's reason)
ATTACKS: dict[str, tuple[bytes, int, str]] = {
    "24 KB of unclosed tags": (b"<a" * 12_000, 500, "not well-formed"),
    "1 MB of unclosed tags": (b"<a" * 500_000, 500, "not well-formed"),
    "unclosed tags inside the Body": (envelope(b"<a" * 400_000), 500, "not well-formed"),
    "unclosed quotes": (envelope(b'<a x="' * 150_000), 500, "not well-formed"),
    "unclosed processing instructions": (envelope(b"<?" * 400_000), 500, "not well-formed"),
    "unclosed comments": (envelope(b"<!--" * 200_000), 500, "not well-formed"),
    "10,000-deep nesting": (envelope(b"<a>" * 10_000 + b"</a>" * 10_000), 500, "nested deeper than 64"),
    "nesting just under the limit, many times": (within_a_megabyte(b"<a>" * 61 + b"</a>" * 61), 500,
                                                 "not an operation"),
    "a quarter million tiny elements": (within_a_megabyte(b"<a/>"), 500, "not an operation"),
    "100,000 attributes on one element": (
        envelope(b"<r " + b" ".join(b'a%d="x"' % i for i in range(90_000)) + b"/>"), 500, "not an operation"),
    "an attribute of 900 KB": (envelope(b'<r x="' + b"y" * 900_000 + b'"/>'), 500, "not an operation"),
    "60,000 namespace declarations": (
        envelope(b"<r " + b" ".join(b'xmlns:p%d="u"' % i for i in range(60_000)) + b"/>"), 500, "not an operation"),
    "a tag name of 900 KB": (envelope(b"<" + b"a" * 900_000 + b"/>"), 500, "not well-formed"),
    "comments everywhere": (within_a_megabyte(b"<!-- <a> -->"), 500, "not an operation"),
    "billion laughs": (LAUGHS + envelope(b"<r>&l9;</r>"), 500, "DTDs and entity declarations"),
    "a body over the limit": (envelope(b"<r>" + b"x" * 1_100_000 + b"</r>"), 413, "limit"),
}


def soap_routes(port: int, out: Path) -> str:
    return f"""
        connectors:
          calc-in:
            type: soap
            wsdl: "{CALC}"
            serve: {{listen: "127.0.0.1:{port}", prefix: /soap/calc, auth: {{type: none}}}}
          sink: {{type: file, path: "{out}"}}
        routes:
          - {{name: calc, from: calc-in, to: [{{connector: sink}}]}}
        """


def fault_reason(body: bytes) -> str:
    return etree.fromstring(body).findtext(".//faultstring") or ""


async def test_hostile_soap_requests_get_client_faults_and_the_loop_stays_free(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    url = f"http://127.0.0.1:{port}/soap/calc"
    headers = {"content-type": "text/xml; charset=utf-8", "soapaction": '"Add"'}
    add = envelope(b'<Add xmlns="http://example.com/calculator"><a>1</a><b>2</b></Add>')
    async with HostileGateway(tmp_path, soap_routes(port, out)) as gw:
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                for name, (body, status, reason) in ATTACKS.items():
                    async with http.post(url, data=body, headers=headers) as r:
                        answer = await r.read()
                        assert r.status == status, (name, r.status, answer[:300])
                        assert b"<faultcode>soap:Client</faultcode>" in answer, name
                        assert reason in fault_reason(answer), (name, fault_reason(answer))
                # A flood of megabyte bodies at once: bounded worker queue, every one answered.
                flood = ATTACKS["a quarter million tiny elements"][0]

                async def one() -> int:
                    async with http.post(url, data=flood, headers=headers) as r:
                        await r.read()
                        return r.status

                assert set(await asyncio.gather(*(one() for _ in range(12)))) == {500}
                async with http.post(url, data=add, headers=headers) as r:  # still serving
                    assert r.status == 202, await r.text()
        probe.assert_responsive()
        assert gw.loop_lag_worst() <= 0.25
        await gw.alive()


async def test_a_hostile_backend_reply_is_a_permanent_failure(tmp_path: Path) -> None:
    replies = {"unclosed": b"<a" * 12_000,
               "deep": envelope(b"<a>" * 10_000 + b"</a>" * 10_000),
               "doctype": LAUGHS + envelope(b"<r>&l9;</r>"),
               "tiny": envelope(b"<r>" + b"<a/>" * 1_100_000 + b"</r>")}
    calls: list[str] = []

    async def backend(request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        calls.append(kind)
        return web.Response(body=replies[kind], content_type="text/xml")

    app = web.Application()
    app.router.add_post("/{kind}", backend)
    runner = web.AppRunner(app)
    await runner.setup()
    backend_port, api_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", backend_port).start()
    connectors = "".join(f"""
          calc-{kind}:
            type: soap
            wsdl: "{CALC}"
            endpoint: "http://127.0.0.1:{backend_port}/{kind}"
            """ for kind in replies)
    routes = "".join(f"""
          - name: to-{kind}
            from: api
            match: {{subject: /calls/{kind}}}
            to: [{{connector: calc-{kind}, operation: Add, input: {{a: 1, b: 2}}}}]
            """ for kind in replies)
    config = f"""
        connectors:
          api:
            type: rest
            listen: "127.0.0.1:{api_port}"
            auth: {{type: none}}
            endpoints: [{{path: "/calls/**", methods: [POST]}}]
          {connectors.strip()}
        routes:
          {routes.strip()}
        """
    try:
        async with HostileGateway(tmp_path, config) as gw:
            with LoopProbe(gw.admin) as probe:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                    for kind in replies:
                        async with http.post(f"http://127.0.0.1:{api_port}/calls/{kind}", json={}) as r:
                            assert r.status < 500 or r.status == 502, (kind, r.status, await r.text())
                await wait_for(lambda: len(gw.events("delivery.dead_lettered")) == len(replies), timeout=60,
                               what="every hostile reply dead-lettered")
            probe.assert_responsive()
            assert gw.loop_lag_worst() <= 0.25
            await gw.alive()
            dead = {e["route"]: e for e in gw.events("delivery.dead_lettered")}
            assert {e["reason"] for e in dead.values()} == {"permanent"}, dead
            assert all("not a SOAP envelope" in dead[f"to-{k}"]["error"] for k in replies), dead
            assert sorted(calls) == sorted(replies)  # permanent: each backend called once, not retried
    finally:
        await runner.cleanup()
