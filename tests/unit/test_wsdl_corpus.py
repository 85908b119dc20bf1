"""Real WSDLs from the test suites of zeep, Apache CXF and Apache Axis2 (their sources and
licences: tests/legacy/CORPUS.md): each loads, with an OpenAPI document that openapi-spec-validator
accepts, or is refused with a message that names the unsupported feature and where it is.

The files are other projects' data and are not in this repository: the corpus folder is
``GATEWAY_WSDL_CORPUS`` or ``../shared/wsdl-corpus``; without it these tests are skipped and say
so. The JAX-WS shape is also checked on a WSDL of our own (``tests/legacy/jaxws``)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from openapi_spec_validator import validate

from connectors.soap import wsdl
from connectors.soap.config import Listener
from connectors.soap.facade import RestFacade

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("GATEWAY_WSDL_CORPUS") or ROOT.parent / "shared" / "wsdl-corpus")
JAXWS = ROOT / "tests" / "legacy" / "jaxws" / "PayrollService.wsdl"

needs_corpus = pytest.mark.skipif(
    not (CORPUS / "zeep").is_dir(),
    reason=f"the real-WSDL corpus is not on this machine ({CORPUS}): see tests/legacy/CORPUS.md")

LOADS = None
#: Each WSDL: LOADS, or words its refusal must contain (the feature, then where).
EXPECTED: dict[str, object] = {
    "zeep/soap.wsdl": LOADS,
    "zeep/soap_transport_err.wsdl": LOADS,
    "zeep/benchmark.wsdl": LOADS,
    "zeep/recursive_import/hello_world_recursive.wsdl": LOADS,  # wsdl:import, recursive types
    "zeep/soap_header.wsdl": ("SOAP header parts", "binding StockQuoteBinding operation GetLastTradePrice"),
    "zeep/http.wsdl": ("HTTP GET/POST", "StockQuotePort (HTTP POST)"),
    "zeep/test_http_post.wsdl": ("HTTP GET/POST", "Port1 (HTTP GET)"),
    "zeep/claim.wsdl": ("rpc/encoded is not supported", "binding GetClaimDetailsBinding operation GetClaimDetails"),
    "zeep/import/soap_import_main.wsdl": ("fetched from the network", "http://schemas.xmlsoap.org/soap/encoding/"),
    "zeep/recursive/recursive_schema_main.wsdl": ("no operation the gateway supports",
                                                  "'SOAPService' has no operations"),
    "cxf/hello_world.wsdl": LOADS,
    "cxf/hello_world_soap12.wsdl": LOADS,
    "cxf/hello_world_fault.wsdl": LOADS,
    "cxf/hello_world_doc_lit.wsdl": LOADS,
    "cxf/locator.wsdl": LOADS,
    "cxf/multi_schema.wsdl": LOADS,
    # JAX-WS / CXF: an inline schema without targetNamespace that only imports the real one.
    "cxf/add_numbers_imports/add_numbers_imports.wsdl": LOADS,
    "cxf/hello_world_rpc_lit.wsdl": ("rpc/literal is not supported",
                                     "binding Greeter_SOAPBinding_RPCLit operation sayHi"),
    "cxf/wsdl_provider_test.wsdl": ("rpc/encoded is not supported", "binding HelloWorldPortBinding operation greetMe"),
    "cxf/soapheader.wsdl": ("SOAP header parts", "binding TestHeader_SOAPBinding operation testHeader1"),
    "cxf/cxf-993.wsdl": ("SOAP header parts", "binding NotificationServicePort operation sendNotification"),
    "cxf/wcf_sts.wsdl": ("declares no wsdl:service", "wcf_sts.wsdl"),
    "cxf/jaxws_partial/AddNumbersImplPartial1Service.wsdl": ("declares no wsdl:service", "AddNumbersImplPartial1"),
    "cxf/soap_fault/soap_fault.wsdl": ("fetched from the network", "http://schemas.xmlsoap.org/soap/envelope/"),
    "cxf/complex.wsdl": ("only UTF-8 XML is accepted", "windows-1255"),
    # WCF / ASMX style (tempuri.org, several inline schemas, HttpGet/HttpPost ports beside SOAP).
    "axis2/BaseDataTypes.wsdl": LOADS,
    "axis2/ComplexDataTypes.wsdl": LOADS,
    "axis2/ComplexDataTypesDocLitBare.wsdl": LOADS,  # inline schemas that refer to each other unimported
    "axis2/interoptestdoclitparameters.wsdl": LOADS,
    "axis2/gorilla_dlw.wsdl": LOADS,
    "axis2/identity/identityService.wsdl": LOADS,  # JAX-WS RI: the same no-namespace import schema
    "axis2/InteropTest.wsdl": ("rpc/encoded is not supported", "binding InteropTestSoapBinding operation echoString"),
    "axis2/test-rpc-2.wsdl": ("rpc/literal is not supported", "binding echoBinding operation echo"),
    "axis2/RPCLit.wsdl": ("rpc/literal is not supported", "binding RPCLitSoapBinding operation testSimple"),
    "axis2/actionTests.wsdl": ("type= instead of element=", "binding withSOAPActionBinding operation echo"),
    "axis2/echo_imports/EchoService.wsdl": ("cannot load WSDL", "EchoServicePortType"),
    "axis2/shapes/wsdl/shapes.wsdl": ("outside the WSDL's directory", "shapes/xsd/shape.xsd"),
}


@needs_corpus
def test_the_corpus_is_listed_whole() -> None:
    entries = {str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.wsdl")}
    imported_only = {"zeep/import/soap_import_2.wsdl", "zeep/recursive_import/hello_world_recursive_import.wsdl",
                     "axis2/echo_imports/EchoBindings.wsdl"}
    assert entries - imported_only == set(EXPECTED)
    assert len(EXPECTED) >= 30
    sources = (ROOT / "tests" / "legacy" / "CORPUS.md").read_text()
    assert all(f"`{name}`" in sources for name in entries)


@needs_corpus
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_wsdl_loads_or_is_refused_by_name(name: str) -> None:
    expected = EXPECTED[name]
    if expected is LOADS:
        contract = wsdl.load(str(CORPUS / name))
        usable = [op for p in contract.ports for op in p.operations.values() if not op.unsupported]
        assert usable
        for port in contract.ports:
            listener = Listener(listen="127.0.0.1:1", prefix="/api", auth={"type": "none"})  # type: ignore[arg-type]
            doc = RestFacade("corpus", contract, port, listener, logging.getLogger("test")).openapi("http://x/api")
            validate(doc)  # type: ignore[arg-type]
        return
    assert isinstance(expected, tuple)
    with pytest.raises(wsdl.WsdlError) as refused:
        wsdl.load(str(CORPUS / name))
    for words in expected:
        assert words in str(refused.value)


def test_gateway_validate_accepts_a_jaxws_wsdl(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"""
connectors:
  payroll:
    type: soap
    wsdl: {JAXWS}
    endpoint: "http://127.0.0.1:9/payroll"
  out:
    type: log
routes:
  - name: r
    from: payroll
    to: [{{connector: out}}]
""")
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "validate", str(routes)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_corpus
def test_a_choice_that_occurs_once_is_one_of_its_branches() -> None:
    from connectors.soap.model import JsonSchemaBuilder

    gorilla = wsdl.load(str(CORPUS / "axis2" / "gorilla_dlw.wsdl"))
    b = JsonSchemaBuilder(gorilla.facets)
    once = b.for_complex_content(gorilla.port().operations["echoDate"].input)  # type: ignore[arg-type]
    assert once["oneOf"] == [{"required": ["RequestedTerminationTime"]}, {"required": ["RequestedLifetimeDuration"]}]


def test_a_jaxws_wsdl_of_our_own_loads_with_a_valid_openapi() -> None:
    contract = wsdl.load(str(JAXWS))
    op = contract.port().operations["getPayslip"]
    assert not op.unsupported
    listener = Listener(listen="127.0.0.1:1", prefix="/api", auth={"type": "none"})  # type: ignore[arg-type]
    doc = RestFacade("payroll", contract, contract.port(), listener, logging.getLogger("test")).openapi("http://x/api")
    validate(doc)  # type: ignore[arg-type]
