"""The SOAP service the gateway serves from a user's WSDL (an ASGI app on the shared listener).

``GET <prefix>?wsdl`` returns the WSDL with every SOAP address rewritten to the gateway's URL
(``?xsd=N`` for the documents it imports). ``POST <prefix>`` takes a SOAP 1.1 (``text/xml``) or
1.2 (``application/soap+xml``) request, checked in this order, each refusal a SOAP fault and a
log line: auth → size (before reading, then while reading) → encoding, tag count and DTD (before
parsing) → hardened parse → depth → envelope → mustUnderstand headers → operation (by the Body element;
SOAPAction only breaks ties) → XSD validation → typed JSON. The steps from the parse on are
linear in the body and run in an XML worker thread once it is larger than
``safexml.INLINE_BYTES``; when the workers stay full past their deadline the answer is a Server
fault, 503 with ``Retry-After`` (the body was not judged). The envelope's subject is the
operation name and its body the typed JSON; the outcome becomes the HTTP answer.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from connectors.soap import model, safexml, soapenv
from connectors.soap.answers import describe
from connectors.soap.asgi import (
    Authenticator,
    forwarded_headers,
    headers_of,
    public_base,
    read_body,
    respond,
    trace_header,
)
from connectors.soap.config import Listener
from connectors.soap.model import MappingError, RenderOptions
from connectors.soap.soapenv import CLIENT, SERVER
from connectors.soap.wsdl import Contract, Operation
from gateway.sdk import (
    BodyTooLarge,
    ClientDisconnected,
    Deliver,
    Envelope,
    InFlight,
    Outcome,
    Receive,
    Reply,
    Scope,
    Send,
    Status,
    event,
    is_json_type,
    is_xml_type,
    media_type,
    tracecontext,
)


class Refusal(Exception):
    """A request the service answers with a fault before it reaches the router."""

    def __init__(self, kind: str, message: str, status: int | None = None, *, fault_code: str | None = None,
                 errors: list[str] | None = None, headers: list[tuple[bytes, bytes]] | None = None,
                 log_reason: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        #: What the log says when the message quotes the caller's data (logs carry no bodies).
        self.log_reason = log_reason or message
        self.status = status
        self.fault_code = fault_code
        self.errors = errors or []
        self.headers = headers or []
        #: The SOAP version of the request once known (faults answer in the caller's version).
        self.version: str | None = None


#: An XML reply handed back by a route (from a backend whose own limits already applied).
_MAX_ROUTE_REPLY = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Call:
    """A request that passed every check: what the envelope is built from."""

    version: str
    port: str
    op: Operation
    body: bytes


class SoapService:
    def __init__(self, connector: str, contract: Contract, listener: Listener, log: logging.Logger):
        self.connector = connector
        self.contract = contract
        self.listener = listener
        self.log = log
        self.auth = Authenticator(listener.auth)
        self.deliver: Deliver | None = None
        self.accepting = False
        self.inflight = InFlight()
        self._documents: OrderedDict[str, list[bytes]] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = headers_of(scope)
        version = "1.2" if media_type(headers.get("content-type", "")) == "application/soap+xml" else "1.1"
        try:
            if scope["path"].rstrip("/") != self.listener.prefix:
                raise Refusal(CLIENT, f"nothing is served at {scope['path']}", 404)
            if scope["method"] in ("GET", "HEAD"):
                await self._get(scope, headers, send)
                return
            if scope["method"] != "POST":
                raise Refusal(CLIENT, "use POST for SOAP requests or GET ?wsdl", 405,
                              headers=[(b"allow", b"GET, POST")])
            await self._post(scope, headers, receive, send)
        except Refusal as r:
            event(self.log, "soap.refused", logging.INFO, connector=self.connector, reason=r.log_reason,
                  status=r.status, peer=_peer(scope))
            await self._fault(send, r.version or version, r.kind, r.message, status=r.status, subcode=r.fault_code,
                              errors=r.errors, headers=r.headers)
        except ClientDisconnected:
            return  # nothing delivered, nothing acknowledged
        except Exception:
            self.log.exception("soap.bug", extra={"fields": {"connector": self.connector}})
            await self._fault(send, version, SERVER, "internal error in the gateway")

    # --- GET: the WSDL and its schemas --------------------------------------------------

    async def _get(self, scope: Scope, headers: dict[str, str], send: Send) -> None:
        self._authorize(headers)
        query = {k.lower(): v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                    keep_blank_values=True)}
        docs = self._documents_for(public_base(self.listener, scope, headers))
        if "wsdl" in query:
            index = 0
        elif query.get("xsd", "").isdigit() and int(query["xsd"]) < len(docs):
            index = int(query["xsd"])
        else:
            raise Refusal(CLIENT, "GET needs ?wsdl (or ?xsd=N for an imported document)", 404)
        body = docs[index] if scope["method"] == "GET" else b""
        await respond(send, 200, body, "text/xml; charset=utf-8")

    def _documents_for(self, base: str) -> list[bytes]:
        docs = self._documents.get(base)
        if docs is None:
            docs = self.contract.documents(base, base)
            self._documents[base] = docs
            while len(self._documents) > 8:  # Host headers vary; keep the cache bounded
                self._documents.popitem(last=False)
        return docs

    # --- POST: a call ------------------------------------------------------------------

    def _authorize(self, headers: dict[str, str]) -> None:
        denied = self.auth.check(headers)
        if denied:
            raise Refusal(CLIENT, denied[1], denied[0], headers=self.auth.challenge() if denied[0] == 401 else [])

    async def _post(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> None:
        if not self.accepting or self.deliver is None:
            raise Refusal(SERVER, "the gateway is not accepting messages now; retry later", 503,
                          headers=[(b"retry-after", b"5")])
        self._authorize(headers)
        mt = media_type(headers.get("content-type", ""))
        if mt not in ("text/xml", "application/soap+xml"):
            raise Refusal(CLIENT, "SOAP requests are text/xml (1.1) or application/soap+xml (1.2)", 415)
        limit = self.listener.max_body
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Refusal(CLIENT, f"the body limit is {limit} bytes", 413 if declared.isdigit() else 400)
        try:
            body = await read_body(receive, limit, self.listener.read_timeout)
        except BodyTooLarge:
            raise Refusal(CLIENT, f"the body limit is {limit} bytes", 413) from None
        except TimeoutError:
            raise Refusal(CLIENT, f"the body did not arrive within {self.listener.read_timeout:g}s", 408) from None
        try:
            call = await safexml.off_loop(len(body), lambda: self._decode(body, headers))
        except safexml.XmlBusy:
            raise Refusal(SERVER, "the gateway is busy; retry later", 503,
                          headers=[(b"retry-after", b"5")]) from None
        await self._dispatch(scope, headers, send, call)

    def _decode(self, body: bytes, headers: dict[str, str]) -> _Call:
        """Body bytes → operation and typed JSON, or a Refusal. Pure CPU work: large bodies run
        it in an XML worker thread (safexml.off_loop). A request the caller got wrong is a Client
        (1.2: Sender) fault with the HTTP status each binding prescribes: 500 for SOAP 1.1 (WS-I
        Basic Profile R1126, what .NET and Java clients expect), 400 for SOAP 1.2; 413 for size."""
        try:
            root = safexml.parse(body, max_bytes=self.listener.max_body, max_depth=self.listener.max_depth)
            parsed = soapenv.split(root)
        except safexml.XmlRejected as exc:
            raise Refusal(CLIENT, exc.reason, 413 if exc.status == 413 else None) from None
        except soapenv.NotSoap as exc:
            raise Refusal(CLIENT, str(exc), fault_code=None) from None
        try:
            return self._operation_call(parsed, headers)
        except Refusal as r:
            r.version = parsed.version
            raise

    def _operation_call(self, parsed: soapenv.Parsed, headers: dict[str, str]) -> _Call:
        version = parsed.version
        port = self.contract.port_for_version(version)
        if port is None:
            raise Refusal(CLIENT, f"this service does not speak SOAP {version}", fault_code="VersionMismatch")
        _check_headers(parsed)
        if parsed.payload is None or parsed.extra:
            raise Refusal(CLIENT, "the Body must hold exactly one element (document/literal wrapped)")
        op = self._operation(port.by_input.get(parsed.payload.tag, []), headers, version)
        if op.unsupported or op.input is None:
            raise Refusal(SERVER, f"operation {op.name} is not supported by the gateway")
        errors = self.contract.validate(parsed.payload)
        if errors:
            raise Refusal(CLIENT, f"the request does not fit {op.name}: {errors[0]}", errors=errors,
                          log_reason=f"the request does not fit {op.name} ({len(errors)} XSD error(s))")
        try:
            data = model.xml_to_json(parsed.payload, op.input)
        except MappingError as exc:
            raise Refusal(CLIENT, f"the request does not fit {op.name}: {exc}", errors=[str(exc)],
                          log_reason=f"the request does not fit {op.name} (mapping)") from None
        return _Call(version, port.name, op, model.dumps(data))

    async def _dispatch(self, scope: Scope, headers: dict[str, str], send: Send, call: _Call) -> None:
        assert self.deliver is not None
        version, op = call.version, call.op
        env = Envelope(
            source=self.connector, protocol="soap", subject=op.name, body=call.body,
            content_type="application/json", headers=forwarded_headers(headers),
            attributes={"soap_version": version, "soap_action": _soap_action(headers, version) or op.action,
                        "operation": op.name, "service": self.contract.service, "port": call.port,
                        "http_method": "POST", "peer": _peer(scope),
                        **tracecontext.inbound_attributes(headers)})
        with self.inflight:
            outcome = await self.deliver(env)
        await self._answer(send, env, op, version, outcome)

    def _operation(self, candidates: list[Operation], headers: dict[str, str], version: str) -> Operation:
        if not candidates:
            raise Refusal(CLIENT, "the Body's element is not an operation of this service")
        if len(candidates) > 1:
            action = _soap_action(headers, version)
            for op in candidates:
                if op.action and op.action == action:
                    return op
        return candidates[0]

    # --- the answer ----------------------------------------------------------------------

    async def _answer(self, send: Send, env: Envelope, op: Operation, version: str, outcome: Outcome) -> None:
        ids = [(b"x-envelope-id", env.id.encode()), *trace_header(outcome)]
        if outcome.status is Status.ACCEPTED and outcome.reply is not None and op.output is not None:
            reply = outcome.reply
            try:
                payload = await safexml.off_loop(len(reply.body), lambda: self._reply_payload(op, reply))
            except safexml.XmlBusy as exc:
                event(self.log, "soap.reply_unusable", logging.WARNING, envelope_id=env.id, operation=op.name,
                      reason=str(exc))
                await self._fault(send, version, SERVER, "the gateway is busy; retry later", envelope_id=env.id,
                                  status=503, headers=[*ids, (b"retry-after", b"5")])
                return
            except Refusal as r:
                event(self.log, "soap.reply_unusable", logging.WARNING, envelope_id=env.id, operation=op.name,
                      reason=r.message)
                await self._fault(send, version, SERVER, "the service's answer could not be turned into "
                                  f"{op.output.local}", envelope_id=env.id, headers=ids)
                return
            await respond(send, 200, soapenv.to_bytes(soapenv.envelope(version, payload)),
                          soapenv.CONTENT_TYPE[version], ids)
            return
        if outcome.acknowledge:
            # Taken (delivered or stored) with nothing to answer: a one-way acknowledgement.
            await respond(send, 202, b"", soapenv.CONTENT_TYPE[version], ids)
            return
        failure = describe(outcome)
        event(self.log, "soap.failed", logging.INFO, envelope_id=env.id, operation=op.name,
              status=outcome.status.value, code=outcome.code, reason=outcome.reason)
        if await self._pass_fault(send, version, outcome, failure.retry_after, ids):
            return
        upstream = failure.upstream
        extra: dict[str, Any] = {"envelope_id": env.id, "retryable": "false" if failure.client else "true"}
        if upstream.get("faultcode"):
            extra["faultcode"] = upstream["faultcode"]
        if upstream.get("status"):
            extra["status"] = upstream["status"]
        detail = soapenv.gw_detail(**extra)
        if isinstance(upstream.get("detail"), dict):
            detail.extend(_plain_detail(upstream["detail"]))
        errors = upstream.get("errors")
        if isinstance(errors, list):
            detail[0].extend(soapenv.gw_detail(error=[e.get("message", "") if isinstance(e, dict) else str(e)
                                                      for e in errors[:20]])[0])
        headers = list(ids)
        if failure.retry_after:
            headers.append((b"retry-after", str(failure.retry_after).encode()))
        kind = CLIENT if failure.client else SERVER
        body = soapenv.to_bytes(soapenv.envelope(version, soapenv.fault(version, kind, failure.message, detail)))
        await respond(send, soapenv.fault_status(version, kind), body, soapenv.CONTENT_TYPE[version], headers)

    async def _pass_fault(self, send: Send, version: str, outcome: Outcome, retry_after: int | None,
                          ids: list[tuple[bytes, bytes]]) -> bool:
        """A SOAP service's fault, answered as the service wrote it: faultcode/Code, faultstring/
        Reason and the detail elements in their own namespaces (a client's generated fault class
        matches on them). False when the failure carries no such fault."""
        carried = (outcome.detail or {}).get(soapenv.CARRIED_FAULT)
        if carried is None:
            return False
        try:
            found = soapenv.carried_fault(carried, version, _parse_carried)
        except (safexml.XmlRejected, soapenv.NotSoap, ValueError):
            return False
        if found is None:
            return False
        f, kind = found
        headers = list(ids)
        if retry_after and kind == SERVER:
            headers.append((b"retry-after", str(retry_after).encode()))
        body = soapenv.to_bytes(soapenv.envelope(version, f))
        await respond(send, soapenv.fault_status(version, kind), body, soapenv.CONTENT_TYPE[version], headers)
        return True

    def _reply_payload(self, op: Operation, reply: Reply) -> Any:
        assert op.output is not None
        if is_xml_type(reply.content_type):
            try:
                root = safexml.parse(reply.body, max_bytes=_MAX_ROUTE_REPLY, max_depth=safexml.LIBXML_MAX_DEPTH)
                if etree_local(root.tag) == "Envelope":
                    root = soapenv.split(root).payload
            except (safexml.XmlRejected, soapenv.NotSoap) as exc:
                raise Refusal(SERVER, f"the reply is not usable XML: {exc}") from None
            if root is None or root.tag != op.output.tag:
                raise Refusal(SERVER, f"the XML reply is not a {op.output.local} element")
            payload = root
        elif is_json_type(reply.content_type):
            try:
                value = model.loads(reply.body)
            except MappingError as exc:
                raise Refusal(SERVER, str(exc)) from None
            if not isinstance(value, dict):
                raise Refusal(SERVER, "the JSON reply is not an object")
            opts = RenderOptions(lenient=True, parse_any=safexml.parse_fragment)
            try:
                payload = model.json_to_xml(value, op.output, opts)
            except MappingError as exc:
                raise Refusal(SERVER, f"the JSON reply does not fit {op.output.local}: {exc}") from None
            if opts.ignored:
                event(self.log, "soap.reply_fields_ignored", logging.INFO, operation=op.name,
                      fields=",".join(opts.ignored[:10]))
        else:
            raise Refusal(SERVER, f"a {media_type(reply.content_type)} reply cannot become {op.output.local}")
        errors = self.contract.validate(payload)
        if errors:
            raise Refusal(SERVER, f"the reply does not fit {op.output.local}: {errors[0]}")
        return payload

    async def _fault(self, send: Send, version: str, kind: str, message: str, *, status: int | None = None,
                     subcode: str | None = None, errors: list[str] | None = None, envelope_id: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
        detail = soapenv.gw_detail(envelope_id=envelope_id, error=errors[:20] if errors else None)
        if len(detail[0]) == 0:
            detail = []
        if subcode in ("VersionMismatch", "MustUnderstand"):
            f = soapenv.fault(version, kind, message, detail, code=subcode)
        else:
            f = soapenv.fault(version, kind, message, detail, subcode=subcode)
        body = soapenv.to_bytes(soapenv.envelope(version, f))
        await respond(send, status or soapenv.fault_status(version, kind), body, soapenv.CONTENT_TYPE[version],
                      headers)


def _parse_carried(text: str) -> Any:
    return safexml.parse(text.encode("utf-8"), max_bytes=soapenv.MAX_CARRIED_FAULT * 4,
                         max_depth=safexml.LIBXML_MAX_DEPTH)


def etree_local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _check_headers(parsed: soapenv.Parsed) -> None:
    """SOAP: a header block marked mustUnderstand that we do not process must fail the call."""
    if parsed.header is None:
        return
    attr = f"{{{soapenv.NS[parsed.version]}}}mustUnderstand"
    for block in parsed.header:
        if isinstance(block.tag, str) and block.get(attr) in ("1", "true"):
            raise Refusal(CLIENT, f"header {etree_local(block.tag)} must be understood and is not",
                          fault_code="MustUnderstand")


def _soap_action(headers: dict[str, str], version: str) -> str:
    if version == "1.1":
        return headers.get("soapaction", "").strip().strip('"')
    for part in headers.get("content-type", "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "action":
            return value.strip().strip('"')
    return ""


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


def _plain_detail(detail: dict[str, Any]) -> list[Any]:
    """The upstream's fault detail (already JSON) as ``gw:upstream`` XML for the caller."""
    from lxml import etree

    holder = etree.Element(f"{{{soapenv.GW_NS}}}upstream", nsmap={"gw": soapenv.GW_NS})

    def put(parent: Any, key: str, value: Any) -> None:
        if isinstance(value, list):
            for item in value:
                put(parent, key, item)
            return
        child = etree.SubElement(parent, f"{{{soapenv.GW_NS}}}{_safe_name(key)}")
        if isinstance(value, dict):
            for k, v in value.items():
                put(child, k, v)
        elif value is not None:
            child.text = str(value)

    for k, v in detail.items():
        put(holder, k, v)
    return [holder]


def _safe_name(key: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in key) or "item"
    return name if name[0].isalpha() or name[0] == "_" else f"_{name}"
