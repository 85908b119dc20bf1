"""REST → SOAP through a real in-process gateway, against the spyne legacy service over HTTP.

httpx is the REST client; the SOAP side is the spyne simulator in tests/legacy (real sockets).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from lxml import etree

from tests.gwtest import free_port, running_gateway, wait_for
from tests.legacy.server import Capture, Legacy, legacy_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CALC = str(ROOT / "deploy" / "examples" / "calculator.wsdl")
ORDERS = str(ROOT / "deploy" / "examples" / "orders.wsdl")


@pytest.fixture(scope="module")
def legacy() -> Iterator[Legacy]:
    with legacy_service() as lg:
        yield lg


def config(port: int, soap: str, route_to: str, *, extra: str = "", route_extra: str = "") -> str:
    return f"""
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {{type: none}}
    endpoints: [{{path: "/call/*", methods: [POST]}}]
  legacy:
    type: soap
{soap}
{extra}
routes:
  - name: rest-to-soap
    from: api
    timeout: 5s
{route_extra}
    to:
      - {{connector: legacy, {route_to}}}
"""


def calc(endpoint: str, *, port_name: str | None = None, more: str = "") -> str:
    lines = [f"    wsdl: {CALC}", f'    endpoint: "{endpoint}"', "    timeout: 1s"]
    if port_name:
        lines.append(f"    port: {port_name}")
    return "\n".join(lines) + more


def fresh(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


OP_FROM_PATH = "operation: \"{{ subject.rsplit('/', 1)[1] }}\", reply: true"


async def post(port: int, op: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(f"http://127.0.0.1:{port}/call/{op}", json=body)


async def test_types_survive_rest_to_soap_and_back(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    async with running_gateway(tmp_path, config(port, calc(legacy.calculator11), OP_FROM_PATH)):
        r = await post(port, "Add", {"a": 2, "b": 40})
        assert (r.status_code, r.json()) == (200, {"result": 42})
        r = await post(port, "Sum", {"value": [1.5]})
        assert r.json() == {"total": 1.5, "count": 1} and isinstance(r.json()["count"], int)
        r = await post(port, "Sum", {"value": []})
        assert r.json() == {"total": 0.0, "count": 0}
        r = await post(port, "Divide", {"dividend": 1, "divisor": 3})
        assert r.text == '{"result":0.3333}'  # an exact decimal number, not a float's digits
        assert r.headers["content-type"] == "application/json"


async def test_soap12_port(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    soap = calc(legacy.calculator12, port_name="CalculatorSoap12")
    async with running_gateway(tmp_path, config(port, soap, OP_FROM_PATH)):
        r = await post(port, "Multiply", {"a": 6, "b": 7})
        assert (r.status_code, r.json()) == (200, {"result": 42})
        r = await post(port, "Divide", {"dividend": 1, "divisor": 0})
        assert r.status_code == 422 and r.json()["upstream"]["message"] == "division by zero"


async def test_faults_timeouts_and_http_errors_map_to_statuses(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    async with running_gateway(tmp_path, config(port, calc(legacy.calculator11), OP_FROM_PATH)):
        r = await post(port, "Divide", {"dividend": 1, "divisor": 0})
        problem = r.json()
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        assert problem["upstream"]["faultcode"] == "Client.DivideByZero"
        assert problem["upstream"]["message"] == "division by zero"  # the backend's words, as it said them
        assert problem["detail"] == "the service behind the gateway refused the request"
        r = await post(port, "Subtract", {"a": -999, "b": 1})
        assert r.status_code == 502 and r.json()["upstream"]["faultcode"] == "Server.Busy" and r.headers["retry-after"]
        started = time.monotonic()
        r = await post(port, "Add", {"a": 7777, "b": 1})  # answers after 3 s; the connector waits 1 s
        assert r.status_code == 504 and time.monotonic() - started < 2.5
        r = await post(port, "Nope", {})
        assert r.status_code == 404 and r.json()["id"]
        r = await post(port, "Add", {"a": "2", "b": 40})
        assert r.status_code == 422 and any("/a: expected an integer" in e for e in r.json()["errors"])
        r = await post(port, "Add", {"a": 2})
        assert r.status_code == 422 and any("required element 'b'" in e for e in r.json()["errors"])


async def test_unreachable_and_wrong_endpoints(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    yaml = config(port, calc(f"http://127.0.0.1:{free_port()}/gone"), OP_FROM_PATH)
    async with running_gateway(fresh(tmp_path / "refused"), yaml):
        r = await post(port, "Add", {"a": 1, "b": 1})
        assert r.status_code == 502 and r.headers["retry-after"]
    port = free_port()
    yaml = config(port, calc(legacy.base + "/no/such/path"), OP_FROM_PATH)
    async with running_gateway(fresh(tmp_path / "404"), yaml):
        r = await post(port, "Add", {"a": 1, "b": 1})
        assert r.status_code == 502 and r.json()["upstream"]["status"] == 404 and "retry-after" not in r.headers


def sample_order(order_id: str) -> dict[str, Any]:
    return {
        "id": order_id,
        "customer": {"number": "c-7", "name": "Zoë Ünïcode ✓ 漢字 \"quoted\" <tag>", "vip": True},
        "shipTo": {"street": "1 Main St", "city": "Paris", "country": "FR"},
        "line": [{"sku": "ABC-1", "quantity": 2, "unitPrice": 12.5, "tag": ["gift"]}],
        "orderDate": "2024-02-29",
        "deliverAfter": "2024-03-01T10:00:00+00:00",
        "status": "PAID",
        "priority": False,
        "discount": None,
        "weightKg": 1.25,
    }


async def test_nested_order_round_trips_through_the_legacy_service(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    soap = f"    wsdl: {ORDERS}\n    endpoint: \"{legacy.orders}\""
    async with running_gateway(tmp_path, config(port, soap, OP_FROM_PATH)):
        order = sample_order("RT-1")
        r = await post(port, "EchoOrder", {"order": order})
        assert r.status_code == 200, r.text
        assert r.json() == {"order": order}
        two_lines = order | {"line": [order["line"][0] | {"tag": []},
                                      {"sku": "XYZ-9", "quantity": 1, "unitPrice": 0.1, "tag": ["a", "b"]}]}
        r = await post(port, "EchoOrder", {"order": two_lines})
        assert r.json() == {"order": two_lines}
        r = await post(port, "PlaceOrder", {"order": order})
        assert r.json() == {"orderId": "RT-1", "status": "NEW", "total": 25.0, "acceptedAt": "2024-03-01T12:00:00",
                            "warning": []}
        r = await post(port, "FindOrders", {"status": "CANCELLED"})
        assert r.json() == {"order": []}
        r = await post(port, "GetOrder", {"orderId": "missing"})
        assert r.status_code == 422
        assert r.json()["upstream"]["detail"]["OrderNotFound"] == {"code": "NOT_FOUND", "message": "no order missing"}
        r = await post(port, "EchoOrder", {"order": order | {"status": "LOST"}})
        # The operation's XSD check of the message: the field and what the contract allows.
        assert r.status_code == 422 and any("LOST" in e for e in r.json()["errors"])


async def test_input_mapping_from_templates(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    route = ("operation: Sum, reply: true, "
             "input: {value: \"{{ data.readings | map(attribute='v') | list | tojson }}\"}")
    yaml = config(port, calc(legacy.calculator11), route)
    async with running_gateway(tmp_path, yaml):
        r = await post(port, "anything", {"readings": [{"v": 2.5}]})
        assert r.json() == {"total": 2.5, "count": 1}
    port = free_port()
    route = 'operation: "{{ data.op }}", reply: true, input: {a: "{{ data.x }}", b: 2}'
    async with running_gateway(fresh(tmp_path / "b"), config(port, calc(legacy.calculator11), route)):
        r = await post(port, "x", {"op": "Multiply", "x": 21})
        assert r.json() == {"result": 42}
        r = await post(port, "x", {"op": "Multiply", "x": "twenty"})
        assert r.status_code == 422 and any("not a valid xs:int" in e for e in r.json()["errors"])


async def test_spooled_calls_reach_the_service(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    soap = f"    wsdl: {ORDERS}\n    endpoint: \"{legacy.orders}\""
    yaml = config(port, soap, "operation: PlaceOrder", route_extra="    mode: spooled")
    async with running_gateway(tmp_path, yaml), httpx.AsyncClient() as client:
        r = await client.post(f"http://127.0.0.1:{port}/call/PlaceOrder", json={"order": sample_order("SP-1")})
        assert r.status_code == 202
        check = httpx.AsyncClient()

        async def placed() -> bool:
            body = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
                    b'<GetOrder xmlns="http://example.com/orders"><orderId>SP-1</orderId></GetOrder></s:Body></s:Envelope>')
            resp = await check.post(legacy.orders, content=body, headers={"content-type": "text/xml"})
            return resp.status_code == 200

        await wait_for(placed, timeout=10, what="the spooled PlaceOrder")
        await check.aclose()


@pytest.mark.parametrize("digest", [True, False])
async def test_wsse_username_token_and_basic_auth_on_the_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             digest: bool) -> None:
    answer = (b'<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
              b'<AddResponse xmlns="http://example.com/calculator"><result>3</result></AddResponse>'
              b"</soap:Body></soap:Envelope>")
    capture = Capture(body=answer)
    monkeypatch.setenv("SOAP_PW", "s3cr3t ✓")
    monkeypatch.setenv("HTTP_PW", "basic-pw")
    with legacy_service(app=capture) as srv:
        port = free_port()
        soap = calc(srv.base + "/calc", more="""
    http_auth: {username: gw, password: "${HTTP_PW}"}
    wsse: {username: alice, password: "${SOAP_PW}", digest: %s}""" % ("true" if digest else "false"))
        async with running_gateway(tmp_path, config(port, soap, OP_FROM_PATH)):
            r = await post(port, "Add", {"a": 1, "b": 2})
            assert r.json() == {"result": 3}
    path, headers, body = capture.requests[0]
    assert path == "/calc"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"gw:basic-pw").decode()
    assert headers["soapaction"] == '"Add"' and headers["content-type"].startswith("text/xml")
    doc = etree.fromstring(body)
    ns = {"wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
          "wsu": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"}
    token = doc.find(".//wsse:UsernameToken", ns)
    assert token is not None and token.findtext("wsse:Username", namespaces=ns) == "alice"
    password = token.find("wsse:Password", ns)
    assert password is not None
    if not digest:
        assert password.text == "s3cr3t ✓" and password.get("Type", "").endswith("#PasswordText")
        return
    nonce = base64.b64decode(token.findtext("wsse:Nonce", namespaces=ns) or "")
    created = token.findtext("wsu:Created", namespaces=ns) or ""
    expected = base64.b64encode(hashlib.sha1(nonce + created.encode() + "s3cr3t ✓".encode()).digest()).decode()
    assert password.text == expected and password.get("Type", "").endswith("#PasswordDigest")
    assert b"s3cr3t" not in body


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(d / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return {"cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "ca": str(d / "ca.pem")}


async def test_tls_with_a_ca_file(tmp_path: Path, tls: dict[str, str]) -> None:
    with legacy_service(certfile=tls["cert"], keyfile=tls["key"]) as srv:
        assert srv.base.startswith("https://")
        port = free_port()
        soap = calc(srv.calculator11, more=f"\n    ca_file: {tls['ca']}")
        async with running_gateway(fresh(tmp_path / "ok"), config(port, soap, OP_FROM_PATH)):
            r = await post(port, "Add", {"a": 1, "b": 2})
            assert r.json() == {"result": 3}
        port = free_port()
        async with running_gateway(fresh(tmp_path / "untrusted"), config(port, calc(srv.calculator11), OP_FROM_PATH)):
            r = await post(port, "Add", {"a": 1, "b": 2})
            assert r.status_code == 502  # the certificate is not trusted: no call, a retryable failure


async def test_wsdl_from_a_configured_url_the_services_own(tmp_path: Path, legacy: Legacy) -> None:
    port = free_port()
    soap = f'    wsdl: "{legacy.orders}?wsdl"'
    async with running_gateway(tmp_path, config(port, soap, OP_FROM_PATH)) as rt:
        r = await post(port, "EchoOrder", {"order": sample_order("URL-1")})
        assert r.status_code == 200 and r.json()["order"]["line"][0]["tag"] == ["gift"]
        assert rt.readiness()[0]


async def test_a_reply_that_is_not_soap_is_a_failure(tmp_path: Path) -> None:
    for status, body, expected in ((200, b"<html>maintenance</html>", 502), (503, b"busy", 503),
                                   (200, b"{not xml", 502)):
        with legacy_service(app=Capture(status=status, body=body, content_type="text/html")) as srv:
            port = free_port()
            async with running_gateway(fresh(tmp_path / str(free_port())), config(port, calc(srv.base), OP_FROM_PATH)):
                r = await post(port, "Add", {"a": 1, "b": 2})
                assert r.status_code == expected, (status, body, r.text)
                assert json.loads(r.text)["status"] == expected


def shape(field: Any, seen: set[int] | None = None) -> Any:
    """What the wire sees of a model field: tags, repetition and JSON kinds (not WSDL cosmetics)."""
    seen = seen if seen is not None else set()
    t = field.type
    if hasattr(t, "kind"):
        return (field.tag, field.repeated, t.kind)
    if id(t) in seen:
        return (field.tag, field.repeated, "recursive")
    seen.add(id(t))
    return (field.tag, field.repeated, tuple(shape(f, seen) for f in t.fields), tuple(a.name for a in t.attrs))


@pytest.mark.parametrize(("example", "path"), [("calculator.wsdl", "/calculator/soap11"),
                                               ("orders.wsdl", "/orders/soap")])
def test_the_simulator_is_faithful_to_the_example_wsdls(legacy: Legacy, example: str, path: str) -> None:
    from connectors.soap import wsdl

    ours = wsdl.load(str(ROOT / "deploy" / "examples" / example)).port()
    theirs = wsdl.load(legacy.base + path + "?wsdl", fetch=lambda url: httpx.get(url).content).port()
    assert set(ours.operations) == set(theirs.operations)
    for name, op in ours.operations.items():
        other = theirs.operations[name]
        assert shape(op.input) == shape(other.input), name
        assert shape(op.output) == shape(other.output), name
