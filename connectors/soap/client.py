"""Calling a SOAP operation: JSON → input element → envelope → HTTP (aiohttp) → reply or failure.

zeep supplies the WSDL/XSD model and WS-Security; the HTTP leg uses aiohttp, like the rest
connector: in bench/bench_soap.py it kept the gateway closer to the direct-call baseline than
httpx (zeep's async transport) did on this 2-core machine.

Failure mapping (what the core does with it):

=====================================  =====================================================
what happened                           raised
=====================================  =====================================================
input does not fit the XSD              ``PermanentError(code=422, detail={errors})``
unknown or unsupported operation        ``PermanentError(code=404 / 501)``
SOAP fault Client/Sender/MustUnder…     ``PermanentError(code=422, detail={faultcode, faultstring, detail})``
SOAP fault Server/Receiver (or other)   ``TransientError(code=502, detail=…)`` — retried
HTTP 408/429/5xx without a fault        ``TransientError(code=502/503)``
other HTTP 4xx, 3xx                     ``PermanentError(code=502)`` (the gateway's setup, not the caller's)
timeout                                 ``TransientError(code=504)``
connection refused/reset, TLS failure   ``TransientError(code=502)``
reply not SOAP, hostile XML, too big    ``PermanentError(code=502)`` (it can never parse)
XML workers full past their deadline    ``TransientError(code=503)`` (the reply was not judged)
=====================================  =====================================================

The reply is parsed, checked and mapped (linear in its size) in an XML worker thread once it
is larger than ``safexml.INLINE_BYTES``.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp

from connectors.soap import model, safexml, soapenv
from connectors.soap.config import SoapConfig
from connectors.soap.model import Field, MappingError, RenderOptions
from connectors.soap.wsdl import Contract, Operation, Port, WsdlError, is_url
from gateway.sdk import PermanentError, Reply, TransientError, basic_authorization, event

#: Replies are parsed as hardened as requests, with room for deep legacy documents.
_REPLY_MAX_DEPTH = safexml.LIBXML_MAX_DEPTH


class SoapCaller:
    def __init__(self, cfg: SoapConfig, contract: Contract, log: logging.Logger, name: str):
        self.cfg = cfg
        self.contract = contract
        self.port: Port = contract.port(cfg.port)
        self.endpoint = cfg.endpoint or self.port.address or ""
        self.log = log
        self.name = name
        verify: ssl.SSLContext | bool = cfg.verify_tls
        if cfg.verify_tls and cfg.ca_file:
            verify = ssl.create_default_context(cafile=cfg.ca_file)
        self._authorization: str | None = None
        if cfg.http_auth is not None:
            self._authorization = basic_authorization(cfg.http_auth.username, cfg.http_auth.password.get_secret_value())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.max_connections, ssl=verify), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=cfg.timeout))

    async def aclose(self) -> None:
        await self._session.close()

    def operation(self, name: str) -> Operation:
        op = self.port.operations.get(name)
        if op is None:
            raise PermanentError(f"{self.contract.service} has no operation {name!r}", code=404,
                                 detail={"operations": sorted(self.port.operations)})
        if op.unsupported or op.input is None:
            raise PermanentError(f"operation {name!r} is not supported: {op.unsupported}", code=501)
        return op

    def build_input(self, op: Operation, value: Any, *, from_text: bool) -> Any:
        """The input element for ``value``, checked against the XSD (PermanentError 422 if not)."""
        assert op.input is not None
        if not isinstance(value, dict):
            raise PermanentError(f"the input of {op.name} must be a JSON object", code=422)
        try:
            elem = model.json_to_xml(value, op.input, RenderOptions(from_text=from_text,
                                                                    parse_any=safexml.parse_fragment))
        except MappingError as exc:
            raise PermanentError(f"the input does not fit {op.name}: {exc}", code=422,
                                 detail={"errors": exc.as_list()}) from None
        errors = self.contract.validate_at(elem, op.input)
        if errors:
            raise PermanentError(f"the input does not fit {op.name}: {errors[0]['path']}: {errors[0]['message']}",
                                 code=422, detail={"errors": errors})
        return elem

    def request(self, op: Operation, payload: Any) -> tuple[bytes, dict[str, str]]:
        version = self.port.version
        env = soapenv.envelope(version, payload)
        if self.cfg.wsse is not None:
            from zeep.wsse.username import UsernameToken

            token: Any = UsernameToken  # zeep's wsse module is untyped
            token(self.cfg.wsse.username, self.cfg.wsse.password.get_secret_value(),
                  use_digest=self.cfg.wsse.digest).apply(env, {})
        headers = {"Content-Type": soapenv.CONTENT_TYPE[version], "Accept": "text/xml, application/soap+xml"}
        if self._authorization is not None:
            headers["Authorization"] = self._authorization
        if version == "1.1":
            headers["SOAPAction"] = f'"{op.action}"'
        elif op.action:
            headers["Content-Type"] += f'; action="{op.action}"'
        return soapenv.to_bytes(env), headers

    async def call(self, op: Operation, payload: Any, *, within: float, reply_as: str,
                   envelope_id: str, trace: Mapping[str, str] | None = None) -> Reply:
        """Call ``op``; ``trace`` is the attempt's ``traceparent``/``tracestate`` HTTP headers."""
        if not is_url(self.endpoint):
            raise PermanentError(f"connector {self.name!r} has no endpoint to call (set endpoint:)", code=502)
        body, headers = self.request(op, payload)
        if trace:
            headers.update(trace)
        label = f"{self.contract.service}.{op.name}"
        too_large = f"{label}: the reply is larger than {self.cfg.max_reply} bytes"
        try:
            async with self._session.post(self.endpoint, data=body, headers=headers, allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=min(within, self.cfg.timeout))) as resp:
                if resp.content_length is not None and resp.content_length > self.cfg.max_reply:
                    raise PermanentError(too_large, code=502)
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > self.cfg.max_reply:
                        raise PermanentError(too_large, code=502)
                    chunks.append(chunk)
                status = resp.status
        except TimeoutError as exc:
            raise TransientError(f"{label}: no answer in time", code=504) from exc
        except aiohttp.ClientError as exc:
            raise TransientError(f"{label}: {type(exc).__name__}", code=502) from exc
        data = b"".join(chunks)
        try:
            return await safexml.off_loop(
                len(data), lambda: self._reply(op, label, status, data, reply_as, envelope_id))
        except safexml.XmlBusy as exc:
            raise TransientError(f"{label}: {exc}", code=503) from None

    def _reply(self, op: Operation, label: str, status: int, data: bytes, reply_as: str, envelope_id: str) -> Reply:
        try:
            root = safexml.parse(data, max_bytes=self.cfg.max_reply, max_depth=_REPLY_MAX_DEPTH)
            parsed = soapenv.split(root)
        except (safexml.XmlRejected, soapenv.NotSoap) as exc:
            _raise_for_http(label, status)
            raise PermanentError(f"{label}: the reply is not a SOAP envelope ({exc})", code=502) from None
        if soapenv.is_fault(parsed.version, parsed.payload):
            raise self._fault(op, label, soapenv.read_fault(parsed.version, parsed.payload),
                              soapenv.carry_fault(parsed.version, parsed.payload))
        _raise_for_http(label, status)
        if op.output is None:
            return Reply(body=b"", content_type="application/json", status=202)
        payload = parsed.payload
        if payload is None:
            raise PermanentError(f"{label}: the reply's Body is empty", code=502)
        if etree_local(payload.tag) != op.output.local:
            raise PermanentError(f"{label}: the reply holds {etree_local(payload.tag)!r}, not {op.output.local!r}",
                                 code=502)
        if reply_as == "xml":
            from lxml import etree

            return Reply(body=etree.tostring(payload, encoding="utf-8"), content_type="application/xml; charset=utf-8")
        ignored: list[str] = []
        try:
            value = model.xml_to_json(payload, op.output, lenient=True, ignored=ignored)
        except MappingError as exc:
            raise PermanentError(f"{label}: the reply does not fit the WSDL: {exc}", code=502,
                                 detail={"errors": exc.as_list()}) from None
        if ignored:
            event(self.log, "soap.reply_ignored", logging.WARNING, envelope_id=envelope_id, operation=op.name,
                  elements=",".join(ignored[:10]))
        return Reply(body=model.dumps(value), content_type="application/json")

    def _fault(self, op: Operation, label: str, info: soapenv.FaultInfo,
               carried: dict[str, str] | None) -> PermanentError | TransientError:
        detail: dict[str, Any] = {"faultcode": info.code, "faultstring": info.string,
                                  "detail": self.fault_detail(op, info.detail)}
        if carried is not None:
            # The fault as the service wrote it, so a SOAP caller of the gateway gets it unchanged.
            detail[soapenv.CARRIED_FAULT] = carried
        if info.subcodes:
            detail["subcodes"] = info.subcodes
        message = f"SOAP fault from {label}: {info.code}: {info.string}"
        if info.permanent:
            return PermanentError(message, code=422, detail=detail)
        return TransientError(message, code=502, detail=detail)

    def fault_detail(self, op: Operation, items: list[Any]) -> dict[str, Any] | None:
        """The fault's detail as JSON: typed when the WSDL declares the element, else plain."""
        if not items:
            return None
        out: dict[str, Any] = {}
        for elem in items:
            declared: Field | None = next((f for f in op.faults if f.tag == elem.tag), None)
            local = etree_local(elem.tag)
            try:
                out[local] = model.xml_to_json(elem, declared, lenient=True) if declared else _plain(elem)
            except MappingError:
                out[local] = _plain(elem)
        return out


def etree_local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _plain(elem: Any, depth: int = 0) -> Any:
    """Untyped XML → JSON for detail nobody declared: text, or a dict of children (lists when repeated)."""
    children = [c for c in elem if isinstance(c.tag, str)]
    if not children or depth > 32:
        return (elem.text or "").strip()
    out: dict[str, Any] = {}
    for c in children:
        key, value = etree_local(c.tag), _plain(c, depth + 1)
        if key in out:
            if not isinstance(out[key], list):
                out[key] = [out[key]]
            out[key].append(value)
        else:
            out[key] = value
    return out


def _raise_for_http(label: str, status: int) -> None:
    if 200 <= status < 300:
        return
    detail = {"status": status}
    if status in (408, 429) or status >= 500:
        raise TransientError(f"{label}: HTTP {status}", code=503 if status in (429, 503) else 502, detail=detail)
    raise PermanentError(f"{label}: HTTP {status}", code=502, detail=detail)


def load_error(exc: Exception) -> TransientError:
    """A WSDL that cannot be fetched now is a transient failure of ``open``."""
    if isinstance(exc, WsdlError):
        return TransientError(str(exc))
    return TransientError(f"cannot load the WSDL: {type(exc).__name__}: {exc}")
