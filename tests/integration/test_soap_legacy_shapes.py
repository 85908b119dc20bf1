"""Legacy SOAP as it is written (an ASMX-style WSDL: ArrayOfX wrappers, a repeated choice, a
declared fault), through one real gateway over real sockets: zeep as the SOAP client, httpx and
models generated from the façade's OpenAPI document (datamodel-code-generator) as REST clients,
and a backend that answers exactly as the WSDL says (a fault with an ``EntryNotFound`` detail for
Id 404, else the entry echoed).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zeep
from lxml import etree
from openapi_spec_validator import validate

from tests.gwtest import free_port, running_gateway
from tests.legacy.server import legacy_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
JOURNAL = str(ROOT / "tests" / "legacy" / "asmx_journal.wsdl")
TNS = "http://tempuri.org/"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"


class JournalBackend:
    """SOAP 1.1 Journal.Save as an ASMX service answers it; keeps every request body."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        self.requests.append(body)
        entry = etree.fromstring(body).find(f".//{{{TNS}}}entry")
        assert entry is not None
        if entry.findtext(f"{{{TNS}}}Id") == "404":
            status, answer = 500, (
                f'<soap:Envelope xmlns:soap="{SOAP11}"><soap:Body><soap:Fault>'
                "<faultcode>soap:Client</faultcode><faultstring>Entry 404 does not exist</faultstring>"
                f'<detail><j:EntryNotFound xmlns:j="{TNS}"><j:Id>404</j:Id><j:Balance>12.50</j:Balance>'
                "</j:EntryNotFound></detail></soap:Fault></soap:Body></soap:Envelope>").encode()
        else:
            entry.tag = f"{{{TNS}}}SaveResult"
            answer = (f'<soap:Envelope xmlns:soap="{SOAP11}"><soap:Body><SaveResponse xmlns="{TNS}">'.encode()
                      + etree.tostring(entry) + b"</SaveResponse></soap:Body></soap:Envelope>")
            status = 200
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/xml; charset=utf-8")]})
        await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def backend() -> Iterator[tuple[JournalBackend, str]]:
    app = JournalBackend()
    with legacy_service(app=app) as lg:
        yield app, lg.base + "/Journal.asmx"


@pytest.fixture
async def base(tmp_path: Path, backend: tuple[JournalBackend, str]) -> AsyncIterator[str]:
    port = free_port()
    yaml = f"""
connectors:
  journal:
    type: soap
    wsdl: {JOURNAL}
    endpoint: "{backend[1]}"
    serve: {{listen: "127.0.0.1:{port}", prefix: /soap/journal, auth: {{type: none}}}}
    rest_facade: {{listen: "127.0.0.1:{port}", prefix: /api/journal, auth: {{type: none}}}}
routes:
  - name: journal
    from: journal
    to: [{{connector: journal, operation: "{{{{ subject }}}}", reply: true}}]
"""
    async with running_gateway(tmp_path, yaml):
        yield f"http://127.0.0.1:{port}"


async def test_zeep_through_the_gateway_keeps_choice_order_and_gets_the_declared_fault(
        base: str, backend: tuple[JournalBackend, str]) -> None:
    app, _ = backend

    def run(port_name: str) -> tuple[Any, zeep.exceptions.Fault]:
        client = zeep.Client(f"{base}/soap/journal?wsdl")
        service = client.bind("Journal", port_name)
        entry = {"Id": 7, "Amount": "3.10", "Severity": "High", "Lines": {"Line": [{"Text": "t"}]},
                 "_value_1": [{"note": "a"}, {"ref": 5}, {"note": "b"}]}
        saved = service.Save(entry)
        try:
            service.Save({"Id": 404, "Amount": "1", "Severity": "Low", "_value_1": []})
        except zeep.exceptions.Fault as fault:
            return saved, fault
        raise AssertionError("expected a fault")

    for port_name in ("JournalSoap", "JournalSoap12"):
        saved, fault = await asyncio.to_thread(run, port_name)
        sent = etree.fromstring(app.requests[-2]).find(f".//{{{TNS}}}entry")
        assert [etree.QName(c).localname for c in sent][-3:] == ["note", "ref", "note"]
        assert [next(iter(item.values())) for item in saved._value_1] == ["a", 5, "b"]
        assert [line.Text for line in saved.Lines.Line] == ["t"]
        assert fault.message == "Entry 404 does not exist"
        assert fault.code.endswith("Client" if port_name == "JournalSoap" else "Sender")
        (found,) = list(fault.detail)
        assert found.tag == f"{{{TNS}}}EntryNotFound"
        assert found.findtext(f"{{{TNS}}}Balance") == "12.50"


async def test_rest_facade_gets_the_fault_typed_and_refuses_overflow_by_path(base: str) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(f"{base}/api/journal/Save", json={"entry": {"Id": 404, "Amount": 1, "Severity": "Low"}})
        assert r.status_code == 422
        assert r.json()["fault"] == {"faultcode": "Client", "faultstring": "Entry 404 does not exist",
                                     "detail": {"EntryNotFound": {"Id": 404, "Balance": 12.5}}}
        r = await client.post(f"{base}/api/journal/Save", content=b'{"entry": {"Id": 1, "Amount": 1e400, '
                              b'"Ratio": 1e400, "Severity": "Low"}}', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "retry-after" not in r.headers
        assert [e["path"] for e in r.json()["errors"]] == ["/entry/Amount", "/entry/Ratio"]
        r = await client.post(f"{base}/api/journal/Save", json={"entry": {"Id": 1, "Amount": 1, "Severity": "Mid"}})
        assert r.status_code == 422
        first = r.json()["errors"][0]
        assert first["path"] == "/entry/Severity" and "'Low', 'High'" in first["message"]
        value = {"entry": {"Id": 2, "Amount": 1.25, "Severity": "Low", "Lines": {"Line": [None, {}]},
                           "_choice": [{"ref": 1}, {"note": "x"}, {"ref": 2}], "Attachment": "aGk="}}
        r = await client.post(f"{base}/api/journal/Save", json=value)
        assert r.status_code == 200, r.text
        assert r.json() == {"SaveResult": value["entry"]}


async def test_a_generated_client_works_against_the_facade(base: str, tmp_path: Path) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        doc = (await client.get(f"{base}/api/journal/openapi.json")).json()
    validate(doc)
    save = doc["paths"]["/Save"]["post"]
    assert save["responses"]["422"]["content"]["application/problem+json"]["schema"]["allOf"][1][
        "properties"]["fault"]["properties"]["detail"]["properties"]["EntryNotFound"]
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(doc))
    out = tmp_path / "journal_models.py"
    done = await asyncio.to_thread(subprocess.run, [
        str(Path(sys.executable).parent / "datamodel-codegen"), "--input", str(spec), "--input-file-type", "openapi",
        "--openapi-scopes", "schemas", "paths", "--output-model-type", "pydantic_v2.BaseModel",
        "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    spec_ = importlib.util.spec_from_file_location("journal_models", out)
    assert spec_ is not None and spec_.loader is not None
    models = importlib.util.module_from_spec(spec_)
    sys.modules["journal_models"] = models  # pydantic resolves the generated annotations through it
    try:
        spec_.loader.exec_module(models)
    finally:
        del sys.modules["journal_models"]
    entry = models.Entry.model_validate({"Id": 3, "Amount": 9.5, "Severity": "High", "Title": "t",
                                         "_choice": [{"note": "n"}]})
    body = json.loads(json.dumps({"entry": entry.model_dump(mode="json", by_alias=True, exclude_none=True)}))
    async with httpx.AsyncClient(timeout=20) as client:
        r = await client.post(f"{base}/api/journal/Save", json=body)
    assert r.status_code == 200, r.text
    back = models.Entry.model_validate(r.json()["SaveResult"])
    assert back == entry
