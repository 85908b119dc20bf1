"""The REST façade: a JSON endpoint per WSDL operation, documented by an OpenAPI document.

``POST <prefix>/<Operation>`` takes the input element's content as JSON, checks it exactly as the
SOAP side would (typed mapping + XSD validation: the same rules, so nothing passes here that the
SOAP service would refuse), and delivers an envelope (subject: the operation; body: the JSON)
to the routes. A request/reply route's answer comes back as the response. ``GET
<prefix>/openapi.json`` describes every operation with request and response schemas derived
from the XSD; ``GET <prefix>/docs`` is Swagger UI served from the gateway itself (no CDN).
"""

from __future__ import annotations

import asyncio
import logging
import os
from decimal import Decimal
from typing import Any

from connectors.soap import model, safexml
from connectors.soap.answers import describe
from connectors.soap.asgi import (
    Authenticator,
    forwarded_headers,
    headers_of,
    problem,
    public_base,
    read_body,
    respond,
    trace_header,
)
from connectors.soap.config import Listener
from connectors.soap.model import JsonSchemaBuilder, MappingError, RenderOptions
from connectors.soap.wsdl import Contract, Operation, Port
from gateway.sdk import (
    BodyTooLarge,
    ClientDisconnected,
    Deliver,
    Envelope,
    InFlight,
    Receive,
    Scope,
    Send,
    Status,
    event,
    is_json_type,
    json_depth_exceeds,
    tracecontext,
)

_DOCS_FILES = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "application/javascript",
               "favicon-32x32.png": "image/png"}
_DOCS_CSP = (b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
             b"script-src 'self'; frame-ancestors 'none'")


class RestFacade:
    def __init__(self, connector: str, contract: Contract, port: Port, listener: Listener, log: logging.Logger):
        self.connector = connector
        self.contract = contract
        self.port = port
        self.listener = listener
        self.log = log
        self.auth = Authenticator(listener.auth)
        self.deliver: Deliver | None = None
        self.accepting = False
        self.inflight = InFlight()
        self._static: dict[str, bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = headers_of(scope)
        rest = scope["path"][len(self.listener.prefix):].strip("/")
        method = scope["method"]
        try:
            if method == "GET" and rest == "openapi.json":
                await respond(send, 200, model.dumps(self.openapi(public_base(self.listener, scope, headers))),
                              "application/json")
            elif method == "GET" and (rest == "docs" or rest.startswith("docs/")):
                await self._docs(send, rest.removeprefix("docs").strip("/"))
            elif rest in self.port.operations:
                if method != "POST":
                    await problem(send, 405, "Method Not Allowed", f"use POST for {rest}",
                                  headers=[(b"allow", b"POST")])
                else:
                    await self._call(scope, headers, receive, send, self.port.operations[rest])
            else:
                await problem(send, 404, "Not Found", f"no operation {rest!r}; see {self.listener.prefix}/openapi.json")
        except ClientDisconnected:
            return
        except Exception:
            self.log.exception("soap.facade_bug", extra={"fields": {"connector": self.connector}})
            await problem(send, 500, "Internal Server Error", "internal error in the gateway")

    async def _refuse(self, send: Send, scope: Scope, status: int, title: str, detail: str,
                      headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> None:
        event(self.log, "soap.facade_refused", logging.INFO, connector=self.connector, status=status, reason=detail,
              peer=_peer(scope))
        await problem(send, status, title, detail, headers=headers, **extra)

    async def _call(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send, op: Operation) -> None:
        if not self.accepting or self.deliver is None:
            await self._refuse(send, scope, 503, "Service Unavailable", "the gateway is not accepting messages now",
                               [(b"retry-after", b"5")])
            return
        denied = self.auth.check(headers)
        if denied:
            await self._refuse(send, scope, denied[0], "Unauthorized" if denied[0] == 401 else "Forbidden", denied[1],
                               self.auth.challenge() if denied[0] == 401 else None)
            return
        if op.unsupported or op.input is None:
            await self._refuse(send, scope, 501, "Not Implemented", f"{op.name} is not supported: {op.unsupported}")
            return
        if not is_json_type(headers.get("content-type", "")):
            await self._refuse(send, scope, 415, "Unsupported Media Type", "send application/json")
            return
        limit = self.listener.max_body
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(send, scope, 413, "Content Too Large", f"the body limit is {limit} bytes")
            return
        try:
            body = await read_body(receive, limit, self.listener.read_timeout)
        except BodyTooLarge:
            await self._refuse(send, scope, 413, "Content Too Large", f"the body limit is {limit} bytes")
            return
        except TimeoutError:
            await self._refuse(send, scope, 408, "Request Timeout",
                               f"the body did not arrive within {self.listener.read_timeout:g}s")
            return
        if json_depth_exceeds(body, self.listener.max_depth):
            await self._refuse(send, scope, 400, "Bad Request", f"JSON nested deeper than {self.listener.max_depth}")
            return
        try:
            value = model.loads(body)
        except MappingError as exc:
            await self._refuse(send, scope, 400, "Bad Request", str(exc))
            return
        if not isinstance(value, dict):
            await self._refuse(send, scope, 422, "Unprocessable Content", f"the body of {op.name} is a JSON object")
            return
        try:
            errors = await safexml.off_loop(len(body), lambda: self._misfits(op, value))
        except safexml.XmlBusy:
            await self._refuse(send, scope, 503, "Service Unavailable", "the gateway is busy; retry later",
                               [(b"retry-after", b"5")])
            return
        if errors:
            await self._refuse(send, scope, 422, "Unprocessable Content", f"the body does not fit {op.name}",
                               errors=errors)
            return
        env = Envelope(source=self.connector, protocol="rest", subject=op.name, body=model.dumps(value),
                       content_type="application/json", headers=forwarded_headers(headers),
                       attributes={"interface": "rest_facade", "operation": op.name, "http_method": "POST",
                                   "service": self.contract.service, "peer": _peer(scope),
                                   **tracecontext.inbound_attributes(headers)})
        with self.inflight:
            outcome = await self.deliver(env)
        ids = [(b"x-envelope-id", env.id.encode()), *trace_header(outcome)]
        if outcome.status is Status.ACCEPTED and outcome.reply is not None:
            r = outcome.reply
            await respond(send, r.status if 200 <= r.status < 300 else 200, r.body, r.content_type, ids)
        elif outcome.acknowledge:
            await respond(send, 202, model.dumps({"id": env.id, "status": outcome.status.value}),
                          "application/json", ids)
        else:
            failure = describe(outcome)
            event(self.log, "soap.facade_failed", logging.INFO, envelope_id=env.id, operation=op.name,
                  status=outcome.status.value, code=outcome.code, reason=outcome.reason)
            if failure.retry_after:
                ids.append((b"retry-after", str(failure.retry_after).encode()))
            up = failure.upstream
            fault = _json_numbers({k: up[k] for k in ("faultcode", "faultstring", "detail") if k in up}) or None
            await problem(send, failure.status, _TITLES.get(failure.status, "Error"), failure.message, headers=ids,
                          envelope_id=env.id, fault=fault, errors=up.get("errors"))

    def _misfits(self, op: Operation, value: dict[str, Any]) -> list[dict[str, Any]]:
        """Why ``value`` is not a valid input of ``op`` (typed mapping, then XSD); empty when it is.
        Linear in the body (``_any`` strings are parsed by safexml); large bodies run it in an XML
        worker thread."""
        assert op.input is not None
        try:
            elem = model.json_to_xml(value, op.input, RenderOptions(parse_any=safexml.parse_fragment))
        except MappingError as exc:
            return exc.as_list()
        return self.contract.validate_at(elem, op.input)

    # --- OpenAPI ----------------------------------------------------------------------

    def openapi(self, server_url: str) -> dict[str, Any]:
        schemas = JsonSchemaBuilder(self.contract.facets)
        paths: dict[str, Any] = {}
        for op in self.port.operations.values():
            if op.unsupported or op.input is None:
                continue
            responses: dict[str, Any] = {
                "202": {"description": "Accepted without a reply (the route is not request/reply)",
                        "content": {"application/json": {"schema": {
                            "type": "object", "properties": {"id": {"type": "string"},
                                                             "status": {"type": "string"}}}}}},
            }
            if op.output is not None:
                responses["200"] = {"description": f"The {op.output.local} element as JSON",
                                    "content": {"application/json": {"schema": schemas.for_complex_content(op.output)}}}
            faulted = self._fault_problem(op, schemas)
            for code, text in _TITLES.items():
                typed = faulted is not None and code in (422, 502)
                schema = faulted if typed else {"$ref": "#/components/schemas/Problem"}
                responses[str(code)] = {"description": text,
                                        "content": {"application/problem+json": {"schema": schema}}}
                if typed:
                    responses[str(code)]["description"] += (" (a SOAP fault of the service: "
                                                            f"{', '.join(f.local for f in op.faults)})")
            paths[f"/{op.name}"] = {"post": {
                "operationId": op.name,
                "summary": f"{self.contract.service}.{op.name}",
                "description": f"Calls {op.name} with the {op.input.local} element's content as JSON. Repeated "
                               "elements are always arrays; xsi:nil is null; decimals are exact numbers; dates "
                               "and times are XSD lexical strings.",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": schemas.for_complex_content(op.input)}}},
                "responses": responses,
            }}
        components: dict[str, Any] = {"schemas": {**schemas.definitions, "Problem": _PROBLEM}}
        doc: dict[str, Any] = {
            "openapi": "3.0.3",
            "info": {"title": f"{self.contract.service} (REST façade of {self.connector})", "version": "1",
                     "description": f"Generated by the gateway from {os.path.basename(self.contract.location)}."},
            "servers": [{"url": server_url}],
            "paths": paths,
            "components": components,
        }
        if self.auth.type != "none":
            components["securitySchemes"] = {"auth": {"type": "http", "scheme": self.auth.type}}
            doc["security"] = [{"auth": []}]
        return doc

    def _fault_problem(self, op: Operation, schemas: JsonSchemaBuilder) -> dict[str, Any] | None:
        """The problem schema of ``op`` with its declared faults' detail elements typed (one key per
        element, as the answer carries them); None when the WSDL declares no fault for it."""
        if not op.faults:
            return None
        detail = {"type": "object", "nullable": True, "additionalProperties": False,
                  "properties": {f.local: schemas.for_complex_content(f) for f in op.faults}}
        fault = {"type": "object", "description": "the SOAP fault of the service", "properties": {
            "faultcode": {"type": "string"}, "faultstring": {"type": "string"}, "detail": detail}}
        return {"allOf": [{"$ref": "#/components/schemas/Problem"},
                          {"type": "object", "properties": {"fault": fault}}]}

    async def _docs(self, send: Send, name: str) -> None:
        try:
            import swagger_ui_bundle  # type: ignore[import-untyped]
        except ImportError:
            await problem(send, 404, "Not Found", "Swagger UI needs the swagger-ui-bundle package; "
                                                  f"the API is described at {self.listener.prefix}/openapi.json")
            return
        headers = [(b"content-security-policy", _DOCS_CSP), (b"x-content-type-options", b"nosniff")]
        prefix = self.listener.prefix
        if name == "":
            page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{self.contract.service}</title>'
                    f'<link rel="stylesheet" href="{prefix}/docs/swagger-ui.css"></head>'
                    f'<body><div id="swagger-ui"></div><script src="{prefix}/docs/swagger-ui-bundle.js"></script>'
                    f'<script src="{prefix}/docs/init.js"></script></body></html>')
            await respond(send, 200, page.encode(), "text/html; charset=utf-8", headers)
        elif name == "init.js":
            js = (f'window.ui = SwaggerUIBundle({{url: "{prefix}/openapi.json", dom_id: "#swagger-ui", '
                  'deepLinking: true});')
            await respond(send, 200, js.encode(), "application/javascript", headers)
        elif name in _DOCS_FILES:
            data = self._static.get(name)
            if data is None:
                path = os.path.join(swagger_ui_bundle.swagger_ui_path, name)
                data = self._static[name] = await asyncio.to_thread(_read, path)
            await respond(send, 200, data, _DOCS_FILES[name], headers)
        else:
            await problem(send, 404, "Not Found", f"no such file: {name}")


def _json_numbers(value: Any) -> Any:
    """Exact decimals of a typed fault detail as JSON numbers (problem+json is written by json)."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        exponent = value.as_tuple().exponent
        return int(value) if isinstance(exponent, int) and exponent >= 0 else float(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 408: "Request Timeout",
           413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_PROBLEM = {"type": "object", "description": "RFC 9457 problem details", "properties": {
    "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
    "detail": {"type": "string"}, "envelope_id": {"type": "string"},
    "errors": {"type": "array", "items": {"type": "object", "properties": {
        "path": {"type": "string"}, "message": {"type": "string"}}}},
    "fault": {"type": "object", "description": "the SOAP fault of the service",
              "properties": {"faultcode": {"type": "string"}, "faultstring": {"type": "string"},
                             "detail": {"type": "object", "nullable": True}}}}}
