"""Graceful shutdown of a real gateway process: SIGTERM with messages in flight.

Readiness goes false at once and new messages are refused; in-flight spooled sends get until
``gateway.drain`` and then stay in the spool; a direct message that cannot finish is answered
503 (its sender retries); the process exits 0; the next start delivers what was left.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.faultproxy import HttpSink
from tests.gwtest import free_port, wait_for
from tests.integration.test_crash import GatewayProcess, RestSender, gateway_yaml, spool_depth

pytestmark = pytest.mark.integration


class DirectRestSender(RestSender):
    """The REST sender plus a direct-mode endpoint whose answer waits for the sink."""

    def connectors_yaml(self) -> str:
        return (f'  in-rest: {{type: rest, listen: "127.0.0.1:{self.port}", auth: {{type: none}},'
                f' endpoints: [{{path: "/in/**", methods: [POST]}}, {{path: "/direct/**", methods: [POST]}}]}}\n')

    def routes_yaml(self) -> str:
        return """  - name: direct-to-sink
    from: in-rest
    match: {subject: "/direct/**"}
    mode: direct
    to: [{connector: sink, path: /sink}]
""" + super().routes_yaml()


@pytest.fixture
async def sink() -> AsyncIterator[HttpSink]:
    async with HttpSink() as s:
        yield s


async def test_sigterm_drains_keeps_spooled_work_and_exits_0(tmp_path: Path, sink: HttpSink) -> None:
    sender = DirectRestSender()
    admin = f"127.0.0.1:{free_port()}"
    config = tmp_path / "routes.yaml"
    config.write_text(gateway_yaml(tmp_path, admin, sink, [sender], drain="1s"))
    gw = GatewayProcess(config, admin, tmp_path / "gateway.log")
    sink.hang = True  # every send stays in flight
    await sender.open()
    try:
        await gw.start()
        ids = [f"rest:{i}" for i in range(20)]
        for i in range(20):
            assert await sender.send(i)
        await wait_for(lambda: sink.inflight >= 1, what="sends in flight")
        async with aiohttp.ClientSession() as session:
            direct = asyncio.ensure_future(session.post(f"http://127.0.0.1:{sender.port}/direct/1",
                                                        json={"id": "direct:1"}))
            await wait_for(lambda: sink.inflight >= 2, what="the direct send in flight too")

            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: _ready_is(gw, 503), timeout=3, what="readiness false while draining")
            async with session.post(f"http://127.0.0.1:{sender.port}/in/late", json={"id": "rest:late"}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
            assert await gw.wait(timeout=15) == 0, gw.tail()

            reply = await direct
            assert reply.status == 503, "a direct message that could not finish is answered 'retry'"
            reply.release()
        log = gw.log.read_text()
        assert '"event": "delivery.abandoned"' in log and '"event": "gateway.stopped"' in log
        assert spool_depth(tmp_path / "spool.db") == 20, "the spooled messages stay for the next start"
        assert sum(sink.counts.values()) == 0

        sink.hang = False
        await gw.start()
        await wait_for(lambda: all(sink.got(i) for i in ids), timeout=15, what="delivered after the restart")
        assert not sink.got("rest:late")
        assert await gw.terminate() == 0
        assert spool_depth(tmp_path / "spool.db") == 0
    finally:
        sink.hang = False
        await gw.ensure_stopped()
        await sender.close()


async def _ready_is(gw: GatewayProcess, code: int) -> bool:
    return await gw.ready_status() == code
