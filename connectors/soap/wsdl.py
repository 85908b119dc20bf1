"""Loading a WSDL safely, and the contract the connector works from.

A WSDL is read only from the place the config names: a local file (its imports must stay inside
that file's directory) or a configured ``http(s)://`` URL (its imports must stay on the same
origin). zeep parses it with ``Settings(strict=True, forbid_dtd=True, xml_huge_tree=False)``
through a transport that enforces that policy, and the same bytes feed the XSD validator
(``lxml.etree.XMLSchema``) and the documents the SOAP inbound serves at ``?wsdl``/``?xsd=N``.
"""

from __future__ import annotations

import copy
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from lxml import etree

from connectors.soap.model import Facets, Field, ModelBuilder, facets_from_schemas, json_path
from connectors.soap.safexml import XmlRejected, parse

WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
XS_NS = "http://www.w3.org/2001/XMLSchema"
SOAP11_BINDING = "http://schemas.xmlsoap.org/wsdl/soap/"
SOAP12_BINDING = "http://schemas.xmlsoap.org/wsdl/soap12/"
_REFERENCES = ((f"{{{XS_NS}}}import", "schemaLocation"), (f"{{{XS_NS}}}include", "schemaLocation"),
               (f"{{{XS_NS}}}redefine", "schemaLocation"), (f"{{{WSDL_NS}}}import", "location"))


class WsdlError(ValueError):
    """The WSDL cannot be used (unreadable, outside the allowed places, unsupported)."""


def is_url(location: str) -> bool:
    return urlsplit(location).scheme in ("http", "https")


def absolute(location: str, base: str) -> str:
    """``location`` as referenced from the document at ``base`` (a path or an http(s) URL)."""
    if is_url(location):
        return location
    if location.startswith("file://"):
        return os.path.realpath(location[7:])
    if is_url(base):
        return urljoin(base, location)
    if os.path.isabs(location):
        return os.path.realpath(location)
    return os.path.realpath(os.path.join(os.path.dirname(base), location))


class DocumentStore:
    """Every document the WSDL needs, loaded once and only from allowed places."""

    def __init__(self, location: str, *, fetch: Callable[[str], bytes] | None = None,
                 max_bytes: int = 5 * 1024 * 1024, max_documents: int = 50):
        self.root = location if is_url(location) else os.path.realpath(location)
        self._fetch = fetch
        self._max_bytes = max_bytes
        self._max_documents = max_documents
        self.docs: dict[str, bytes] = {}
        if is_url(self.root):
            parts = urlsplit(self.root)
            self._origin: str = f"{parts.scheme}://{parts.netloc}"
        else:
            self._origin = os.path.dirname(self.root)

    def allowed(self, location: str) -> bool:
        if is_url(self.root):
            parts = urlsplit(location)
            return f"{parts.scheme}://{parts.netloc}" == self._origin
        if is_url(location):
            return False
        real = os.path.realpath(location)
        return real == self.root or real.startswith(self._origin + os.sep)

    def load(self, location: str) -> bytes:
        location = location if is_url(location) else os.path.realpath(location.removeprefix("file://"))
        known = self.docs.get(location)
        if known is not None:
            return known
        if not self.allowed(location):
            raise WsdlError(f"{location} is outside the WSDL's {'origin' if is_url(self.root) else 'directory'} "
                            f"({self._origin}); the gateway loads WSDL parts only from there")
        if len(self.docs) >= self._max_documents:
            raise WsdlError(f"the WSDL needs more than {self._max_documents} documents")
        if is_url(location):
            if self._fetch is None:
                raise WsdlError(f"cannot fetch {location}: no HTTP client configured")
            data = self._fetch(location)
        else:
            try:
                with open(location, "rb") as fh:
                    data = fh.read(self._max_bytes + 1)
            except OSError as exc:
                raise WsdlError(f"cannot read {location}: {exc.strerror}") from None
        if len(data) > self._max_bytes:
            raise WsdlError(f"{location} is larger than {self._max_bytes} bytes")
        self.docs[location] = data
        return data

    def parsed(self, location: str) -> Any:
        try:
            return parse(self.load(location), max_bytes=self._max_bytes, max_depth=256)
        except XmlRejected as exc:
            raise WsdlError(f"{location}: {exc.reason}") from None


@dataclass(eq=False, repr=False)
class Operation:
    name: str
    action: str
    input: Field | None
    output: Field | None  # None: a one-way operation
    faults: list[Field] = field(default_factory=list)
    unsupported: str | None = None


@dataclass(eq=False, repr=False)
class Port:
    name: str
    version: str  # "1.1" or "1.2"
    address: str | None
    operations: dict[str, Operation]
    by_input: dict[str, list[Operation]] = field(default_factory=dict)
    by_action: dict[str, Operation] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for op in self.operations.values():
            if op.input is not None:
                self.by_input.setdefault(op.input.tag, []).append(op)
            if op.action:
                self.by_action.setdefault(op.action, op)


@dataclass(eq=False, repr=False)
class Contract:
    location: str
    service: str
    ports: list[Port]
    validator: Any  # lxml.etree.XMLSchema
    facets: dict[str, Facets]
    store: DocumentStore
    #: One validation at a time: the validator keeps its error log on itself, and XML worker
    #: threads validate beside the event loop.
    _validating: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:
        return f"Contract({self.service} from {self.location}: {[p.name for p in self.ports]})"

    def port(self, name: str | None = None) -> Port:
        if name is None:
            return self.ports[0]
        for p in self.ports:
            if p.name == name:
                return p
        raise WsdlError(f"service {self.service!r} has no SOAP port {name!r}; ports: {[p.name for p in self.ports]}")

    def port_for_version(self, version: str) -> Port | None:
        return next((p for p in self.ports if p.version == version), None)

    def validate(self, elem: Any) -> list[str]:
        """XSD errors of one element (empty when valid)."""
        with self._validating:
            if self.validator(elem):
                return []
            return [_xsd_message(e) for e in self.validator.error_log][:20]

    def validate_at(self, elem: Any, f: Field) -> list[dict[str, str]]:
        """XSD errors of ``elem`` (built for ``f``), each with the JSON path of its field."""
        with self._validating:
            if self.validator(elem):
                return []
            entries = [(e.path, _xsd_message(e)) for e in self.validator.error_log][:20]
        return [{"path": json_path(elem, f, path), "message": message} for path, message in entries]

    def documents(self, base_url: str, endpoint: str) -> list[bytes]:
        """The WSDL (index 0) and every document it imports, with references rewritten to
        ``base_url?xsd=N`` and every SOAP address to ``endpoint``."""
        index = {loc: i for i, loc in enumerate(self.store.docs)}
        out = []
        for loc in self.store.docs:
            root = copy.deepcopy(self.store.parsed(loc))
            for tag, attr in _REFERENCES:
                for ref in root.iter(tag):
                    target = ref.get(attr)
                    if target:
                        i = index.get(absolute(target, loc))
                        if i is not None:
                            ref.set(attr, f"{base_url}?xsd={i}")
            for ns in (SOAP11_BINDING, SOAP12_BINDING):
                for addr in root.iter(f"{{{ns}}}address"):
                    addr.set("location", endpoint)
            out.append(bytes(etree.tostring(root, xml_declaration=True, encoding="utf-8")))
        return out


#: A namespace in Clark notation: no quotes or spaces inside, unlike an enumeration's value set.
_CLARK = re.compile(r"\{[^{}'\s,]*\}")


def _xsd_message(err: Any) -> str:
    # libxml2 names elements in Clark notation; the local name is what a caller recognises.
    return _CLARK.sub("", str(err.message))


# --- loading ------------------------------------------------------------------------------


def load(location: str, *, service: str | None = None, port: str | None = None,
         fetch: Callable[[str], bytes] | None = None) -> Contract:
    """Load and check a WSDL (blocking: call it in a thread from async code)."""
    from zeep.exceptions import Error as ZeepError
    from zeep.exceptions import ExternalReferenceForbidden
    from zeep.settings import Settings
    from zeep.transports import Transport
    from zeep.wsdl import Document

    store = DocumentStore(location, fetch=fetch)

    class _StoreTransport(Transport):
        def load(self, url: str) -> bytes:
            return store.load(url)

    settings = Settings(strict=True, forbid_dtd=True, forbid_entities=True, xml_huge_tree=False,
                        forbid_external=not is_url(store.root))
    store.load(store.root)
    bindings = _binding_styles(store)
    _refuse_unusable(location, bindings)
    try:
        transport: Any = _StoreTransport(cache=None)  # type: ignore[no-untyped-call]
        document = Document(store.root, transport, settings=settings)
    except WsdlError:
        raise
    except ExternalReferenceForbidden as exc:
        raise WsdlError(f"{location} refers to {exc.url}, which is fetched from the network: the gateway loads "
                        "WSDL parts only from the WSDL's own directory (save a copy beside it and point "
                        "schemaLocation at the copy)") from None
    except (ZeepError, etree.LxmlError, ValueError, LookupError, AttributeError, TypeError) as exc:
        raise WsdlError(f"cannot load WSDL {location}: {type(exc).__name__}: {exc}") from None
    services = document.services
    if not services:
        raise WsdlError(f"{location} declares no wsdl:service (only messages, port types or bindings): the "
                        "gateway needs a service with a SOAP port")
    if service is None:
        svc = next(iter(services.values()))
    elif service in services:
        svc = services[service]
    else:
        raise WsdlError(f"{location} has no service {service!r}; services: {sorted(services)}")
    builder = ModelBuilder()
    ports: list[Port] = []
    for p in svc.ports.values():
        version = _binding_version(p.binding)
        if version is None:
            continue  # an HTTP binding or another transport: not ours
        binding = etree.QName(p.binding.name).localname
        ops = {name: _operation(name, op, builder, binding) for name, op in p.binding._operations.items()}
        ports.append(Port(p.name, version, (p.binding_options or {}).get("address"), ops))
    if not ports:
        others = ", ".join(f"{p.name} ({_binding_kind(p.binding)})" for p in svc.ports.values()) or "none"
        raise WsdlError(f"service {svc.name!r} in {location} has no SOAP 1.1 or 1.2 port (HTTP GET/POST and "
                        f"other bindings are not supported); its ports: {others}")
    if not any(not op.unsupported for p in ports for op in p.operations.values()):
        first = next((op for p in ports for op in p.operations.values()), None)
        reason = first.unsupported if first is not None else f"service {svc.name!r} has no operations"
        raise WsdlError(f"{location} has no operation the gateway supports: {reason}")
    if port is not None and port not in {p.name for p in ports}:
        raise WsdlError(f"service {svc.name!r} has no SOAP port {port!r}; ports: {[p.name for p in ports]}")
    if port is not None:
        ports.sort(key=lambda p: p.name != port)
    schemas = _schema_elements(store)
    return Contract(location=location, service=svc.name, ports=ports, validator=_validator(store),
                    facets=facets_from_schemas(schemas), store=store)


def _binding_version(binding: Any) -> str | None:
    from zeep.wsdl.bindings.soap import Soap11Binding, Soap12Binding

    if isinstance(binding, Soap12Binding):
        return "1.2"
    if isinstance(binding, Soap11Binding):
        return "1.1"
    return None


def _operation(name: str, op: Any, builder: ModelBuilder, binding: str) -> Operation:
    action = op.soapaction or ""
    where = f"binding {binding} operation {name}"
    if op.style != "document" or _encoded(op):
        kind = f"{op.style}/{'encoded' if _encoded(op) else 'literal'}"
        return Operation(name, action, None, None, unsupported=f"{kind} is not supported: {where} "
                                                              "(document/literal only)")
    try:
        inp = _single_part(op.input, where)
        out = _single_part(op.output, where) if op.output is not None else None
    except WsdlError as exc:
        return Operation(name, action, None, None, unsupported=str(exc))
    faults = []
    for f in (op.faults or {}).values():
        for part in f.abstract.parts.values():
            if part.element is not None:
                faults.append(builder.element(part.element))
    return Operation(name, action, builder.element(inp), builder.element(out) if out is not None else None, faults)


def _single_part(message: Any, where: str) -> Any:
    parts = [p for p in message.abstract.parts.values()]
    body_parts = [p for p in parts if p.element is not None]
    header = getattr(message, "header", None)
    if header is not None and list(getattr(header.type, "elements", []) or []):
        raise WsdlError(f"SOAP header parts (soap:header) are not supported: {where}")
    if any(p.element is None for p in parts):
        raise WsdlError(f"message parts with type= instead of element= are not supported: {where}")
    if len(body_parts) != 1:
        raise WsdlError(f"document/literal messages with {len(body_parts)} body parts are not supported "
                        f"(exactly one): {where}")
    if getattr(message, "body", None) is None:
        raise WsdlError(f"the message has no body element: {where}")
    return body_parts[0].element


def _encoded(op: Any) -> bool:
    return any(getattr(m, "body", None) is not None and getattr(m.body, "use", None) == "encoded"
               for m in (op.input, op.output) if m is not None) or any(
        (getattr(m, "_info", None) or {}).get("body", {}).get("use") == "encoded" for m in (op.input, op.output)
        if m is not None)


def _binding_kind(binding: Any) -> str:
    name = type(binding).__name__
    return {"HttpGetBinding": "HTTP GET", "HttpPostBinding": "HTTP POST"}.get(name, name)


@dataclass(frozen=True)
class _BoundOperation:
    binding: str
    operation: str
    style: str  # document, rpc
    use: str  # literal, encoded
    soap: bool  # a SOAP 1.1/1.2 binding (not HTTP or another transport)


def _binding_styles(store: DocumentStore) -> list[_BoundOperation]:
    """Style and use of every operation of every binding, read from the WSDL documents before zeep
    builds anything: zeep cannot load some rpc/encoded WSDLs at all, and the refusal must name
    the binding and operation instead of zeep's error."""
    out: list[_BoundOperation] = []
    todo, seen = [store.root], set()
    while todo:
        loc = todo.pop()
        if loc in seen:
            continue
        seen.add(loc)
        root = store.parsed(loc)
        if etree.QName(root).namespace != WSDL_NS:
            continue
        for imp in root.iterfind(f"{{{WSDL_NS}}}import"):
            target = imp.get("location")
            if target and (is_url(store.root) or not is_url(absolute(target, loc))):
                todo.append(absolute(target, loc))
        for binding in root.iterfind(f"{{{WSDL_NS}}}binding"):
            soap_binding = next((b for ns in (SOAP11_BINDING, SOAP12_BINDING)
                                 for b in binding.iterfind(f"{{{ns}}}binding")), None)
            default_style = soap_binding.get("style", "document") if soap_binding is not None else ""
            for op in binding.iterfind(f"{{{WSDL_NS}}}operation"):
                style, use = default_style, "literal"
                for ns in (SOAP11_BINDING, SOAP12_BINDING):
                    soap_op = op.find(f"{{{ns}}}operation")
                    if soap_op is not None and soap_op.get("style"):
                        style = soap_op.get("style")
                    if any(b.get("use") == "encoded" for b in op.iter(f"{{{ns}}}body", f"{{{ns}}}fault")):
                        use = "encoded"
                out.append(_BoundOperation(binding.get("name", ""), op.get("name", ""), style, use,
                                           soap_binding is not None))
    return out


def _refuse_unusable(location: str, bindings: list[_BoundOperation]) -> None:
    """A WSDL without one document/literal SOAP operation cannot be served or called: say why by
    name (zeep fails on some rpc WSDLs with errors that name neither)."""
    soap = [b for b in bindings if b.soap]
    if soap and not any(b.style == "document" and b.use == "literal" for b in soap):
        first = next((b for b in soap if b.use == "encoded"), soap[0])
        more = f" (and {len(soap) - 1} more operations)" if len(soap) > 1 else ""
        raise WsdlError(f"{location}: {first.style}/{first.use} is not supported: binding {first.binding} operation "
                        f"{first.operation}{more}; the gateway speaks document/literal")


def _schema_elements(store: DocumentStore) -> list[Any]:
    """Every xs:schema: inline in WSDL documents and the standalone ones they import."""
    out = []
    for loc in list(store.docs):
        root = store.parsed(loc)
        if etree.QName(root).namespace == WSDL_NS:
            out.extend(root.iterfind(f"{{{WSDL_NS}}}types/{{{XS_NS}}}schema"))
        elif root.tag == f"{{{XS_NS}}}schema":
            out.append(root)
    return out


def _visible(schema_text: bytes, namespaces: set[str]) -> bytes:
    """The inline schema with an ``xs:import`` (no location) of every other inline schema's
    namespace it does not import itself: the schemas of one ``wsdl:types`` see each other in
    .NET, Java and zeep, and WSDLs rely on it; libxml2 alone would refuse the references."""
    schema = etree.fromstring(schema_text)
    own = schema.get("targetNamespace") or ""
    imported = {imp.get("namespace") or "" for imp in schema.iterfind(f"{{{XS_NS}}}import")}
    missing = sorted(namespaces - imported - {own})
    if not missing:
        return schema_text
    position = sum(1 for c in schema if isinstance(c.tag, str) and etree.QName(c).localname == "annotation"
                   and c.getprevious() is None)
    for ns in missing:
        imp = etree.Element(f"{{{XS_NS}}}import", namespace=ns)
        schema.insert(position, imp)
    return bytes(etree.tostring(schema))


def _validator(store: DocumentStore) -> Any:
    """One XMLSchema over every schema of the WSDL, resolved only from the store."""
    rewritten: dict[str, bytes] = {}
    inline_keys: list[tuple[str, str]] = []

    def standalone(schema: Any, base: str) -> bytes:
        copy_ = etree.Element(schema.tag, attrib=dict(schema.attrib), nsmap=schema.nsmap)
        copy_.extend(copy.deepcopy(c) for c in schema)
        for tag, attr in _REFERENCES[:3]:
            for ref in copy_.iter(tag):
                target = ref.get(attr)
                if target:
                    loc = absolute(target, base)
                    ref.set(attr, "store:" + loc)
                    if "store:" + loc not in rewritten:
                        rewritten["store:" + loc] = b""  # placeholder against import cycles
                        rewritten["store:" + loc] = standalone(store.parsed(loc), loc)
        return bytes(etree.tostring(copy_))

    inline = [(loc, schema) for loc in list(store.docs) if etree.QName(store.parsed(loc)).namespace == WSDL_NS
              for schema in store.parsed(loc).iterfind(f"{{{WSDL_NS}}}types/{{{XS_NS}}}schema")]
    inline_namespaces = {schema.get("targetNamespace") or "" for _, schema in inline} - {""}
    for i, (loc, schema) in enumerate(inline):
        key = f"store:{loc}#types{i}"
        rewritten[key] = _visible(standalone(schema, loc), inline_namespaces)
        inline_keys.append((schema.get("targetNamespace") or "", key))
    for loc in list(store.docs):
        root = store.parsed(loc)
        if etree.QName(root).namespace == WSDL_NS:
            continue
        elif root.tag == f"{{{XS_NS}}}schema" and "store:" + loc not in rewritten:
            rewritten["store:" + loc] = standalone(root, loc)
            inline_keys.append((root.get("targetNamespace") or "", "store:" + loc))

    class _Resolver(etree.Resolver):  # type: ignore[misc]
        def resolve(self, system_url: str, public_id: str, context: Any) -> Any:
            data = rewritten.get(system_url)
            if data is None:
                raise WsdlError(f"schema reference {system_url!r} is not part of the WSDL")
            return self.resolve_string(data, context)

    wrapper = etree.Element(f"{{{XS_NS}}}schema", nsmap={"xs": XS_NS})
    for ns, key in inline_keys:
        if ns:
            etree.SubElement(wrapper, f"{{{XS_NS}}}import", schemaLocation=key, namespace=ns)
        else:
            # A schema without targetNamespace (what JAX-WS, Metro and CXF publish inline, holding
            # only imports of the real schemas) cannot be imported by a schema without one: include it.
            etree.SubElement(wrapper, f"{{{XS_NS}}}include", schemaLocation=key)
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    parser.resolvers.add(_Resolver())
    try:
        return etree.XMLSchema(etree.fromstring(etree.tostring(wrapper), parser))
    except etree.XMLSchemaParseError as exc:
        raise WsdlError(f"the WSDL's schema does not compile: {exc}") from None
