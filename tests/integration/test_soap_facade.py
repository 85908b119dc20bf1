"""The REST façade generated from a WSDL, and round trips that cross JSON ⇄ XML in both directions.

Round trip path (one real gateway, real sockets): httpx → façade (JSON) → soap outbound (JSON →
XML) → the gateway's own SOAP service (XML → JSON) → REST backend /echo → reply (JSON → XML) →
soap outbound's reply (XML → JSON) → httpx. Whatever went in must come out unchanged.
"""

from __future__ import annotations

import copy
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gwtest import free_port, running_gateway
from tests.legacy.rest_backend import rest_backend
from tests.legacy.server import Legacy, legacy_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ORDERS = str(ROOT / "deploy" / "examples" / "orders.wsdl")


@pytest.fixture(scope="module")
def legacy() -> Iterator[Legacy]:
    with legacy_service() as lg:
        yield lg


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with rest_backend() as url:
        yield url


@pytest.fixture
async def base(tmp_path: Path, legacy: Legacy, backend: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("FACADE_TOKEN", "t0ken")
    port = free_port()
    yaml = f"""
connectors:
  orders:
    type: soap
    wsdl: {ORDERS}
    endpoint: "{legacy.orders}"
    rest_facade:
      listen: "127.0.0.1:{port}"
      prefix: /api/orders
      auth: {{type: bearer, tokens: ["${{FACADE_TOKEN}}"]}}
  loop-facade:
    type: soap
    wsdl: {ORDERS}
    endpoint: "http://127.0.0.1:{port}/soap/orders"
    rest_facade: {{listen: "127.0.0.1:{port}", prefix: /api/loop, auth: {{type: none}}}}
  loop-serve:
    type: soap
    wsdl: {ORDERS}
    serve: {{listen: "127.0.0.1:{port}", prefix: /soap/orders, auth: {{type: none}},
             public_url: "https://orders.example.com/soap"}}
  echo:
    type: rest
    base_url: "{backend}"
routes:
  - name: facade-to-legacy
    from: orders
    to: [{{connector: orders, operation: "{{{{ subject }}}}", reply: true}}]
  - name: loop-out
    from: loop-facade
    to: [{{connector: loop-facade, operation: "{{{{ subject }}}}", reply: true}}]
  - name: loop-in
    from: loop-serve
    to: [{{connector: echo, path: /echo, reply: true}}]
"""
    async with running_gateway(tmp_path, yaml):
        yield f"http://127.0.0.1:{port}"


AUTH = {"authorization": "Bearer t0ken"}


def order(order_id: str) -> dict[str, Any]:
    return {
        "id": order_id,
        "customer": {"number": "c-1", "name": "Ünïcode ✓ 漢字 😀 \"q\" <&>", "email": "a@b.c", "vip": True},
        "shipTo": {"street": "  two  spaces  ", "city": "Köln", "postcode": "50667", "country": "DE"},
        "billTo": {"street": "b", "city": "c", "country": "FR"},
        "line": [{"sku": "ONE-1", "quantity": 1, "unitPrice": 19.99, "note": None, "tag": ["solo"]}],
        "orderDate": "2024-02-29",
        "deliverAfter": "2024-03-01T10:00:00Z",
        "status": "SHIPPED",
        "priority": False,
        "discount": None,
        "weightKg": 0.1,
        "comment": "",
    }


async def test_openapi_describes_every_operation(base: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{base}/api/orders/openapi.json")
    doc = r.json()
    assert doc["openapi"].startswith("3.0") and doc["servers"] == [{"url": f"{base}/api/orders"}]
    assert set(doc["paths"]) == {"/PlaceOrder", "/GetOrder", "/FindOrders", "/EchoOrder"}
    place = doc["paths"]["/PlaceOrder"]["post"]
    assert place["requestBody"]["content"]["application/json"]["schema"]["properties"]["order"] == {
        "$ref": "#/components/schemas/Order"}
    ok = place["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
    assert ok["warning"]["type"] == "array" and ok["total"]["type"] == "number"
    # The service answers date-times without a zone: RFC 3339's date-time format would forbid them.
    assert "format" not in ok["acceptedAt"] and re.match(ok["acceptedAt"]["pattern"], "2024-03-01T12:00:00")
    assert {"422", "502", "504"} <= set(place["responses"])
    schemas = doc["components"]["schemas"]
    assert schemas["Order"]["properties"]["status"]["enum"] == ["NEW", "PAID", "SHIPPED", "CANCELLED"]
    assert doc["security"] == [{"auth": []}] and doc["components"]["securitySchemes"]["auth"]["scheme"] == "bearer"


async def test_public_url_is_what_clients_are_told(base: str) -> None:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{base}/soap/orders?wsdl")
    assert b'location="https://orders.example.com/soap"' in r.content
    assert b'schemaLocation="https://orders.example.com/soap?xsd=1"' in r.content


async def test_swagger_ui_is_served_locally(base: str) -> None:
    async with httpx.AsyncClient() as client:
        page = await client.get(f"{base}/api/orders/docs")
        assert page.status_code == 200, "Swagger UI needs the swagger-ui-bundle package: pip install swagger-ui-bundle"
        assert "swagger-ui-bundle.js" in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace(base, "")  # no CDN
        js = await client.get(f"{base}/api/orders/docs/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 100_000
        init = await client.get(f"{base}/api/orders/docs/init.js")
        assert "/api/orders/openapi.json" in init.text
        missing = await client.get(f"{base}/api/orders/docs/../../etc/passwd")
        assert missing.status_code == 404


async def test_facade_calls_the_legacy_service(base: str) -> None:
    async with httpx.AsyncClient(headers=AUTH) as client:
        placed = await client.post(f"{base}/api/orders/PlaceOrder", json={"order": order("F-1")})
        assert placed.status_code == 200, placed.text
        assert placed.json() == {"orderId": "F-1", "status": "NEW", "total": 19.99, "acceptedAt": "2024-03-01T12:00:00",
                                 "warning": []}
        found = await client.post(f"{base}/api/orders/FindOrders", json={"customerName": "nobody"})
        assert found.json() == {"order": []}
        missing = await client.post(f"{base}/api/orders/GetOrder", json={"orderId": "nope"})
        problem = missing.json()
        assert missing.status_code == 422 and missing.headers["content-type"] == "application/problem+json"
        assert problem["fault"] == {"faultcode": "Client", "faultstring": "order nope not found",
                                    "detail": {"OrderNotFound": {"code": "NOT_FOUND", "message": "no order nope"}}}
        assert problem["envelope_id"] == missing.headers["x-envelope-id"]


async def test_facade_refuses_bad_input_before_routing(base: str) -> None:
    async with httpx.AsyncClient(headers=AUTH) as client:
        bad = copy.deepcopy(order("B-1"))
        bad["line"][0]["quantity"] = "1"
        bad["status"] = "LOST"
        r = await client.post(f"{base}/api/orders/EchoOrder", json={"order": bad})
        assert r.status_code == 422
        assert r.json()["errors"] == [{"path": "/order/line/0/quantity", "message": "expected an integer for "
                                                                                     "Quantity (xs:int)"}]
        bad["line"][0]["quantity"] = 1
        r = await client.post(f"{base}/api/orders/EchoOrder", json={"order": bad})
        assert r.status_code == 422 and "LOST" in r.json()["errors"][0]["message"]
        r = await client.post(f"{base}/api/orders/EchoOrder", content=b"{",
                              headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = await client.post(f"{base}/api/orders/EchoOrder", content=b"[" * 5000 + b"]" * 5000,
                              headers={"content-type": "application/json"})
        assert r.status_code == 400 and "deeper" in r.json()["detail"]
        r = await client.post(f"{base}/api/orders/EchoOrder", content=b"<x/>", headers={"content-type": "text/xml"})
        assert r.status_code == 415
        r = await client.post(f"{base}/api/orders/Nope", json={})
        assert r.status_code == 404
        r = await client.get(f"{base}/api/orders/EchoOrder")
        assert r.status_code == 405
        r = await client.post(f"{base}/api/orders/EchoOrder", content=b"{}" + b" " * (2 * 1024 * 1024),
                              headers={"content-type": "application/json"})
        assert r.status_code == 413
    async with httpx.AsyncClient() as anonymous:
        r = await anonymous.post(f"{base}/api/orders/EchoOrder", json={"order": order("A-1")})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = await anonymous.post(f"{base}/api/orders/EchoOrder", json={"order": order("A-1")},
                                 headers={"authorization": "Bearer wrong"})
        assert r.status_code == 403


@pytest.mark.parametrize("variant", ["as is", "one of each", "empty lists", "many", "nil and absent"])
async def test_round_trip_through_both_directions_is_lossless(base: str, variant: str) -> None:
    o = order("RT-" + variant)
    if variant == "one of each":
        o["line"] = [o["line"][0] | {"tag": ["only"]}]
    elif variant == "empty lists":
        o["line"][0]["tag"] = []
    elif variant == "many":
        o["line"] = [o["line"][0] | {"quantity": q, "unitPrice": q / 8, "tag": [str(q)] * q} for q in (1, 2, 3)]
        o["weightKg"] = 12345678.5
    elif variant == "nil and absent":
        for key in ("billTo", "deliverAfter", "weightKg", "comment"):
            del o[key]
        del o["customer"]["email"]
        del o["line"][0]["note"]
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{base}/api/loop/EchoOrder", json={"order": o})
    assert r.status_code == 200, r.text
    assert r.json() == {"order": o}


async def test_decimals_are_exact_across_the_loop(base: str) -> None:
    text = ('{"order": {"id": "D-1", "customer": {"number": "n", "name": "n", "vip": false}, '
            '"shipTo": {"street": "s", "city": "c", "country": "FR"}, '
            '"line": [{"sku": "DEC-1", "quantity": 1, "unitPrice": 123456789012345678.99, "tag": []}], '
            '"orderDate": "2024-01-01", "status": "NEW", "priority": true, "discount": 0.10}}')
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{base}/api/loop/EchoOrder", content=text.encode(),
                              headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert '"unitPrice":123456789012345678.99' in r.text and '"discount":0.10' in r.text
