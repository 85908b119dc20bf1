"""An ``Idempotency-Key`` across a crash in the middle of a direct send.

A real ``gateway run`` takes a REST message with an ``Idempotency-Key`` on a direct route and
sends it to a receiver that records it (with the envelope id the gateway sends as its own
``Idempotency-Key``) and then never answers. The gateway is ``kill -9``-ed while it waits for
that answer: the message has arrived, and the gateway has not written the outcome. The client
retries with the same key after the restart, as a client whose request failed does.

What the user checks: the receiver saw every copy under one envelope id (so it can drop the
second), the retry is answered with that id, and a further retry is answered from the record
without sending again.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.gwtest import free_port
from tests.integration.test_crash import GatewayProcess

pytestmark = pytest.mark.integration


class HoldingReceiver:
    """Records ``(body id, Idempotency-Key)`` of every request; while ``hold`` is set it answers
    nothing (for at most a minute), as a peer whose reply is lost."""

    def __init__(self) -> None:
        self.hold = True
        self.received: list[tuple[str, str]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        ident = str(json.loads(await request.read())["id"])
        self.received.append((ident, request.headers.get("Idempotency-Key", "")))
        for _ in range(600):
            if not self.hold:
                break
            await asyncio.sleep(0.1)
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver() -> AsyncIterator[HoldingReceiver]:
    r = HoldingReceiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def config(tmp_path: Path, admin: str, port: int, receiver: HoldingReceiver) -> str:
    return textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "{admin}"}}
          spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
          state_dir: "{tmp_path / 'state'}"
          drain: 1s
          log: {{level: info, format: json}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}},
                 endpoints: [{{path: "/in/**", methods: [POST]}}]}}
          receiver: {{type: rest, base_url: "http://127.0.0.1:{receiver.port}", timeout: 30s}}
        routes:
          - name: orders
            from: api
            mode: direct
            to: [{{connector: receiver, path: /orders}}]
        """)


async def post(port: int, timeout: float = 40) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
            s.post(f"http://127.0.0.1:{port}/in/orders", json={"id": "order-1"},
                   headers={"Idempotency-Key": "order-1"}) as r:
        body = await r.read()
        return r.status, json.loads(body).get("id", "") if r.status == 202 else ""


async def test_a_retry_after_a_crash_mid_send_keeps_the_envelope_id(tmp_path: Path,
                                                                    receiver: HoldingReceiver) -> None:
    admin, port = f"127.0.0.1:{free_port()}", free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(config(tmp_path, admin, port, receiver))
    gateway = GatewayProcess(path, admin, tmp_path / "gateway.log")
    try:
        await gateway.start()
        first = asyncio.ensure_future(post(port))
        for _ in range(200):
            if receiver.received:
                break
            await asyncio.sleep(0.05)
        assert receiver.received, f"the first attempt never reached the receiver:\n{gateway.tail()}"
        await gateway.kill9()  # sent, not answered, nothing recorded after the send
        with pytest.raises((aiohttp.ClientError, TimeoutError)):
            await first
        receiver.hold = False
        await gateway.start()
        status, envelope_id = await post(port)
        assert status == 202, gateway.tail()
        again_status, again_id = await post(port)
        assert await gateway.terminate() == 0, gateway.tail()
    finally:
        await gateway.ensure_stopped()
    keys = [key for ident, key in receiver.received if ident == "order-1"]
    print(f"\nreceiver got order-1 {len(keys)} times under envelope ids {sorted(set(keys))}")
    assert len(set(keys)) == 1, f"the retry went out as a new message: envelope ids {keys}"
    assert envelope_id == keys[0], "the retry is answered with the id the receiver saw"
    assert (again_status, again_id) == (202, envelope_id), "a later retry is answered from the record"
    assert len(keys) == 2, f"the later retry was sent again: {keys}"
