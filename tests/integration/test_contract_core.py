"""The shared connector contract, run for the core's own connectors against real peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.contract import Connector
from gateway.http import HttpHub
from tests.contract import InboundContract, OutboundContract
from tests.gwtest import free_port, jsonl

pytestmark = pytest.mark.integration


class TestFileContract(OutboundContract):
    kind = "file"

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"path": str(tmp_path / "out.jsonl")}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a file where a directory should be")
        return {"path": str(blocker / "out.jsonl")}

    async def received(self, tmp_path: Path) -> list[bytes]:
        return [rec["body"].encode() for rec in jsonl(tmp_path / "out.jsonl")]


class TestRestOutboundContract(OutboundContract):
    kind = "rest"
    got: list[bytes]
    _runner: web.AppRunner | None = None

    @pytest.fixture(autouse=True)
    async def peer(self):  # type: ignore[no-untyped-def]
        self.got = []
        self.port = free_port()

        async def handle(request: web.Request) -> web.Response:
            self.got.append(await request.read())
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        yield
        await runner.cleanup()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"base_url": f"http://127.0.0.1:{self.port}", "timeout": 2}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"base_url": f"http://127.0.0.1:{free_port()}", "timeout": 2}

    def options(self) -> dict[str, Any]:
        return {"path": "/contract"}

    async def received(self, tmp_path: Path) -> list[bytes]:
        return list(self.got)


class TestRestInboundContract(InboundContract):
    kind = "rest"

    @pytest.fixture(autouse=True)
    def port(self) -> None:
        self.listen_port = free_port()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"listen": f"127.0.0.1:{self.listen_port}", "auth": {"type": "none"}}

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{self.listen_port}/x", content=body,
                                headers={"content-type": "application/json"})
        if r.status_code == 202:
            return "ack"
        if r.status_code == 503:
            assert r.headers["retry-after"]
            return "temporary"
        if 400 <= r.status_code < 500:
            return "permanent"
        return f"unexpected {r.status_code}"
