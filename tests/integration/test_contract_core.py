"""The shared connector contract, run for the core's own connectors against real peers: the file
system (file), an HTTP server and client (rest) and Python's logging (log)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.contract import Connector
from gateway.envelope import Envelope
from gateway.http import HttpHub
from tests.contract import InboundContract, OutboundContract, make_connector
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


class TestLogContract(OutboundContract):
    """The peer is Python's logging: ``received`` is what a handler on the connector's logger saw."""

    kind = "log"
    records: list[logging.LogRecord]

    @pytest.fixture(autouse=True)
    def handler(self) -> Iterator[None]:
        self.records = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = self.records.append  # type: ignore[method-assign]
        logger = logging.getLogger("test.under-test")
        logger.addHandler(handler)
        level, logger.level = logger.level, logging.DEBUG
        yield
        logger.removeHandler(handler)
        logger.setLevel(level)

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"body": True, "level": "info"}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return self.config(tmp_path)

    async def received(self, tmp_path: Path) -> list[bytes]:
        return [str(r.fields["body"]).encode() for r in self.records  # type: ignore[attr-defined]
                if r.getMessage() == "message.logged"]

    async def test_a_peer_that_is_down_is_a_transient_error(self, tmp_path: Path) -> None:
        """Logging has no peer to lose: a send always succeeds, and says so in one event."""
        c = make_connector(self.kind, self.down_config(tmp_path), tmp_path)
        await c.open()
        try:
            env = Envelope(source="test", protocol="test", subject="contract/2", body=b"{}",
                           content_type="application/json")
            assert await c.send(env, self.target()) is None
            assert await self.received(tmp_path) == [b"{}"]
        finally:
            await c.close()
