"""Hardened XML, SOAP envelopes and faults, failure answers, WSDL loading policy and config. Pure."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path

import pytest
from lxml import etree
from pydantic import ValidationError

from connectors.soap import answers, safexml, soapenv, wsdl
from connectors.soap.config import SoapConfig, SoapTarget
from gateway.contract import Outcome

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "legacy" / "samples"
EXAMPLES = ROOT / "deploy" / "examples"

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<lolz>&lol9;</lolz>"""
XXE_FILE = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>'
XXE_HTTP = b'<!DOCTYPE x [<!ENTITY e SYSTEM "http://127.0.0.1:9/x">]><x>&e;</x>'
XXE_PARAM = b'<!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]><x/>'


def parse(body: bytes, max_bytes: int = 1024 * 1024, max_depth: int = 64) -> object:
    return safexml.parse(body, max_bytes=max_bytes, max_depth=max_depth)


@pytest.mark.parametrize("body", [BILLION_LAUGHS, XXE_FILE, XXE_HTTP, XXE_PARAM,
                                  b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><x/>'])
def test_markup_declarations_are_refused_before_parsing(body: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(safexml.XmlRejected, match="DTDs and entity declarations") as info:
        parse(body)
    assert info.value.status == 400
    assert time.perf_counter() - started < 0.1


def test_deep_nesting_is_refused_before_parsing() -> None:
    deep = b"<a>" * 10_000 + b"</a>" * 10_000
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(safexml.XmlRejected, match="deeper than 64"):
        parse(deep)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 2 * 1024 * 1024


def test_size_is_checked_first() -> None:
    with pytest.raises(safexml.XmlRejected) as info:
        parse(b"<a>" + b"x" * 2000 + b"</a>", max_bytes=1000)
    assert info.value.status == 413


@pytest.mark.parametrize("body", [b"\xff\xfe<\x00a\x00/\x00>\x00", b'<?xml version="1.0" encoding="ISO-8859-1"?><a/>',
                                  b'<?xml version="1.0" encoding="UTF-16"?><a/>'])
def test_only_utf8_is_accepted(body: bytes) -> None:
    with pytest.raises(safexml.XmlRejected, match="UTF-8"):
        parse(body)


def test_comments_cdata_and_tricky_attributes_do_not_fool_the_depth_scan() -> None:
    body = (b'<?xml version="1.0" encoding="utf-8"?><r><!-- <a><a><a> --><![CDATA[<b><b><b>]]>'
            b'<c x="/>" y=\'>\'><d/></c></r>')
    root = parse(body, max_depth=3)
    assert etree.QName(root).localname == "r"  # type: ignore[arg-type]
    with pytest.raises(safexml.XmlRejected, match="deeper than 2"):
        parse(body, max_depth=2)


@pytest.mark.parametrize("body", [b"<a" * 500_000, b'<r><a x="' * 100_000, b"<r>" + b"<?" * 400_000,
                                  b"<r>" + b"<!--" * 200_000, b"<" + b"a" * 900_000 + b"/>",
                                  b"<r>" + b"<![CDATA[" * 100_000])
def test_a_megabyte_of_broken_markup_is_refused_in_one_linear_pass(body: bytes) -> None:
    started = time.perf_counter()
    with pytest.raises(safexml.XmlRejected, match="not well-formed"):
        parse(body)
    assert time.perf_counter() - started < 0.5  # the backtracking pre-scan took minutes on these


def test_many_elements_attributes_and_namespaces_parse_linearly() -> None:
    bodies = [b"<r>" + b"<a/>" * 240_000 + b"</r>",
              b"<r " + b" ".join(b'a%d="x"' % i for i in range(90_000)) + b"/>",
              b"<r " + b" ".join(b'xmlns:p%d="u"' % i for i in range(60_000)) + b"/>",
              b"<r>" + (b"<a>" * 63 + b"</a>" * 63) * 1500 + b"</r>"]
    for body in bodies:
        started = time.perf_counter()
        parse(body, max_depth=64)
        assert time.perf_counter() - started < 1.0


def test_too_many_tags_are_refused_before_parsing() -> None:
    with pytest.raises(safexml.XmlRejected, match="more than 1000000 tags") as info:
        parse(b"<r>" + b"<a/>" * 1_000_000 + b"</r>", max_bytes=16 * 1024 * 1024)
    assert info.value.status == 413


def test_markup_in_cdata_and_comments_is_text_and_a_late_doctype_is_refused() -> None:
    root = parse(b"<r><![CDATA[<!DOCTYPE html><!ENTITY x><!x>]]><!-- <!DOCTYPE y> --></r>")
    assert root.text == "<!DOCTYPE html><!ENTITY x><!x>"  # type: ignore[attr-defined]
    for body in (b'<!-- c --><?pi x?><!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>', b'<r><!ENTITY e "x"></r>'):
        with pytest.raises(safexml.XmlRejected, match="DTDs and entity declarations"):
            parse(body)


def test_nesting_at_the_limit_is_accepted_and_one_deeper_refused() -> None:
    assert parse(b"<a>" * 64 + b"</a>" * 64, max_depth=64) is not None
    with pytest.raises(safexml.XmlRejected, match="deeper than 64"):
        parse(b"<r>" + b"<a/>" * 10 + b"<a>" * 64 + b"</a>" * 64 + b"</r>", max_depth=64)
    with pytest.raises(safexml.XmlRejected, match="deeper than 256"):
        parse(b"<a>" * 300 + b"</a>" * 300, max_depth=256)


async def test_large_bodies_are_parsed_off_the_loop_with_a_bounded_queue() -> None:
    import threading

    loop_thread = threading.get_ident()
    ran_in: list[int] = []

    def work() -> int:
        ran_in.append(threading.get_ident())
        time.sleep(0.2)
        return 1

    assert await safexml.off_loop(100, work) == 1 and ran_in == [loop_thread]  # small: inline
    ran_in.clear()
    started = time.perf_counter()
    results = await asyncio.gather(*(safexml.off_loop(safexml.INLINE_BYTES + 1, work) for _ in range(8)))
    assert results == [1] * 8 and loop_thread not in ran_in
    assert time.perf_counter() - started >= 0.2 * 8 / safexml.WORKERS * 0.9  # never more than WORKERS at once
    with pytest.raises(safexml.XmlBusy):
        await asyncio.gather(*(safexml.off_loop(safexml.INLINE_BYTES + 1, work, deadline=0.3)
                               for _ in range(safexml.MAX_JOBS + 2)))
    await asyncio.sleep(1.0)  # let the abandoned jobs finish before the next test


def test_malformed_xml_is_a_rejection_not_a_crash() -> None:
    for body in (b"<a>", b"not xml", b"", b"<a></b>", b"<!-- open comment <a/>"):
        with pytest.raises(safexml.XmlRejected):
            parse(body)


# --- SOAP envelopes and faults -------------------------------------------------------


@pytest.mark.parametrize(("sample", "version", "code", "string", "permanent"), [
    ("fault11_detail.spyne.xml", "1.1", "Client", "order nope not found", True),
    ("fault11_server.spyne.xml", "1.1", "Server.Busy", "the calculator is busy", False),
    ("fault12_client.spyne.xml", "1.2", "Sender", "division by zero", True),
])
def test_faults_from_a_real_service(sample: str, version: str, code: str, string: str, permanent: bool) -> None:
    parsed = soapenv.split(etree.fromstring((SAMPLES / sample).read_bytes()))
    assert parsed.version == version and soapenv.is_fault(version, parsed.payload)
    info = soapenv.read_fault(version, parsed.payload)
    assert (info.code, info.string, info.permanent) == (code, string, permanent)
    if sample == "fault11_detail.spyne.xml":
        assert [etree.QName(d).localname for d in info.detail] == ["OrderNotFound"]
    if version == "1.2":
        assert info.subcodes == ["DivideByZero"]


@pytest.mark.parametrize("version", ["1.1", "1.2"])
@pytest.mark.parametrize("kind", [soapenv.CLIENT, soapenv.SERVER])
def test_built_faults_read_back(version: str, kind: str) -> None:
    f = soapenv.fault(version, kind, "nope ✓", soapenv.gw_detail(envelope_id="E1", error=["a", "b"]))
    doc = etree.fromstring(soapenv.to_bytes(soapenv.envelope(version, f)))
    parsed = soapenv.split(doc)
    info = soapenv.read_fault(version, parsed.payload)
    assert info.string == "nope ✓"
    assert info.permanent is (kind == soapenv.CLIENT)
    assert [c.text for c in info.detail[0]] == ["E1", "a", "b"]
    assert soapenv.fault_status(version, kind) == (400 if version == "1.2" and kind == soapenv.CLIENT else 500)


def test_not_soap() -> None:
    with pytest.raises(soapenv.NotSoap):
        soapenv.split(etree.fromstring(b"<Envelope/>"))
    with pytest.raises(soapenv.NotSoap, match="no Body"):
        soapenv.split(etree.fromstring(b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"/>'))


# --- what callers are told --------------------------------------------------------------


def test_failures_never_show_the_internal_reason() -> None:
    problem = '{"title": "Not Found", "detail": "no acct"}'
    f = answers.describe(Outcome.rejected("E", "POST http://10.0.0.5:8080/calc/Add: HTTP 404", code=404,
                                          detail={"status": 404, "body": problem}))
    assert f.client and f.status == 404 and "10.0.0.5" not in f.message and f.message.endswith("no acct")
    f = answers.describe(Outcome.retry("E", "backend: timed out"))
    assert not f.client and f.status == 503 and f.retry_after == 5
    f = answers.describe(Outcome(status=Outcome.retry("E", "x").status, envelope_id="E", reason="x", code=504))
    assert f.status == 504 and "in time" in f.message
    f = answers.describe(Outcome.rejected("E", "SOAP fault", code=422, detail={
        "faultcode": "Client", "faultstring": "bad sku", "detail": {"x": "1"}}))
    assert f.client and f.message.endswith("bad sku") and f.upstream["detail"] == {"x": "1"}
    f = answers.describe(Outcome.rejected("E", "permanent", code=502))
    assert not f.client and f.status == 502


# --- WSDL loading policy ---------------------------------------------------------------


def test_examples_load_with_their_shapes() -> None:
    calc = wsdl.load(str(EXAMPLES / "calculator.wsdl"))
    assert [(p.name, p.version) for p in calc.ports] == [("CalculatorSoap11", "1.1"), ("CalculatorSoap12", "1.2")]
    assert set(calc.port().operations) == {"Add", "Subtract", "Multiply", "Divide", "Sum"}
    orders = wsdl.load(str(EXAMPLES / "orders.wsdl"))
    assert len(orders.store.docs) == 2  # the WSDL and the imported orders.xsd
    assert [f.local for f in orders.port().operations["GetOrder"].faults] == ["OrderNotFound"]
    assert wsdl.load(str(EXAMPLES / "calculator.wsdl"), port="CalculatorSoap12").port().version == "1.2"


def test_served_documents_point_at_the_gateway() -> None:
    orders = wsdl.load(str(EXAMPLES / "orders.wsdl"))
    docs = orders.documents("https://gw.example/soap/orders", "https://gw.example/soap/orders")
    root = etree.fromstring(docs[0])
    ns = {"soap": wsdl.SOAP11_BINDING, "xs": wsdl.XS_NS}
    assert root.xpath("//soap:address/@location", namespaces=ns) == ["https://gw.example/soap/orders"]
    assert root.xpath("//xs:import/@schemaLocation", namespaces=ns) == ["https://gw.example/soap/orders?xsd=1"]
    assert b"localhost:8000" not in docs[0]


def test_imports_outside_the_wsdl_directory_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.xsd"
    secret.write_text('<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema"/>')
    (tmp_path / "svc").mkdir()
    text = (EXAMPLES / "orders.wsdl").read_text().replace('schemaLocation="orders.xsd"',
                                                          'schemaLocation="../secret.xsd"')
    (tmp_path / "svc" / "x.wsdl").write_text(text)
    with pytest.raises(wsdl.WsdlError, match="outside the WSDL's directory"):
        wsdl.load(str(tmp_path / "svc" / "x.wsdl"))
    text = text.replace('schemaLocation="../secret.xsd"', 'schemaLocation="http://127.0.0.1:9/x.xsd"')
    (tmp_path / "svc" / "x.wsdl").write_text(text)
    with pytest.raises(wsdl.WsdlError):
        wsdl.load(str(tmp_path / "svc" / "x.wsdl"))


def test_url_wsdls_stay_on_their_origin() -> None:
    fetched: list[str] = []

    def fetch(url: str) -> bytes:
        fetched.append(url)
        return (EXAMPLES / ("orders.xsd" if url.endswith(".xsd") else "orders.wsdl")).read_bytes()

    contract = wsdl.load("http://legacy.test:8000/orders?wsdl", fetch=fetch)
    assert fetched == ["http://legacy.test:8000/orders?wsdl", "http://legacy.test:8000/orders.xsd"]
    assert contract.port().name == "OrdersSoap"
    store = wsdl.DocumentStore("http://legacy.test:8000/orders?wsdl", fetch=fetch)
    with pytest.raises(wsdl.WsdlError, match="outside"):
        store.load("http://elsewhere.test/orders.xsd")


def test_rpc_style_is_refused_per_operation(tmp_path: Path) -> None:
    text = (EXAMPLES / "calculator.wsdl").read_text().replace(
        '<soap:operation soapAction="Add" style="document"/>', '<soap:operation soapAction="Add" style="rpc"/>')
    (tmp_path / "rpc.wsdl").write_text(text)
    ops = wsdl.load(str(tmp_path / "rpc.wsdl")).port().operations
    assert ops["Add"].unsupported and "rpc" in ops["Add"].unsupported
    assert ops["Subtract"].unsupported is None


def test_wsdl_with_a_dtd_is_refused(tmp_path: Path) -> None:
    (tmp_path / "evil.wsdl").write_bytes(XXE_FILE)
    with pytest.raises(wsdl.WsdlError, match="DTD"):
        wsdl.load(str(tmp_path / "evil.wsdl"))


# --- config ------------------------------------------------------------------------------


def test_config_checks_the_wsdl_at_validation_time(tmp_path: Path) -> None:
    ok = SoapConfig(type="soap", wsdl=str(EXAMPLES / "calculator.wsdl"), port="CalculatorSoap12")
    assert ok.port == "CalculatorSoap12"
    with pytest.raises(ValidationError, match="does not exist"):
        SoapConfig(type="soap", wsdl=str(tmp_path / "missing.wsdl"))
    with pytest.raises(ValidationError, match="no service 'Nope'"):
        SoapConfig(type="soap", wsdl=str(EXAMPLES / "calculator.wsdl"), service="Nope")
    with pytest.raises(ValidationError, match="no SOAP port"):
        SoapConfig(type="soap", wsdl=str(EXAMPLES / "calculator.wsdl"), port="Nope")
    with pytest.raises(ValidationError, match="local file or an http"):
        SoapConfig(type="soap", wsdl="ftp://x/y.wsdl")
    with pytest.raises(ValidationError, match="absolute http"):
        SoapConfig(type="soap", wsdl=str(EXAMPLES / "calculator.wsdl"), endpoint="/relative")


def test_config_is_secure_by_default() -> None:
    base = {"type": "soap", "wsdl": str(EXAMPLES / "calculator.wsdl")}
    with pytest.raises(ValidationError, match="auth"):
        SoapConfig.model_validate({**base, "serve": {"listen": "127.0.0.1:1", "prefix": "/s"}})
    with pytest.raises(ValidationError, match="never written inline"):
        SoapConfig.model_validate({**base, "wsse": {"username": "u", "password": "plain"}})
    with pytest.raises(ValidationError, match="needs users"):
        SoapConfig.model_validate({**base, "serve": {"listen": "127.0.0.1:1", "prefix": "/s",
                                                     "auth": {"type": "basic"}}})
    with pytest.raises(ValidationError, match="own prefix"):
        SoapConfig.model_validate({**base, "serve": {"listen": "127.0.0.1:1", "prefix": "/",
                                                     "auth": {"type": "none"}}})
    cfg = SoapConfig.model_validate({**base, "serve": {"listen": "127.0.0.1:1", "prefix": "/s/",
                                                       "auth": {"type": "none"}}})
    assert cfg.serve is not None and cfg.serve.prefix == "/s" and cfg.serve.max_body == 1024 * 1024
    assert cfg.verify_tls is True


def test_target_options() -> None:
    assert SoapTarget(operation="Add").reply_as == "json"
    with pytest.raises(ValidationError):
        SoapTarget.model_validate({"operation": "Add", "url": "http://x"})
