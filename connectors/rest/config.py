"""The REST connector's configuration: the connector's options and a route target's.

Inbound options (``listen``, ``prefix``, ``endpoints``, ``auth``, ``max_body``, ``read_timeout``)
and outbound ones (``base_url``, ``timeout``, ``max_connections``, ``outbound_auth``,
``verify_tls``, ``ca_file``) share one model: a connector may do both. What they mean is in
:mod:`connectors.rest`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, field_validator

from gateway.sdk import (
    ByteSize,
    ConnectorConfig,
    Duration,
    Secret,
    Strict,
    SubstitutionCheck,
    TargetOptions,
)

__all__ = ["Endpoint", "InboundAuth", "OutboundAuth", "RestConfig", "RestTarget"]

_HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


class Endpoint(Strict):
    path: str = "/**"
    methods: list[str] = Field(default_factory=lambda: ["POST"])
    #: Media types accepted (``application/json``, ``text/*``); omitted: any. Others get 415.
    content_types: list[str] | None = None

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        up = [m.upper() for m in v]
        bad = [m for m in up if m not in _HTTP_METHODS]
        if bad:
            raise ValueError(f"unsupported method(s) {bad}; use {sorted(_HTTP_METHODS)}")
        return up


class InboundAuth(Strict):
    #: ``none`` must be chosen explicitly; the default config listens on loopback only.
    type: Literal["none", "bearer", "api_key"]
    tokens: list[Secret] = Field(default_factory=list)
    header: str = "x-api-key"


class OutboundAuth(Strict):
    type: Literal["bearer", "basic"]
    token: Secret | None = None
    username: str | None = None
    password: Secret | None = None


class RestConfig(ConnectorConfig):
    type: Literal["rest"] = "rest"
    # inbound
    listen: str | None = None
    prefix: str = "/"
    endpoints: list[Endpoint] = Field(default_factory=lambda: [Endpoint()])
    auth: InboundAuth | None = None
    max_body: ByteSize = 1024 * 1024
    read_timeout: Duration = 10.0
    # outbound
    base_url: str | None = None
    timeout: Duration = 10.0
    max_connections: int = 100
    outbound_auth: OutboundAuth | None = None
    verify_tls: bool = True
    ca_file: str | None = None

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("base_url must be an absolute http:// or https:// URL")
        return v.rstrip("/")

    def model_post_init(self, _: Any) -> None:
        if self.listen is not None and self.auth is None:
            raise ValueError("an inbound REST connector needs 'auth' (type: bearer, api_key, or an explicit none)")
        if self.auth and self.auth.type in ("bearer", "api_key"):
            if not self.auth.tokens:
                raise ValueError("auth needs at least one token (tokens: [\"${API_TOKEN}\"])")
            if any(len(t.get_secret_value().strip()) < 8 for t in self.auth.tokens):
                raise ValueError("an auth token is empty or shorter than 8 characters (is its variable set?)")


class RestTarget(TargetOptions):
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    #: Appended to base_url; may be templated. Values are percent-encoded per segment.
    path: str = "/"
    query: dict[str, str] = Field(default_factory=dict)
    headers: dict[str, str] = Field(default_factory=dict)

    # A value from a message is one path segment, never a new segment, query or host. Query
    # values are percent-encoded when the URL is built; a route's ``headers`` are the core's
    # (checked for CR, LF and NUL as rendered).
    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        "path": SubstitutionCheck(each=lambda v: quote(str(v), safe="")),
    }
