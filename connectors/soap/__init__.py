"""soap — SOAP 1.1/1.2 out (call an operation) and in (serve a WSDL), plus a REST façade per WSDL.

Features
  One connector per WSDL (``wsdl:`` a local file or a configured http(s) URL — never a URL from a
  message; imports only from the same directory / origin; zeep with ``strict``, ``forbid_dtd``,
  no huge trees). document/literal operations (wrapped or bare, one part); other operations are
  unsupported, and a WSDL with none left is refused at load naming the feature, binding and
  operation. JSON ⇄ XML is typed by the XSD in both directions (see
  :mod:`connectors.soap.model`): numbers stay numbers, repeated elements are always lists,
  ``xsi:nil`` is ``null``, decimals are exact.

Outbound (``to: [{connector: legacy, operation: "{{ subject }}", reply: true}]``)
  The envelope's JSON body (or the route's ``input:`` mapping) becomes the operation's input
  element, validated against the XSD before anything is sent; WS-Security UsernameToken (digest
  or text) and HTTP basic auth from secrets; TLS with ``ca_file``. The reply is a JSON reply
  (or the output element as XML with ``reply_as: xml``). Failures: Client/Sender faults and
  input errors are permanent (code 422, detail = faultcode, faultstring, typed detail); Server
  faults, HTTP 408/429/5xx and connection errors are transient (502/503); timeouts 504.
  Delivery guarantee: delivered when the service answered 2xx with a non-fault envelope.

Inbound ``serve: {listen, prefix, auth}``
  The WSDL's service on the shared data-plane listener: ``GET <prefix>?wsdl`` (addresses
  rewritten to the gateway), ``POST <prefix>`` for SOAP 1.1 and 1.2. Address form: the
  envelope subject is the operation name; body = the request element's content as typed JSON
  (``application/json``); attributes ``soap_version``, ``soap_action``, ``operation``,
  ``service``, ``port``, ``http_method``, ``peer``, ``traceparent``/``tracestate`` (the HTTP
  headers, when valid); ``x-*``/``ce-*`` HTTP headers become envelope headers; answers carry a
  ``traceparent`` header, calls the gateway makes send the attempt's.
  Answers: a reply → the output element (200); accepted without a reply →
  202 with an empty body; RETRY → Server/Receiver fault (+ ``Retry-After``); REJECTED → Client/
  Sender fault for codes < 500, Server fault otherwise; bad input (auth, size, DTD/XXE, depth,
  not SOAP, unknown operation, XSD errors) → Client fault (401/403/413/415/408 where HTTP has a
  better status). Faults carry ``gw:error`` detail (envelope id, retryable) and never internals.

Inbound ``rest_facade: {listen, prefix, auth}``
  ``POST <prefix>/<Operation>`` with JSON, checked like a SOAP request; envelope as above with
  protocol ``rest`` and attribute ``interface: rest_facade``. ``GET <prefix>/openapi.json``
  (request and response JSON Schemas derived from the XSD) and ``GET <prefix>/docs`` (Swagger
  UI, served locally). Answers: the reply (200), 202, or problem+json (4xx with ``errors`` or
  ``fault``; 502/503/504 with ``Retry-After``).
"""

from connectors.soap.connector import SoapConnector

__all__ = ["SoapConnector"]
