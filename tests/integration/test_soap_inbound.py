"""SOAP clients calling the gateway's SOAP service (zeep as the real client, over real sockets):
SOAP → REST (the REST backend in tests/legacy), SOAP → SOAP (the spyne legacy service), and the
hostile inputs of RELIABILITY.md #22–24.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import zeep
from lxml import etree
from zeep.transports import Transport

from gateway.runtime import Runtime
from tests.gwtest import free_port, running_gateway
from tests.legacy.rest_backend import rest_backend
from tests.legacy.server import Capture, Legacy, legacy_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CALC = str(ROOT / "deploy" / "examples" / "calculator.wsdl")
ORDERS = str(ROOT / "deploy" / "examples" / "orders.wsdl")
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"


@pytest.fixture(scope="module")
def legacy() -> Iterator[Legacy]:
    with legacy_service() as lg:
        yield lg


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with rest_backend() as url:
        yield url


class Gw:
    def __init__(self, rt: Runtime, port: int):
        self.rt = rt
        self.port = port
        self.calc = f"http://127.0.0.1:{port}/soap/calc"
        self.orders = f"http://127.0.0.1:{port}/soap/orders"


@pytest.fixture
async def gw(tmp_path: Path, legacy: Legacy, backend: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gw]:
    monkeypatch.setenv("CALC_PW", "pw-calc")
    port = free_port()
    yaml = f"""
connectors:
  calc-in:
    type: soap
    wsdl: {CALC}
    serve:
      listen: "127.0.0.1:{port}"
      prefix: /soap/calc
      auth: {{type: basic, users: [{{username: alice, password: "${{CALC_PW}}"}}]}}
  orders-in:
    type: soap
    wsdl: {ORDERS}
    endpoint: "{legacy.orders}"
    serve: {{listen: "127.0.0.1:{port}", prefix: /soap/orders, auth: {{type: none}}, max_body: 1MiB}}
  backend:
    type: rest
    base_url: "{backend}"
    timeout: 5s
  out:
    type: file
    path: {tmp_path / "oneway.jsonl"}
routes:
  - name: oneway-multiply
    from: calc-in
    match: {{subject: Multiply, when: "data.a == 0"}}
    to: [{{connector: out}}]
  - name: calc-to-rest
    from: calc-in
    timeout: 1s
    to: [{{connector: backend, path: "/calc/{{{{ subject }}}}", reply: true}}]
  - name: orders-to-legacy
    from: orders-in
    to: [{{connector: orders-in, operation: "{{{{ subject }}}}", reply: true}}]
"""
    async with running_gateway(tmp_path, yaml) as rt:
        yield Gw(rt, port)


def zeep_client(url: str, user: str | None = "alice", password: str = "pw-calc") -> zeep.Client:
    session = requests.Session()
    if user:
        session.auth = (user, password)
    return zeep.Client(url + "?wsdl", transport=Transport(session=session, timeout=10))


async def in_thread(fn: Callable[[], Any]) -> Any:
    """zeep is blocking; the gateway runs on this loop."""
    return await asyncio.to_thread(fn)


def fault_of(fn: Callable[[], Any]) -> zeep.exceptions.Fault:
    try:
        fn()
    except zeep.exceptions.Fault as fault:
        return fault
    raise AssertionError("expected a SOAP fault")


async def test_soap_to_rest_with_zeep_both_versions(gw: Gw) -> None:
    def run() -> None:
        client = zeep_client(gw.calc)
        assert [list(s.ports) for s in client.wsdl.services.values()] == [["CalculatorSoap11", "CalculatorSoap12"]]
        assert client.service.Add(2, 40) == 42
        total = client.service.Sum([1.5])
        assert (total.total, total.count) == (1.5, 1)
        assert client.service.Sum([]).count == 0
        soap12 = client.bind("Calculator", "CalculatorSoap12")
        assert soap12.Multiply(6, 7) == 42

    await in_thread(run)


async def test_wsdl_is_served_with_the_gateways_address(gw: Gw) -> None:
    async with httpx.AsyncClient(auth=("alice", "pw-calc")) as client:
        r = await client.get(gw.calc + "?wsdl")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/xml")
        doc = etree.fromstring(r.content)
        addresses = doc.xpath("//*[local-name()='address']/@location")
        assert addresses == [gw.calc, gw.calc]
        r = await client.get(gw.orders + "?WSDL")
        assert f'schemaLocation="{gw.orders}?xsd=1"'.encode() in r.content
        r = await client.get(gw.orders + "?xsd=1")
        assert r.status_code == 200 and b'name="OrderStatus"' in r.content
        r = await client.get(gw.orders + "?xsd=7")
        assert r.status_code == 404
        r = await client.get(gw.orders + "?wsdl", headers={"host": "evil.example/<x>"})
        assert r.status_code == 200 and b"evil.example" not in r.content


async def test_rest_failures_become_soap_faults(gw: Gw) -> None:
    def run() -> list[zeep.exceptions.Fault]:
        client = zeep_client(gw.calc)
        soap12 = client.bind("Calculator", "CalculatorSoap12")
        return [fault_of(lambda: client.service.Add(404, 1)), fault_of(lambda: client.service.Add(500, 1)),
                fault_of(lambda: client.service.Add(7777, 1)), fault_of(lambda: client.service.Multiply(1, 2)),
                fault_of(lambda: soap12.Add(404, 1))]

    started = time.monotonic()
    not_found, down, slow, bad_reply, not_found12 = await in_thread(run)
    assert time.monotonic() - started < 5
    assert not_found.code == "soap:Client" and "no such account 404" in not_found.message
    assert down.code == "soap:Server" and "retry later" in down.message
    assert slow.code == "soap:Server" and "in time" in slow.message
    assert bad_reply.code == "soap:Server" and "MultiplyResponse" in bad_reply.message
    assert not_found12.code == "soap:Sender"
    gw_ns = {"gw": "urn:gateway:soap"}
    assert not_found.detail.findtext(".//gw:status", namespaces=gw_ns) == "404"
    assert not_found.detail.findtext(".//gw:retryable", namespaces=gw_ns) == "false"
    assert down.detail.findtext(".//gw:retryable", namespaces=gw_ns) == "true"
    assert len(not_found.detail.findtext(".//gw:envelope_id", namespaces=gw_ns) or "") == 26
    for fault in (not_found, down, slow, bad_reply):
        text = etree.tostring(fault.detail).decode() + fault.message
        assert "127.0.0.1" not in text and "Traceback" not in text


async def test_soap_to_soap_proxy_keeps_types_and_faults(gw: Gw) -> None:
    order = {"id": "PX-1", "customer": {"number": "c1", "name": "Ünïcode ✓", "vip": False},
             "shipTo": {"street": "s", "city": "c", "country": "DE"},
             "line": [{"sku": "AB-12", "quantity": 3, "unitPrice": "1.10", "tag": ["x"]}],
             "orderDate": "2024-01-31", "status": "NEW", "priority": True, "discount": "0.30"}

    def run() -> None:
        client = zeep.Client(gw.orders + "?wsdl")
        placed = client.service.PlaceOrder(order)
        assert placed.orderId == "PX-1" and str(placed.total) == "3.00" and placed.warning == []
        echoed = client.service.EchoOrder(order)
        assert echoed.customer.name == "Ünïcode ✓" and echoed.line[0].tag == ["x"]
        assert echoed.line[0].quantity == 3 and echoed.priority is True
        fault = fault_of(lambda: client.service.GetOrder("nope"))
        # The service's fault reaches the caller as the service wrote it.
        assert fault.code == "soap11env:Client" and fault.message == "order nope not found"
        (not_found,) = list(fault.detail)
        assert not_found.tag == "{http://example.com/orders}OrderNotFound"
        assert not_found.findtext("{http://example.com/orders/types}code") == "NOT_FOUND"

    await in_thread(run)


def envelope(body: str, version: str = "1.1", header: str = "") -> bytes:
    ns = SOAP11 if version == "1.1" else "http://www.w3.org/2003/05/soap-envelope"
    return (f'<s:Envelope xmlns:s="{ns}">{header}<s:Body>{body}</s:Body></s:Envelope>').encode()


ADD = '<Add xmlns="http://example.com/calculator"><a>{a}</a><b>{b}</b></Add>'


async def call(url: str, body: bytes, content_type: str = "text/xml; charset=utf-8", **kw: Any) -> httpx.Response:
    async with httpx.AsyncClient(auth=("alice", "pw-calc"), timeout=20) as client:
        return await client.post(url, content=body, headers={"content-type": content_type}, **kw)


def faultstring(r: httpx.Response) -> str:
    doc = etree.fromstring(r.content)
    return doc.findtext(".//faultstring") or doc.findtext(".//{*}Text") or ""


async def test_bad_requests_get_client_faults(gw: Gw) -> None:
    r = await call(gw.calc, envelope(ADD.format(a="x", b=1)))
    assert r.status_code == 500 and "does not fit Add" in faultstring(r) and "xs:int" in faultstring(r)
    assert b"<faultcode>soap:Client</faultcode>" in r.content
    r = await call(gw.calc, envelope('<Nope xmlns="http://example.com/calculator"/>'))
    assert "not an operation" in faultstring(r)
    header = '<s:Header><t:Tx xmlns:t="urn:tx" s:mustUnderstand="1">1</t:Tx></s:Header>'
    r = await call(gw.calc, envelope(ADD.format(a=1, b=1), header=header))
    assert b"soap:MustUnderstand" in r.content
    r = await call(gw.calc, envelope(ADD.format(a=1, b=1)), content_type="application/json")
    assert r.status_code == 415
    r = await call(gw.calc, b"<notsoap/>")
    assert r.status_code == 500 and "not a SOAP envelope" in faultstring(r)
    r = await call(gw.orders, envelope(ADD.format(a=1, b=1)))  # a SOAP 1.1 request to a 1.1-only service: ok op?
    assert "not an operation" in faultstring(r)
    r = await call(gw.orders, envelope('<GetOrder xmlns="http://example.com/orders"><orderId>1</orderId></GetOrder>',
                                       version="1.2"), content_type="application/soap+xml")
    assert b"soap:VersionMismatch" in r.content
    async with httpx.AsyncClient() as client:
        r = await client.post(gw.calc, content=envelope(ADD.format(a=1, b=1)), headers={"content-type": "text/xml"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        r = await client.post(gw.calc, content=envelope(ADD.format(a=1, b=1)), headers={"content-type": "text/xml"},
                              auth=("alice", "wrong"))
        assert r.status_code == 403
        r = await client.get(gw.orders)
        assert r.status_code == 404


async def test_one_way_acknowledgement_after_the_durable_write(gw: Gw, tmp_path: Path) -> None:
    r = await call(gw.calc, envelope('<Multiply xmlns="http://example.com/calculator"><a>0</a><b>5</b></Multiply>'))
    assert r.status_code == 202 and r.content == b"" and r.headers["x-envelope-id"]
    out = tmp_path / "oneway.jsonl"
    for _ in range(100):  # the sink creates the file before it appends the line: wait for the line
        if out.exists() and out.read_text().endswith("\n"):
            break
        await asyncio.sleep(0.05)
    line = out.read_text()
    assert r.headers["x-envelope-id"] in line and '\\"a\\":0' in line


# --- hostile inputs (RELIABILITY.md #22-24) ---------------------------------------------------


async def test_xxe_file_and_http_entities_are_refused_and_nothing_is_fetched(gw: Gw, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    bait = Capture(body=b"<a>fetched</a>")
    with legacy_service(app=bait) as srv:
        for entity in (f"file://{secret}", f"{srv.base}/xxe.dtd"):
            body = (f'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY e SYSTEM "{entity}">]>'.encode()
                    + envelope(ADD.format(a="&e;", b=1)))
            r = await call(gw.calc, body)
            assert r.status_code == 500 and b"soap:Client" in r.content
            assert "DTDs and entity declarations are not allowed" in faultstring(r)
            assert b"TOP-SECRET" not in r.content
        param = (f'<!DOCTYPE x [<!ENTITY % p SYSTEM "{srv.base}/p.dtd"> %p;]>'.encode()
                 + envelope(ADD.format(a=1, b=1)))
        r = await call(gw.calc, param)
        assert b"soap:Client" in r.content
    assert bait.requests == []


async def test_billion_laughs_is_refused_within_a_second(gw: Gw) -> None:
    lol = '<!ENTITY l0 "lol">' + "".join(f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10))
    body = f'<?xml version="1.0"?><!DOCTYPE s:Envelope [{lol}]>'.encode() + envelope(ADD.format(a="&l9;", b=1))
    started = time.monotonic()
    r = await call(gw.calc, body)
    assert time.monotonic() - started < 1.0
    assert r.status_code == 500 and b"soap:Client" in r.content


async def test_deep_nesting_is_refused_before_parsing(gw: Gw) -> None:
    deep = "<a>" * 10_000 + "</a>" * 10_000
    started = time.monotonic()
    r = await call(gw.calc, envelope(deep))
    assert time.monotonic() - started < 1.0
    assert b"soap:Client" in r.content and "nested deeper than 64" in faultstring(r)


async def test_a_50_mb_body_is_refused_with_bounded_memory(gw: Gw) -> None:
    chunk = b"<a>" + b"x" * (1024 * 1024 - 7) + b"</a>"
    head = b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'

    async def fifty_megabytes() -> AsyncIterator[bytes]:
        yield head
        for _ in range(50):
            yield chunk

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    # Announced: refused from the Content-Length, before a byte of the body is read.
    async with httpx.AsyncClient(auth=("alice", "pw-calc"), timeout=20) as client:
        size = str(len(head) + 50 * len(chunk))
        r = await client.post(gw.calc, headers={"content-type": "text/xml", "content-length": size},
                              content=fifty_megabytes())
        assert r.status_code == 413 and b"soap:Client" in r.content
        # Not announced (chunked): refused as soon as the limit is passed.
        try:
            r = await client.post(gw.calc, headers={"content-type": "text/xml"}, content=fifty_megabytes())
            assert r.status_code == 413
        except httpx.WriteError:
            pass  # the server answered and closed while we were still sending: also a refusal
    assert time.monotonic() - started < 10
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 40 * 1024, f"peak memory grew by {grown_kib} KiB"
