"""The spyne services. Wire-compatible with the WSDLs in deploy/examples (same namespaces,
element names, order and types); spyne generates its own WSDL, which the tests compare.

Behaviour hooks for failure tests (documented here, used by tests/integration/test_soap_*.py):

* Divide by 0 → Client fault ``Client.DivideByZero``.
* Subtract with a = -999 → Server fault ``Server.Busy`` (transient on the gateway's side).
* Add with a = 7777 → answers after 3 s (timeouts).
* GetOrder of an unknown id → Client fault with an ``OrderNotFound`` detail element.
"""

from __future__ import annotations

import time
from decimal import Decimal as D
from typing import Any

from lxml import etree
from spyne import Application, ComplexModel, Fault, ServiceBase, rpc
from spyne.model.complex import XmlAttribute
from spyne.model.primitive import Boolean, Date, DateTime, Decimal, Double, Integer32, Unicode
from spyne.protocol.soap import Soap11, Soap12

CALC_NS = "http://example.com/calculator"
ORDERS_NS = "http://example.com/orders"
TYPES_NS = "http://example.com/orders/types"

_Int = Integer32(min_occurs=1, nillable=False)
_Dec = Decimal(min_occurs=1, nillable=False)


class CalculatorService(ServiceBase):
    @rpc(_Int, _Int, _returns=_Int, _out_variable_name="result")
    def Add(ctx, a, b):  # type: ignore[no-untyped-def]
        if a == 7777:
            time.sleep(3)
        return a + b

    @rpc(_Int, _Int, _returns=_Int, _out_variable_name="result")
    def Subtract(ctx, a, b):  # type: ignore[no-untyped-def]
        if a == -999:
            raise Fault(faultcode="Server.Busy", faultstring="the calculator is busy")
        return a - b

    @rpc(_Int, _Int, _returns=_Int, _out_variable_name="result")
    def Multiply(ctx, a, b):  # type: ignore[no-untyped-def]
        return a * b

    @rpc(_Dec, _Dec, _returns=_Dec, _out_variable_name="result")
    def Divide(ctx, dividend, divisor):  # type: ignore[no-untyped-def]
        if divisor == 0:
            raise Fault(faultcode="Client.DivideByZero", faultstring="division by zero")
        return (D(dividend) / D(divisor)).quantize(D("0.0001"))

    @rpc(Double(min_occurs=0, max_occurs="unbounded", nillable=False),
         _returns=(Double(min_occurs=1, nillable=False), Integer32(min_occurs=1, nillable=False)),
         _out_variable_names=("total", "count"))
    def Sum(ctx, value):  # type: ignore[no-untyped-def]
        values = list(value or [])
        return float(sum(values)), len(values)


def _u(min_occurs: int = 1, **kw: Any) -> Any:
    return Unicode(min_occurs=min_occurs, nillable=False, **kw)


class Address(ComplexModel):
    __namespace__ = TYPES_NS
    _type_info = [("street", _u()), ("city", _u()), ("postcode", _u(0)), ("country", _u(pattern="[A-Z]{2}"))]


class Customer(ComplexModel):
    __namespace__ = TYPES_NS
    _type_info = [("name", _u()), ("email", _u(0)), ("vip", Boolean(min_occurs=1, nillable=False)),
                  ("number", XmlAttribute(Unicode, use="required"))]


class OrderLine(ComplexModel):
    __namespace__ = TYPES_NS
    _type_info = [
        ("sku", _u()),
        ("quantity", Integer32(min_occurs=1, nillable=False, ge=1, le=10000)),
        ("unitPrice", Decimal(min_occurs=1, nillable=False)),
        ("note", Unicode(min_occurs=0, nillable=True)),
        ("tag", Unicode(min_occurs=0, max_occurs="unbounded", nillable=False)),
    ]


_STATUS = Unicode(min_occurs=1, nillable=False, values=["NEW", "PAID", "SHIPPED", "CANCELLED"])


class Order(ComplexModel):
    __namespace__ = TYPES_NS
    _type_info = [
        ("id", _u()),
        ("customer", Customer.customize(min_occurs=1, nillable=False)),
        ("shipTo", Address.customize(min_occurs=1, nillable=False)),
        ("billTo", Address.customize(min_occurs=0, nillable=False)),
        ("line", OrderLine.customize(min_occurs=1, max_occurs="unbounded", nillable=False)),
        ("orderDate", Date(min_occurs=1, nillable=False)),
        ("deliverAfter", DateTime(min_occurs=0, nillable=False)),
        ("status", _STATUS),
        ("priority", Boolean(min_occurs=1, nillable=False)),
        ("discount", Decimal(min_occurs=1, nillable=True)),
        ("weightKg", Double(min_occurs=0, nillable=False)),
        ("comment", _u(0)),
    ]


class OrderFault(ComplexModel):
    __namespace__ = TYPES_NS
    _type_info = [("code", _u()), ("message", _u())]


class OrdersService(ServiceBase):
    """An in-memory order book, one per application instance."""

    @rpc(Order.customize(min_occurs=1, nillable=False),
         _returns=(_u(), _STATUS, Decimal(min_occurs=1, nillable=False), DateTime(min_occurs=1, nillable=False),
                   Unicode(min_occurs=0, max_occurs="unbounded", nillable=False)),
         _out_variable_names=("orderId", "status", "total", "acceptedAt", "warning"))
    def PlaceOrder(ctx, order):  # type: ignore[no-untyped-def]
        book = ctx.app.book
        book[order.id] = order
        total = sum((D(line.unitPrice) * line.quantity for line in order.line), D(0))
        if order.discount is not None:
            total -= D(order.discount)
        warnings = [f"line {i} has no tags" for i, line in enumerate(order.line) if not line.tag]
        return order.id, "NEW", total, _ACCEPTED_AT, warnings

    @rpc(_u(), _returns=Order.customize(min_occurs=1, nillable=False), _out_variable_name="order")
    def GetOrder(ctx, orderId):  # type: ignore[no-untyped-def]
        order = ctx.app.book.get(orderId)
        if order is None:
            detail = etree.Element(f"{{{ORDERS_NS}}}OrderNotFound")
            etree.SubElement(detail, f"{{{TYPES_NS}}}code").text = "NOT_FOUND"
            etree.SubElement(detail, f"{{{TYPES_NS}}}message").text = f"no order {orderId}"
            raise Fault(faultcode="Client", faultstring=f"order {orderId} not found", detail=detail)
        return order

    @rpc(_STATUS.customize(min_occurs=0), Date(min_occurs=0, nillable=False), _u(0),
         _returns=Order.customize(min_occurs=0, max_occurs="unbounded", nillable=False), _out_variable_name="order")
    def FindOrders(ctx, status, since, customerName):  # type: ignore[no-untyped-def]
        out = []
        for order in ctx.app.book.values():
            if status and order.status != status:
                continue
            if since and order.orderDate < since:
                continue
            if customerName and order.customer.name != customerName:
                continue
            out.append(order)
        return out

    @rpc(Order.customize(min_occurs=1, nillable=False), _returns=Order.customize(min_occurs=1, nillable=False),
         _out_variable_name="order")
    def EchoOrder(ctx, order):  # type: ignore[no-untyped-def]
        return order


_ACCEPTED_AT = __import__("datetime").datetime(2024, 3, 1, 12, 0, 0)


def calculator_app(version: str = "1.1") -> Application:
    proto = Soap11 if version == "1.1" else Soap12
    return Application([CalculatorService], tns=CALC_NS, name="Calculator",
                       in_protocol=proto(validator="lxml"), out_protocol=proto())


def orders_app() -> Application:
    app = Application([OrdersService], tns=ORDERS_NS, name="Orders",
                      in_protocol=Soap11(validator="lxml"), out_protocol=Soap11())
    app.book = {}
    return app
