"""The XMPP stream underneath the connector: a hardened slixmpp client and the inbound ack window.

Hardening (as for SOAP): the stream is parsed by defusedxml's expat parser with DTDs, entity
declarations and external references forbidden (RFC 6120 §11.1 forbids them in XMPP too); a
stanza larger than ``max_stanza`` bytes or nested deeper than ``MAX_DEPTH`` ends the stream
with a stream error instead of growing memory. Parse failures are reported without echoing the
received bytes (slixmpp's default logs them at ERROR, which could put message text in logs).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, cast

from defusedxml.common import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser
from slixmpp import ClientXMPP
from slixmpp.stanza.stream_error import StreamError

MAX_SEQ = 2**32
#: Deepest element nesting accepted inside a stanza (stream + stanza + payload levels).
MAX_DEPTH = 64


class AckWindow:
    """XEP-0198 ``h`` for incoming stanzas, counting only stanzas the gateway has settled.

    A message handed to the router is *held* until its outcome is answered; ``handled`` is the
    number of stanzas up to (not including) the first one still held. The server keeps every
    stanza we have not acknowledged and, if our session ends, stores unacknowledged chat
    messages offline (Prosody's mod_smacks) — so a message whose outcome never came is
    offered again after a restart instead of being lost.
    """

    def __init__(self) -> None:
        self.received = 0
        self._held: set[int] = set()

    def receive(self, *, hold: bool) -> int:
        self.received += 1
        if hold:
            self._held.add(self.received)
        return self.received

    def settle(self, seq: int) -> None:
        self._held.discard(seq)

    @property
    def handled(self) -> int:
        done = min(self._held) - 1 if self._held else self.received
        return done % MAX_SEQ


class HardenedClient(ClientXMPP):
    """A slixmpp client whose stream parser refuses hostile XML and bounds memory.

    ``on_refused(condition, text)`` is called before the stream is closed with that error.
    """

    def __init__(self, jid: str, password: str, *, max_stanza: int,
                 on_refused: Callable[[str, str], None]) -> None:
        super().__init__(jid, password)
        self.max_stanza = max_stanza
        self._on_refused = on_refused
        self._unparsed = 0

    def init_parser(self) -> None:
        self.xml_depth = 0
        self.xml_root = None
        self._unparsed = 0
        parser = DefusedXMLParser(target=ET.TreeBuilder(), forbid_dtd=True, forbid_entities=True,
                                  forbid_external=True)
        self.parser = ET.XMLPullParser(("start", "end"), _parser=parser)

    def data_received(self, data: bytes | str) -> None:
        if self.parser is None:
            return
        self._unparsed += len(data)
        if self._unparsed > self.max_stanza:
            self._refuse("policy-violation", f"stanza larger than {self.max_stanza} bytes")
            return
        try:
            self.parser.feed(data)
            for item in self.parser.read_events():
                kind, xml = cast(tuple[str, ET.Element], item)
                if kind == "start":
                    if self.xml_depth == 0:
                        self.xml_root = xml
                        self.start_stream_handler(xml)  # type: ignore[no-untyped-call]
                    self.xml_depth += 1
                    if self.xml_depth > MAX_DEPTH:
                        self._refuse("policy-violation", f"XML nested deeper than {MAX_DEPTH} levels")
                        return
                    continue
                self.xml_depth -= 1
                if self.xml_depth == 0:
                    self.disconnect_reason = "End of stream"
                    self.abort()
                    return
                if self.xml_depth == 1:
                    self._unparsed = 0
                    self._spawn_event(xml)
                    if self.xml_root is not None:
                        self.xml_root.clear()  # keep the stream root empty: memory stays bounded
                    if self.parser is None:  # a handler closed the stream
                        return
        except DefusedXmlException as exc:
            self._refuse("restricted-xml", f"forbidden XML construct ({type(exc).__name__})")
        except ET.ParseError as exc:
            self._refuse("not-well-formed", f"not well-formed XML ({exc})")

    def _refuse(self, condition: str, text: str) -> None:
        self._on_refused(condition, text)
        self.parser = None
        transport: Any = self.transport
        if transport is None:
            return
        error = StreamError()
        error["condition"] = condition
        error["text"] = text
        try:
            transport.write(str(error).encode("utf-8") + b"</stream:stream>")
        finally:
            transport.close()  # flushes what was written, then connection_lost fires
