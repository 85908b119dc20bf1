"""The soap connector's config (routes.yaml ``connectors:``) and target options (``to:``)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.sdk import ByteSize, ConnectorConfig, Duration, Secret, Strict, TargetOptions


class Credential(Strict):
    username: str
    password: Secret


class InboundAuth(Strict):
    """Who may call the SOAP service or the REST façade. ``none`` must be chosen explicitly."""

    type: Literal["none", "basic", "bearer"]
    #: ``basic``: accepted username/password pairs (passwords by reference).
    users: list[Credential] = Field(default_factory=list)
    #: ``bearer``: accepted tokens (by reference).
    tokens: list[Secret] = Field(default_factory=list)

    @model_validator(mode="after")
    def _complete(self) -> InboundAuth:
        if self.type == "basic" and not self.users:
            raise ValueError("auth type basic needs users: [{username: ..., password: \"${PASSWORD}\"}]")
        if self.type == "bearer" and not self.tokens:
            raise ValueError("auth type bearer needs tokens: [\"${API_TOKEN}\"]")
        return self


class Listener(Strict):
    """An HTTP face of the connector on the shared data-plane listener."""

    listen: str
    prefix: str
    auth: InboundAuth
    max_body: ByteSize = 1024 * 1024
    #: Deepest XML nesting accepted (checked before parsing).
    max_depth: int = Field(default=64, ge=8, le=256)
    #: The request body must have arrived within this time (slow clients are cut off).
    read_timeout: Duration = 10.0
    #: The URL clients use (put into ``?wsdl`` and the OpenAPI ``servers``); by default it is
    #: built from the request's Host header.
    public_url: str | None = None

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = "/" + v.strip("/")
        if v == "/":
            raise ValueError("give the SOAP connector its own prefix, e.g. /soap/orders")
        return v


class WsSecurity(Strict):
    """WS-Security UsernameToken sent with every outbound call."""

    username: str
    password: Secret
    #: PasswordDigest (nonce + created + SHA-1) instead of PasswordText.
    digest: bool = True


class SoapConfig(ConnectorConfig):
    type: Literal["soap"] = "soap"
    #: A local file, or an http(s) URL fixed here (never taken from a message).
    wsdl: str
    service: str | None = None
    #: The port to call (outbound); default: the service's first SOAP port.
    port: str | None = None
    # --- outbound
    #: Where to send calls; default: the port's address in the WSDL.
    endpoint: str | None = None
    timeout: Duration = 30.0
    max_reply: ByteSize = 16 * 1024 * 1024
    max_connections: int = Field(default=100, ge=1)
    verify_tls: bool = True
    ca_file: str | None = None
    http_auth: Credential | None = None
    wsse: WsSecurity | None = None
    # --- inbound
    #: Serve the WSDL's service (SOAP 1.1 and 1.2 ports) at ``listen`` + ``prefix``.
    serve: Listener | None = None
    #: A JSON endpoint per operation, described by an OpenAPI document derived from the WSDL.
    rest_facade: Listener | None = None

    @field_validator("wsdl")
    @classmethod
    def _wsdl(cls, v: str) -> str:
        from connectors.soap.wsdl import is_url

        if is_url(v):
            return v
        if "://" in v and not v.startswith("file://"):
            raise ValueError("wsdl is a local file or an http(s):// URL")
        path = v.removeprefix("file://")
        if not os.path.isfile(path):
            raise ValueError(f"WSDL file {path!r} does not exist")
        return path

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from connectors.soap.wsdl import is_url

        if v is not None and not is_url(v):
            raise ValueError("endpoint must be an absolute http:// or https:// URL")
        return v

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"CA file {v!r} does not exist")
        return v

    def model_post_init(self, _: Any) -> None:
        from connectors.soap.wsdl import WsdlError, is_url, load

        if self.serve and self.rest_facade and self.serve.listen == self.rest_facade.listen \
                and self.serve.prefix == self.rest_facade.prefix:
            raise ValueError("serve and rest_facade need different prefixes")
        if not is_url(self.wsdl):
            # A local WSDL is checked completely now, so `gateway validate` catches its errors.
            try:
                load(self.wsdl, service=self.service, port=self.port)
            except WsdlError as exc:
                raise ValueError(str(exc)) from None


class SoapTarget(TargetOptions):
    #: The operation to call (templated, e.g. ``"{{ subject }}"``); must exist in the port.
    operation: str
    #: The operation's input. Omitted: the message's JSON body is the input element's content.
    #: A mapping (its strings are templates; a string may render a lexical value such as "42",
    #: or JSON for a list or an object with ``| tojson``), or one template rendering JSON.
    input: dict[str, Any] | str | None = None
    #: The reply's form: JSON (typed by the XSD) or the output element as XML.
    reply_as: Literal["json", "xml"] = "json"
