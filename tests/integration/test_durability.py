"""Outages of the outbound peer, end to end through a real gateway: REST in → spool → REST out.

Every message the gateway answered ``202`` must reach the sink once the peer is back,
whatever happened in between (503s, resets, requests cut in half, half-open sockets,
latency). Duplicates are allowed (at-least-once) and reported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.delivery.engine import DeliveryOptions
from gateway.runtime import Runtime
from tests.faultproxy import FaultProxy, HttpSink
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration

RETRY = "on_failure: {retry: {attempts: 1000, initial: 0.05, max: 0.3}}"


def config(inbound_port: int, outbound: str, *, timeout: str = "2s") -> str:
    return f"""
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{inbound_port}"
    auth: {{type: none}}
    endpoints: [{{path: "/in/**", methods: [POST]}}]
  out:
    type: rest
    base_url: "http://{outbound}"
    timeout: {timeout}
routes:
  - name: to-sink
    from: api
    to: [{{connector: out, path: /sink}}]
    {RETRY}
"""


@pytest.fixture
async def sink() -> AsyncIterator[HttpSink]:
    async with HttpSink() as s:
        yield s


async def send(session: aiohttp.ClientSession, port: int, ident: str) -> tuple[int, dict[str, str]]:
    async with session.post(f"http://127.0.0.1:{port}/in/{ident}", json={"id": ident}) as r:
        await r.read()
        return r.status, dict(r.headers)


def metric(rt: Runtime, name: str, **labels: str) -> float:
    return rt.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_outbound_503_then_200_delivers_every_message(tmp_path: Path, sink: HttpSink) -> None:
    port = free_port()
    sink.status = 503
    async with running_gateway(tmp_path, config(port, f"127.0.0.1:{sink.port}")) as rt, \
            aiohttp.ClientSession() as session:
        ids = [f"m{i}" for i in range(30)]
        for ident in ids:
            assert (await send(session, port, ident))[0] == 202
        # five failures in a row open the circuit: the dead peer is then only probed
        await wait_for(lambda: rt.delivery.circuit("out") == "open", what="circuit open")
        assert sum(sink.counts.values()) == 0
        assert metric(rt, "gateway_delivery_failures_total", connector="out", route="to-sink",
                      outcome="transient") >= 5
        assert metric(rt, "gateway_circuit_state", connector="out") == 2
        sink.status = 200
        await wait_for(lambda: all(sink.got(i) for i in ids), timeout=20, what="every message after recovery")
        assert await rt.spool.count_dead_letters() == 0
        await wait_for(lambda: _empty(rt), what="spool emptied")
        print(f"\n503→200: {len(ids)} acknowledged, {len(ids)} delivered, {sink.duplicates} duplicates, "
              f"{sink.requests} requests")


async def _empty(rt: Runtime) -> bool:
    return not await rt.spool.depth()


async def test_resets_cuts_half_open_sockets_and_latency_lose_nothing(tmp_path: Path, sink: HttpSink) -> None:
    port = free_port()
    async with FaultProxy("127.0.0.1", sink.port) as proxy, \
            running_gateway(tmp_path, config(port, proxy.address, timeout="0.5s")) as rt, \
            aiohttp.ClientSession() as session:
        sent: list[str] = []

        async def burst(tag: str, n: int = 10) -> None:
            for i in range(n):
                ident = f"{tag}{i}"
                assert (await send(session, port, ident))[0] == 202
                sent.append(ident)

        def transient() -> float:
            return metric(rt, "gateway_delivery_failures_total", connector="out", route="to-sink", outcome="transient")

        async def phase(tag: str, seen: str, effect: object) -> None:
            """Send a burst under the fault, see the fault bite, heal, see everything arrive."""
            await burst(tag)
            await wait_for(effect, timeout=10, what=seen)
            proxy.heal()
            await wait_for(lambda: all(sink.got(i) for i in sent), timeout=15, what=f"every message after {tag}")

        # 1. the peer's port resets every connection
        proxy.refuse = True
        await phase("reset", "connections reset", lambda: proxy.resets >= 3)
        # 2. requests cut in half (inside the headers)
        proxy.cut()  # pooled keep-alive connections would bypass a fault that bites new connections
        proxy.drop_after, before = 40, proxy.resets
        await phase("cut", "requests cut", lambda: proxy.resets >= before + 3)
        # 3. half-open: connections accepted, nothing ever answers; only the 0.5 s timeout tells
        proxy.blackhole, failures = True, transient()
        await phase("hole", "timeouts on half-open sockets", lambda: transient() >= failures + 3)
        # 4. slow, and the connections in flight reset once more
        proxy.latency, sink.hang = 0.05, True
        await burst("slow", 3)
        await wait_for(lambda: sink.inflight >= 1, what="requests held at the sink")
        proxy.cut()
        sink.hang = False
        await wait_for(lambda: all(sink.got(i) for i in sent), timeout=15, what="every message after the cut")
        assert await rt.spool.count_dead_letters() == 0
        # the envelope id travels as Idempotency-Key, so the sink could have deduplicated
        assert len([k for k in sink.keys if k]) == len(sent)
        print(f"\nfault proxy: {len(sent)} acknowledged, {len(sent)} delivered, {sink.duplicates} duplicates, "
              f"{proxy.resets} resets, {proxy.connections} connections")


async def test_a_full_queue_answers_503_and_shows_in_readiness_without_taking_the_pod_out(
        tmp_path: Path, sink: HttpSink) -> None:
    """A full queue refuses only messages for its connector (with Retry-After), and would be full on
    every replica alike: /readyz reports it but stays 200, so the pod keeps taking other work."""
    port = free_port()
    sink.status = 503
    async with running_gateway(tmp_path, config(port, f"127.0.0.1:{sink.port}")) as rt, \
            aiohttp.ClientSession() as session:
        rt.delivery.options = DeliveryOptions(max_pending=5)  # gateway.spool.max_pending
        admin = rt.config.model.gateway.admin.listen
        for i in range(5):
            assert (await send(session, port, f"q{i}"))[0] == 202
        status, headers = await send(session, port, "q5")
        assert status == 503 and int(headers["Retry-After"]) >= 1
        async with session.get(f"http://{admin}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["spool"]["backpressure"] == ["out"]
        sink.status = 200
        await wait_for(lambda: all(sink.got(f"q{i}") for i in range(5)), timeout=20, what="backlog delivered")
        await wait_for(lambda: not rt.readiness()[1]["spool"]["backpressure"], what="the queue below its bound")
        assert (await send(session, port, "q6"))[0] == 202
        await wait_for(lambda: sink.got("q6"), what="new message delivered")
        assert not sink.got("q5")  # refused means not taken: the sender keeps it


async def test_idempotency_key_over_rest_delivers_once(tmp_path: Path, sink: HttpSink) -> None:
    port = free_port()
    async with running_gateway(tmp_path, config(port, f"127.0.0.1:{sink.port}")) as rt, \
            aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/in/pay"
        answers = []
        for _ in range(3):
            async with session.post(url, json={"id": "pay-1"}, headers={"Idempotency-Key": "client-key-1"}) as r:
                assert r.status == 202
                answers.append(await r.json())
        assert "reason" not in answers[0]
        assert all(a["reason"].startswith("duplicate") and a["status"] == "accepted" for a in answers[1:])
        # the same key from a client that did not send one before is a different message
        async with session.post(url, json={"id": "pay-2"}, headers={"Idempotency-Key": "client-key-2"}) as r:
            assert r.status == 202 and "reason" not in await r.json()
        await wait_for(lambda: sink.got("pay-1") and sink.got("pay-2"), what="delivered")
        await wait_for(lambda: _empty(rt), what="spool emptied")
        assert sink.counts["pay-1"] == 1
        assert metric(rt, "gateway_idempotent_duplicates_total", connector="api") == 2
