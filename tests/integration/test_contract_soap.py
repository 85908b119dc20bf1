"""The shared connector contract for soap: out to the spyne legacy calculator (tests/legacy),
in from a plain HTTP client posting SOAP 1.1 envelopes to the served WSDL service."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from gateway.contract import Connector
from gateway.envelope import Envelope
from gateway.http import HttpHub
from tests.contract import InboundContract, OutboundContract
from tests.gwtest import free_port
from tests.legacy.server import build_app, legacy_service

pytestmark = pytest.mark.integration

CALC = str(Path(__file__).resolve().parents[2] / "deploy" / "examples" / "calculator.wsdl")
CALC_NS = "http://example.com/calculator"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SAMPLE = b'{"a": 20, "b": 22}'


class Tap:
    """The legacy service, with a copy of every request body it was sent."""

    def __init__(self) -> None:
        self.app = build_app()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.bodies.append(body)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def add_fields(request: bytes) -> bytes | None:
    """The fields of an ``Add`` call as compact JSON, or None for another request."""
    add = etree.fromstring(request).find(f".//{{{CALC_NS}}}Add")
    if add is None:
        return None
    return json.dumps({etree.QName(child).localname: int(child.text or 0) for child in add}).encode()


class TestSoapOutboundContract(OutboundContract):
    kind = "soap"
    sample = SAMPLE
    tap: Tap

    @pytest.fixture(autouse=True)
    def legacy(self) -> Iterator[None]:
        self.tap = Tap()
        with legacy_service(app=self.tap) as lg:
            self.endpoint = lg.calculator11
            yield

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"wsdl": CALC, "endpoint": self.endpoint, "timeout": 5}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"wsdl": CALC, "endpoint": f"http://127.0.0.1:{free_port()}/calculator/soap11", "timeout": 2}

    def options(self) -> dict[str, Any]:
        return {"operation": "Add"}

    def arrived(self, sample: bytes, received: list[bytes]) -> bool:
        return sample in [add_fields(body) for body in received]

    async def received(self, tmp_path: Path) -> list[bytes]:
        return list(self.tap.bodies)


class TestSoapInboundContract(InboundContract):
    """The caller's answer: 202 (taken, nothing to reply), a Server fault with Retry-After
    (temporary) or a Client fault (permanent)."""

    kind = "soap"
    sample = SAMPLE

    @pytest.fixture(autouse=True)
    def port(self) -> None:
        self.listen_port = free_port()

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return {"wsdl": CALC, "serve": {"listen": f"127.0.0.1:{self.listen_port}", "prefix": "/soap/calc",
                                        "auth": {"type": "none"}}}

    def body_of(self, env: Envelope) -> bytes:
        return json.dumps(json.loads(env.body)).encode()

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        fields = "".join(f"<{k}>{v}</{k}>" for k, v in json.loads(body).items())
        request = (f'<s:Envelope xmlns:s="{SOAP11}"><s:Body><Add xmlns="{CALC_NS}">{fields}</Add>'
                   "</s:Body></s:Envelope>").encode()
        async with httpx.AsyncClient(timeout=20) as client:
            r = await client.post(f"http://127.0.0.1:{self.listen_port}/soap/calc", content=request,
                                  headers={"content-type": "text/xml; charset=utf-8", "soapaction": f"{CALC_NS}/Add"})
        if r.status_code == 202:
            return "ack"
        code = etree.fromstring(r.content).findtext(".//faultcode") or ""
        if code.endswith("Server") and r.headers.get("retry-after"):
            return "temporary"
        if code.endswith("Client"):
            return "permanent"
        return f"unexpected {r.status_code} {code}"
