"""SOAP 1.1 and 1.2 envelopes and faults: build and take apart. Pure, no IO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lxml import etree

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
NS = {"1.1": SOAP11, "1.2": SOAP12}
VERSION_OF = {SOAP11: "1.1", SOAP12: "1.2"}
CONTENT_TYPE = {"1.1": "text/xml; charset=utf-8", "1.2": "application/soap+xml; charset=utf-8"}
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

#: Fault code classes: the sender's fault (do not retry) or the receiver's (may succeed later).
CLIENT, SERVER = "client", "server"
_CODE_NAMES = {("1.1", CLIENT): "Client", ("1.1", SERVER): "Server", ("1.2", CLIENT): "Sender",
               ("1.2", SERVER): "Receiver"}
_PERMANENT_CODES = {"Client", "Sender", "VersionMismatch", "MustUnderstand", "DataEncodingUnknown"}


class NotSoap(ValueError):
    """The document is not a SOAP envelope we can take apart."""


@dataclass
class Parsed:
    version: str
    header: Any | None
    payload: Any | None  # the first element in Body (the operation's element, or a Fault)
    extra: int = 0  # further elements in Body (doc/literal wrapped allows one)


def split(root: Any) -> Parsed:
    """Version, header and payload of a SOAP envelope element."""
    qname = etree.QName(root)
    version = VERSION_OF.get(qname.namespace or "")
    if qname.localname != "Envelope" or version is None:
        raise NotSoap(f"the document is not a SOAP envelope (root {qname.localname!r} in "
                      f"{qname.namespace or 'no namespace'})")
    ns = NS[version]
    header = root.find(f"{{{ns}}}Header")
    body = root.find(f"{{{ns}}}Body")
    if body is None:
        raise NotSoap("the SOAP envelope has no Body")
    children = [c for c in body if isinstance(c.tag, str)]
    return Parsed(version, header, children[0] if children else None, max(0, len(children) - 1))


def envelope(version: str, payload: Any | None, header_items: list[Any] | None = None) -> Any:
    ns = NS[version]
    env = etree.Element(f"{{{ns}}}Envelope", nsmap={"soap": ns})
    if header_items:
        header = etree.SubElement(env, f"{{{ns}}}Header")
        header.extend(header_items)
    body = etree.SubElement(env, f"{{{ns}}}Body")
    if payload is not None:
        body.append(payload)
    return env


def to_bytes(elem: Any) -> bytes:
    return bytes(etree.tostring(elem, xml_declaration=True, encoding="utf-8"))


def is_fault(version: str, payload: Any) -> bool:
    return payload is not None and payload.tag == f"{{{NS[version]}}}Fault"


def fault(version: str, kind: str, message: str, detail: list[Any] | None = None, *,
          subcode: str | None = None, code: str | None = None) -> Any:
    """A Fault element: ``kind`` is :data:`CLIENT` or :data:`SERVER` (``code`` overrides it with
    ``VersionMismatch`` or ``MustUnderstand``); ``detail`` elements go in ``detail``/``Detail``.
    The message must already be safe to show (no internals)."""
    ns = NS[version]
    f = etree.Element(f"{{{ns}}}Fault", nsmap={"soap": ns})
    code = code or _CODE_NAMES[(version, kind)]
    if version == "1.1":
        etree.SubElement(f, "faultcode").text = f"soap:{code}" + (f".{subcode}" if subcode else "")
        etree.SubElement(f, "faultstring").text = message
        if detail:
            etree.SubElement(f, "detail").extend(detail)
    else:
        c = etree.SubElement(f, f"{{{ns}}}Code")
        etree.SubElement(c, f"{{{ns}}}Value").text = f"soap:{code}"
        if subcode:
            sub = etree.SubElement(c, f"{{{ns}}}Subcode")
            etree.SubElement(sub, f"{{{ns}}}Value", nsmap={"gw": GW_NS}).text = f"gw:{subcode}"
        r = etree.SubElement(f, f"{{{ns}}}Reason")
        t = etree.SubElement(r, f"{{{ns}}}Text")
        t.set(XML_LANG, "en")
        t.text = message
        if detail:
            etree.SubElement(f, f"{{{ns}}}Detail").extend(detail)
    return f


def fault_status(version: str, kind: str) -> int:
    """HTTP status of a fault response (WS-I BP: 500 for SOAP 1.1; SOAP 1.2 HTTP binding: 400
    for a Sender fault, 500 for a Receiver fault)."""
    if version == "1.2" and kind == CLIENT:
        return 400
    return 500


#: Namespace of the detail elements the gateway itself adds to faults.
GW_NS = "urn:gateway:soap"


def gw_detail(**fields: Any) -> list[Any]:
    """``<gw:error><gw:key>value</gw:key>…</gw:error>``: the gateway's own fault detail."""
    holder = etree.Element(f"{{{GW_NS}}}error", nsmap={"gw": GW_NS})
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, list):
            for item in value:
                _gw_child(holder, key, item)
        else:
            _gw_child(holder, key, value)
    return [holder]


def _gw_child(parent: Any, key: str, value: Any) -> None:
    child = etree.SubElement(parent, f"{{{GW_NS}}}{key}")
    if isinstance(value, dict):
        for k, v in value.items():
            etree.SubElement(child, f"{{{GW_NS}}}{k}").text = str(v)
    else:
        child.text = str(value)


@dataclass
class FaultInfo:
    """A fault taken apart: ``code`` is the local code (``Client``, ``Server.Busy``, ``Sender``…)."""

    code: str
    string: str
    detail: list[Any] = field(default_factory=list)
    subcodes: list[str] = field(default_factory=list)
    actor: str | None = None

    @property
    def permanent(self) -> bool:
        """A sender's fault: retrying the same message cannot help."""
        return self.code.split(".", 1)[0] in _PERMANENT_CODES


def _local_code(text: str | None) -> str:
    text = (text or "").strip()
    return text.rpartition(":")[2] or "Server"


def read_fault(version: str, f: Any) -> FaultInfo:
    if version == "1.1":
        detail = f.find("detail")
        if detail is None:  # some stacks qualify the children
            detail = f.find(f"{{{SOAP11}}}detail")
        return FaultInfo(
            code=_local_code(f.findtext("faultcode") or f.findtext(f"{{{SOAP11}}}faultcode")),
            string=(f.findtext("faultstring") or f.findtext(f"{{{SOAP11}}}faultstring") or "").strip(),
            detail=[c for c in detail if isinstance(c.tag, str)] if detail is not None else [],
            actor=f.findtext("faultactor"),
        )
    ns = SOAP12
    subcodes = [_local_code(v.text) for v in f.iterfind(f"{{{ns}}}Code/{{{ns}}}Subcode//{{{ns}}}Value")]
    texts = f.findall(f"{{{ns}}}Reason/{{{ns}}}Text")
    english = next((t for t in texts if (t.get(XML_LANG) or "").startswith("en")), texts[0] if texts else None)
    detail = f.find(f"{{{ns}}}Detail")
    return FaultInfo(
        code=_local_code(f.findtext(f"{{{ns}}}Code/{{{ns}}}Value")),
        string=(english.text or "").strip() if english is not None else "",
        detail=[c for c in detail if isinstance(c.tag, str)] if detail is not None else [],
        subcodes=subcodes,
        actor=f.findtext(f"{{{ns}}}Role"),
    )


#: Key of :func:`carry_fault`'s record in a failure's detail.
CARRIED_FAULT = "soap_fault"
#: A fault larger than this is not carried whole (the caller gets the gateway's own fault).
MAX_CARRIED_FAULT = 64 * 1024


def carry_fault(version: str, f: Any) -> dict[str, str] | None:
    """A service's Fault element as text, to be answered unchanged to a SOAP caller of the
    gateway (:func:`carried_fault`); None when it is too large to carry."""
    text = etree.tostring(f, encoding="unicode")
    if len(text) > MAX_CARRIED_FAULT:
        return None
    return {"version": version, "xml": text}


_OTHER_VERSION_CODE = {"Client": "Sender", "Server": "Receiver", "Sender": "Client", "Receiver": "Server",
                       "VersionMismatch": "VersionMismatch", "MustUnderstand": "MustUnderstand"}


def carried_fault(carried: Any, version: str, parse: Any) -> tuple[Any, str] | None:
    """The carried Fault for a caller speaking ``version`` and its kind (CLIENT or SERVER): the same
    element when the versions match; otherwise the code mapped (Client ⇄ Sender, Server ⇄
    Receiver), the text and the detail's elements kept. ``parse`` is the hardened XML parser."""
    if not isinstance(carried, dict) or carried.get("version") not in NS or not isinstance(carried.get("xml"), str):
        return None
    f = parse(carried["xml"])
    info = read_fault(carried["version"], f)
    kind = CLIENT if info.permanent else SERVER
    if carried["version"] == version:
        return f, kind
    code = _OTHER_VERSION_CODE.get(info.code.split(".", 1)[0])
    return fault(version, kind, info.string, info.detail, code=code), kind
