"""The POP3 connector's configuration (inbound only: there are no route-target options).

What the options do is described in :mod:`connectors.pop3`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from connectors.mailauth import AuthCheckSettings
from gateway.sdk import ByteSize, ConnectorConfig, Duration, Secret

__all__ = ["Pop3Config"]


class Pop3Config(ConnectorConfig, AuthCheckSettings):
    type: Literal["pop3"] = "pop3"
    host: str
    #: Default: 995 for ``implicit`` TLS, 110 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    ca_file: str | None = None
    username: str
    password: Secret
    #: The mailbox's address: subject and ``rcpt`` of the envelopes. Default: ``username``.
    address: str | None = None
    #: Keep messages on the server after they were taken (tracked by UIDL only).
    leave_on_server: bool = False
    #: On the very first start, also take up to this many of the newest messages already there.
    backfill: int = Field(default=0, ge=0, le=100_000)
    poll_interval: Duration = 60.0
    max_size: ByteSize = 25 * 1024 * 1024
    #: Messages taken per session.
    batch: int = Field(default=100, ge=1, le=10_000)
    connect_timeout: Duration = 10.0
    #: Socket timeout for each command once logged in.
    command_timeout: Duration = 60.0

    @field_validator("username", "host")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v or not v.isprintable() or " " in v:
            raise ValueError("must be printable, without spaces")
        return v

    @property
    def effective_port(self) -> int:
        return self.port or (995 if self.tls == "implicit" else 110)

    @property
    def mailbox_address(self) -> str:
        return (self.address or self.username).lower()
