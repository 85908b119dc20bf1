"""Typed XML ⇄ JSON mapping on real samples (captured from zeep and the spyne legacy service)."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from connectors.soap import model, soapenv, wsdl
from connectors.soap.model import JsonSchemaBuilder, MappingError, RenderOptions

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "legacy" / "samples"


@pytest.fixture(scope="module")
def orders() -> wsdl.Contract:
    return wsdl.load(str(ROOT / "deploy" / "examples" / "orders.wsdl"))


@pytest.fixture(scope="module")
def calc() -> wsdl.Contract:
    return wsdl.load(str(ROOT / "deploy" / "examples" / "calculator.wsdl"))


def payload(name: str) -> Any:
    root = etree.fromstring((SAMPLES / name).read_bytes())
    return soapenv.split(root).payload


def sample_order() -> dict[str, Any]:
    return {
        "id": "A-1",
        "customer": {"number": "c-7", "name": "Zoë Ünïcode ✓ 漢字", "vip": True},
        "shipTo": {"street": "1 Main <St> & Co", "city": "Paris", "country": "FR"},
        "line": [{"sku": "ABC-1", "quantity": 2, "unitPrice": Decimal("12.50"), "tag": ["gift"]}],
        "orderDate": "2024-02-29",
        "deliverAfter": "2024-03-01T10:00:00+00:00",
        "status": "PAID",
        "priority": False,
        "discount": None,
        "weightKg": 1.5,
    }


def test_zeep_request_becomes_typed_json(orders: wsdl.Contract) -> None:
    op = orders.port().operations["EchoOrder"]
    elem = payload("echo_order_request.zeep.xml")
    assert orders.validate(elem) == []
    data = model.xml_to_json(elem, op.input)  # type: ignore[arg-type]
    assert data == {"order": sample_order()}
    line = data["order"]["line"]
    assert isinstance(line, list) and len(line) == 1  # one repeated element is still a list
    assert line[0]["tag"] == ["gift"]
    assert type(line[0]["quantity"]) is int
    assert line[0]["unitPrice"] == Decimal("12.50")
    assert data["order"]["discount"] is None  # xsi:nil
    assert "billTo" not in data["order"]  # absent optional stays absent
    assert data["order"]["priority"] is False


def test_spyne_response_matches_the_request(orders: wsdl.Contract) -> None:
    op = orders.port().operations["EchoOrder"]
    data = model.xml_to_json(payload("echo_order_response.spyne.xml"), op.output, lenient=True)  # type: ignore[arg-type]
    assert data == {"order": sample_order()}


def test_json_text_keeps_decimals_exact_and_numbers_numbers(orders: wsdl.Contract) -> None:
    op = orders.port().operations["EchoOrder"]
    data = model.xml_to_json(payload("echo_order_response.spyne.xml"), op.output, lenient=True)  # type: ignore[arg-type]
    text = model.dumps(data).decode()
    assert '"unitPrice":12.50' in text
    assert '"quantity":2' in text and '"vip":true' in text and '"discount":null' in text
    assert "Zoë Ünïcode ✓ 漢字" in text
    assert json.loads(text)["order"]["weightKg"] == 1.5
    assert model.loads(text) == data


def test_round_trip_json_xml_json(orders: wsdl.Contract) -> None:
    op = orders.port().operations["EchoOrder"]
    original = {"order": sample_order() | {"line": [
        {"sku": "A-1", "quantity": 1, "unitPrice": Decimal("0.10"), "note": None, "tag": []},
        {"sku": "B-2", "quantity": 10000, "unitPrice": Decimal("123456789012345678.99"), "note": "ünï",
         "tag": ["x", "y"]}]}}
    elem = model.json_to_xml(original, op.input)  # type: ignore[arg-type]
    assert orders.validate(elem) == []
    back = model.xml_to_json(etree.fromstring(etree.tostring(elem)), op.input)  # type: ignore[arg-type]
    assert back == original
    assert model.loads(model.dumps(back)) == original


def test_empty_and_single_repeated_outputs(calc: wsdl.Contract, orders: wsdl.Contract) -> None:
    find = orders.port().operations["FindOrders"]
    assert model.xml_to_json(payload("find_orders_empty.spyne.xml"), find.output, lenient=True) == {"order": []}  # type: ignore[arg-type]
    total = calc.port().operations["Sum"]
    out = model.xml_to_json(payload("sum_response.spyne.xml"), total.output, lenient=True)  # type: ignore[arg-type]
    assert out == {"total": 2.5, "count": 1} and type(out["count"]) is int
    one = model.json_to_xml({"value": [7]}, total.input)  # type: ignore[arg-type]
    assert [c.text for c in one] == ["7.0"]
    assert model.xml_to_json(one, total.input) == {"value": [7.0]}  # type: ignore[arg-type]
    none = model.json_to_xml({"value": []}, total.input)  # type: ignore[arg-type]
    assert len(none) == 0 and model.xml_to_json(none, total.input) == {"value": []}  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "message"), [
    ({"order": {}}, "required element 'id' is missing"),
    ({"order": sample_order() | {"line": {"sku": "A"}}}, "must be a list (even with one item)"),
    ({"order": sample_order() | {"priority": "false"}}, "expected true or false"),
    ({"order": sample_order() | {"orderDate": 20240229}}, "expected a string"),
    ({"order": sample_order() | {"shipTo": None}}, "cannot be null"),
    ({"order": sample_order() | {"colour": "red"}}, "unknown field 'colour'"),
    ({"order": sample_order() | {"line": [{"sku": "A-1", "quantity": 1.5, "unitPrice": 1}]}}, "expected an integer"),
    ({"order": sample_order() | {"comment": "bell\x07"}}, "characters XML cannot carry"),
])
def test_bad_json_is_refused_with_a_path(orders: wsdl.Contract, value: dict[str, Any], message: str) -> None:
    op = orders.port().operations["EchoOrder"]
    with pytest.raises(MappingError) as info:
        model.json_to_xml(value, op.input)  # type: ignore[arg-type]
    assert any(message in m for _, m in info.value.errors), info.value.errors
    assert all(p.startswith("/order") for p, _ in info.value.errors)


def test_xsd_facets_are_checked_by_the_validator(orders: wsdl.Contract) -> None:
    op = orders.port().operations["EchoOrder"]
    bad = {"order": sample_order() | {"status": "LOST", "shipTo": {"street": "x", "city": "y", "country": "fra"}}}
    errors = orders.validate(model.json_to_xml(bad, op.input))  # type: ignore[arg-type]
    assert any("LOST" in e for e in errors) and any("fra" in e for e in errors)


def test_template_strings_are_read_by_the_schema(calc: wsdl.Contract, orders: wsdl.Contract) -> None:
    add = calc.port().operations["Add"]
    elem = model.json_to_xml({"a": "42", "b": 1}, add.input, RenderOptions(from_text=True))  # type: ignore[arg-type]
    assert model.xml_to_json(elem, add.input) == {"a": 42, "b": 1}  # type: ignore[arg-type]
    with pytest.raises(MappingError, match="not a valid xs:int"):
        model.json_to_xml({"a": "forty", "b": 1}, add.input, RenderOptions(from_text=True))  # type: ignore[arg-type]
    total = calc.port().operations["Sum"]
    elem = model.json_to_xml({"value": "[1.5, 2]"}, total.input, RenderOptions(from_text=True))  # type: ignore[arg-type]
    assert model.xml_to_json(elem, total.input) == {"value": [1.5, 2.0]}  # type: ignore[arg-type]
    with pytest.raises(MappingError, match="tojson"):
        model.json_to_xml({"value": "1.5 2"}, total.input, RenderOptions(from_text=True))  # type: ignore[arg-type]
    with pytest.raises(MappingError, match="must be a list"):
        model.json_to_xml({"value": "1.5"}, total.input, RenderOptions(from_text=True))  # type: ignore[arg-type]
    # Without from_text the same string is a type error, not a guess.
    with pytest.raises(MappingError, match="expected an integer"):
        model.json_to_xml({"a": "42", "b": 1}, add.input)  # type: ignore[arg-type]


def test_lenient_reply_skips_unknown_and_reports_them(calc: wsdl.Contract) -> None:
    add = calc.port().operations["Add"]
    opts = RenderOptions(lenient=True)
    elem = model.json_to_xml({"result": 5, "links": {"self": "/x"}}, add.output, opts)  # type: ignore[arg-type]
    assert opts.ignored == ["/links"] and elem[0].text == "5"
    reply = etree.fromstring(b'<r:AddResponse xmlns:r="http://example.com/calculator"><r:result>5</r:result>'
                             b'<r:extra>1</r:extra></r:AddResponse>')
    ignored: list[str] = []
    assert model.xml_to_json(reply, add.output, lenient=True, ignored=ignored) == {"result": 5}  # type: ignore[arg-type]
    assert ignored == ["/extra"]
    with pytest.raises(MappingError, match="unexpected element"):
        model.xml_to_json(reply, add.output)  # type: ignore[arg-type]


@pytest.mark.parametrize(("xml", "expected"), [
    (b"<v>INF</v>", "INF"), (b"<v>-INF</v>", "-INF"), (b"<v>NaN</v>", "NaN"), (b"<v> 1e3 </v>", 1000.0),
    (b"<v>-0.5</v>", -0.5),
])
def test_special_doubles(calc: wsdl.Contract, xml: bytes, expected: Any) -> None:
    field = calc.port().operations["Sum"].output.type.by_key["total"]  # type: ignore[union-attr]
    assert model.xml_to_json(etree.fromstring(xml), field) == expected


@settings(max_examples=200, deadline=None)
@given(a=st.integers(-(2**31), 2**31 - 1), values=st.lists(st.floats(allow_nan=False, allow_infinity=False)),
       dividend=st.decimals(allow_nan=False, allow_infinity=False, places=6))
def test_numbers_survive_both_directions(calc: wsdl.Contract, a: int, values: list[float], dividend: Decimal) -> None:
    ops = calc.port().operations
    for op, value in (("Add", {"a": a, "b": a // 2}), ("Sum", {"value": values}),
                      ("Divide", {"dividend": dividend, "divisor": Decimal(1)})):
        field = ops[op].input
        elem = model.json_to_xml(model.loads(model.dumps(value)), field)  # type: ignore[arg-type]
        assert calc.validate(elem) == []
        back = model.xml_to_json(etree.fromstring(etree.tostring(elem)), field)  # type: ignore[arg-type]
        assert back == value
        # JSON text: decimals and integers exactly (read back as Decimal/int), doubles as floats.
        reread = json.loads(model.dumps(back)) if op == "Sum" else model.loads(model.dumps(back))
        assert reread == value


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))))
def test_unicode_text_survives_both_directions(orders: wsdl.Contract, text: str) -> None:
    op = orders.port().operations["FindOrders"]
    elem = model.json_to_xml({"customerName": text}, op.input)  # type: ignore[arg-type]
    back = model.xml_to_json(etree.fromstring(etree.tostring(elem)), op.input)  # type: ignore[arg-type]
    assert back == {"customerName": text}


def test_json_schema_follows_the_xsd(orders: wsdl.Contract) -> None:
    b = JsonSchemaBuilder(orders.facets)
    place = b.for_complex_content(orders.port().operations["PlaceOrder"].input)  # type: ignore[arg-type]
    assert place["required"] == ["order"] and place["properties"]["order"] == {"$ref": "#/components/schemas/Order"}
    order = b.definitions["Order"]
    assert order["additionalProperties"] is False
    assert set(order["required"]) == {"id", "customer", "shipTo", "line", "orderDate", "status", "priority",
                                      "discount"}
    assert order["properties"]["line"] == {"type": "array", "items": {"$ref": "#/components/schemas/OrderLine"},
                                           "minItems": 1}
    assert order["properties"]["status"]["enum"] == ["NEW", "PAID", "SHIPPED", "CANCELLED"]
    # XSD dates may carry a zone and date-times may lack one: a pattern, not RFC 3339's formats.
    assert "format" not in order["properties"]["orderDate"]
    assert re.match(order["properties"]["orderDate"]["pattern"], "2024-02-29+01:00")
    assert order["properties"]["discount"]["nullable"] is True
    assert b.definitions["Address"]["properties"]["country"]["pattern"] == "^(?:[A-Z]{2})$"
    qty = b.definitions["OrderLine"]["properties"]["quantity"]
    assert (qty["type"], qty["minimum"], qty["maximum"]) == ("integer", 1, 10000)
    assert b.definitions["Customer"]["required"] == ["number", "name", "vip"]


# --- legacy shapes: an ASMX-style service with a repeated choice and ArrayOfX wrappers -------

JOURNAL = ROOT / "tests" / "legacy" / "asmx_journal.wsdl"


@pytest.fixture(scope="module")
def journal() -> wsdl.Contract:
    return wsdl.load(str(JOURNAL))


def entry(**extra: Any) -> dict[str, Any]:
    return {"entry": {"Id": 1, "Amount": Decimal("2.50"), "Severity": "Low", **extra}}


def round_trip(contract: wsdl.Contract, value: dict[str, Any]) -> tuple[bytes, Any]:
    field = contract.port().operations["Save"].input
    elem = model.json_to_xml(model.loads(model.dumps(value)), field)  # type: ignore[arg-type]
    assert contract.validate(elem) == []
    wire = etree.tostring(elem)
    return wire, model.xml_to_json(etree.fromstring(wire), field)  # type: ignore[arg-type]


def test_a_repeated_choice_keeps_its_order_both_ways(journal: wsdl.Contract) -> None:
    value = entry(_choice=[{"note": "a"}, {"ref": 5}, {"note": "b"}])
    wire, back = round_trip(journal, value)
    assert [etree.QName(c).localname for c in etree.fromstring(wire)[0]][-3:] == ["note", "ref", "note"]
    assert back == value
    field = journal.port().operations["Save"].input
    with pytest.raises(MappingError) as bad:
        model.json_to_xml(entry(_choice=[{"note": "a", "ref": 1}]), field)  # type: ignore[arg-type]
    assert bad.value.as_list() == [{"path": "/entry/_choice/0",
                                    "message": "each item of '_choice' is an object with exactly one key, one of: "
                                               "note, ref"}]


@pytest.mark.parametrize(("lines", "wire_lines", "back"), [
    ({"Line": None}, 0, {"Line": []}),  # null for a repeated element: no items, never one nil item
    ({"Line": []}, 0, {"Line": []}),
    ({"Line": [None]}, 1, {"Line": [None]}),
    ({"Line": [{}, {"Text": ""}]}, 2, {"Line": [{}, {"Text": ""}]}),
    ({}, 0, {"Line": []}),
])
def test_nil_missing_empty_and_empty_arrays(journal: wsdl.Contract, lines: dict[str, Any], wire_lines: int,
                                            back: dict[str, Any]) -> None:
    wire, result = round_trip(journal, entry(Lines=lines))
    assert len(etree.fromstring(wire).findall("{*}entry/{*}Lines/{*}Line")) == wire_lines
    assert result["entry"]["Lines"] == back
    assert "Title" not in result["entry"]  # missing stays missing


def test_overflow_base64_and_enum_errors_name_the_field(journal: wsdl.Contract) -> None:
    field = journal.port().operations["Save"].input
    with pytest.raises(MappingError) as bad:
        model.json_to_xml(model.loads(b'{"entry": {"Id": 1, "Amount": 1e400, "Ratio": -1e400, "Severity": "Low",'
                                      b' "Attachment": "not base64!"}}'), field)  # type: ignore[arg-type]
    assert [e["path"] for e in bad.value.as_list()] == ["/entry/Amount", "/entry/Ratio", "/entry/Attachment"]
    assert "out of range" in bad.value.as_list()[0]["message"]
    assert "base64" in bad.value.as_list()[2]["message"]
    elem = model.json_to_xml(entry(Severity="Medium", _choice=[{"note": "x"}, {"ref": 1}, {"ref": 2}],
                                   Attachment="aGk="), field)  # type: ignore[arg-type]
    elem[0][-1].text = "99999999999"  # out of xs:int: only the XSD knows
    errors = journal.validate_at(elem, field)  # type: ignore[arg-type]
    assert {"path": "/entry/Severity", "message": "Element 'Severity': [facet 'enumeration'] The value 'Medium' is "
                                                  "not an element of the set {'Low', 'High'}."} in errors
    assert errors[-1]["path"] == "/entry/_choice/2/ref"


def test_openapi_schema_of_choices(journal: wsdl.Contract) -> None:
    b = JsonSchemaBuilder(journal.facets)
    b.for_complex_content(journal.port().operations["Save"].input)  # type: ignore[arg-type]
    choice = b.definitions["Entry"]["properties"]["_choice"]
    assert choice["type"] == "array"
    assert [list(o["properties"]) for o in choice["items"]["oneOf"]] == [["note"], ["ref"]]
