"""The maildir connector's configuration: its options and a route target's (see :mod:`connectors.maildir`)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from connectors.mail_common import MailOptions, parse_addresses
from connectors.mailauth import SealOptions, SealSettings
from gateway.sdk import ConnectorConfig

__all__ = ["MaildirConfig", "MaildirTarget"]


class MaildirConfig(ConnectorConfig, SealSettings):
    type: Literal["maildir"] = "maildir"
    #: The Maildir root (with ``cur/``, ``new/``, ``tmp/``); created when missing.
    path: str
    #: From of built messages when the target sets no ``sender``.
    sender: str = "gateway@localhost"
    fsync: bool = True

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        if len(parse_addresses("sender", v)) != 1:
            raise ValueError("sender must be exactly one address")
        return v


class MaildirTarget(MailOptions):
    #: Maildir++ subfolder (``Alerts`` or ``Alerts.Boiler``); omitted: the inbox.
    folder: str | None = None
    #: This route's sealing over the connector's smime/pgp settings.
    seal: SealOptions | None = None

