"""The ``imap`` connector's config and target options (see the card in :mod:`connectors.imap`)."""

from __future__ import annotations

import re
from datetime import date
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from connectors.mail_common import MailOptions
from connectors.mailauth import AuthCheckSettings, SealOptions, SealSettings
from gateway.sdk import ByteSize, ConnectorConfig, Duration, Secret, Strict, SubstitutionCheck

#: A flag APPEND may set: a system flag (``\\Seen``) or a keyword (``$label1``).
FLAG = re.compile(r"^\\?[A-Za-z$][A-Za-z0-9$_.-]{0,63}$")
_BAD_MAILBOX = re.compile(r"[\x00-\x1f\x7f\"\\*%]")


def check_folder(name: str) -> str:
    """A folder name we will quote into a command: no controls, quotes, backslashes or wildcards."""
    if not name or len(name) > 255 or _BAD_MAILBOX.search(name):
        raise ValueError(f"folder {name[:60]!r} is empty or contains control characters, quotes, '\\', '*' or '%'")
    return name


class Search(Strict):
    """Which messages of a folder are taken (all criteria must hold)."""

    #: Only messages without ``\\Seen``. With ``after: seen`` this is what makes handled mail
    #: distinguishable from new mail after a UIDVALIDITY change.
    unseen: bool = True
    since: date | None = None
    #: Substring of the From header (IMAP ``SEARCH FROM``).
    from_: str | None = Field(default=None, alias="from")
    #: Substring of the Subject header.
    subject: str | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("from_", "subject")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        if v is not None and (not v.isprintable() or '"' in v or "\\" in v or len(v) > 200):
            raise ValueError("search text must be printable, without quotes or backslashes, at most 200 characters")
        return v


class ImapConfig(ConnectorConfig, AuthCheckSettings, SealSettings):
    """Watched folders (inbound, with an optional ``auth_check``) and APPEND (outbound, with
    optional ``dkim`` / ``smime`` / ``pgp`` sealing; see :mod:`connectors.mailauth`)."""

    type: Literal["imap"] = "imap"
    host: str
    #: Default: 993 for ``implicit`` TLS, 143 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    #: ``implicit`` (IMAPS, the default), ``starttls`` (required: no fallback), or ``none``
    #: (plain text, passwords in the clear: only when explicitly chosen, e.g. on loopback).
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    #: CA bundle to verify the server with (default: the system's).
    ca_file: str | None = None
    username: str
    #: Password (LOGIN), or ``oauth2_token`` (XOAUTH2 bearer token): exactly one.
    password: Secret | None = None
    oauth2_token: Secret | None = None
    #: The mailbox's address: the subject and ``rcpt`` of inbound envelopes. Default: ``username``.
    address: str | None = None
    connect_timeout: Duration = 10.0
    #: Inactivity limit per command (a large FETCH may take longer as long as data flows).
    command_timeout: Duration = 60.0

    # --- inbound ------------------------------------------------------------------------
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    search: Search = Field(default_factory=Search)
    #: What happens to a message once its outcome is accepted (never before, never on retry).
    after: Literal["seen", "move", "delete"] = "seen"
    #: The folder for ``after: move`` (created when missing).
    move_to: str | None = None
    #: Where rejected messages (and ones over ``max_size``) are moved; omitted: they stay where
    #: they are, unseen, and the checkpoint passes them.
    error_folder: str | None = None
    #: On the very first start (no checkpoint yet), also take up to this many of the newest
    #: messages already there. 0: only mail that arrives from now on.
    backfill: int = Field(default=0, ge=0, le=100_000)
    #: Wait for new mail with IDLE when the server has it; otherwise poll.
    idle: bool = True
    poll_interval: Duration = 60.0
    #: Re-issue IDLE this often (servers drop an IDLE after 30 minutes, RFC 2177).
    idle_renew: Duration = 1500.0
    #: Messages over this size are not downloaded: logged, treated as rejected.
    max_size: ByteSize = 25 * 1024 * 1024
    #: Messages handled per search round before looking for new ones again.
    batch: int = Field(default=100, ge=1, le=10_000)

    # --- outbound -----------------------------------------------------------------------
    #: From address for messages built by APPEND targets that set no ``sender``.
    sender: str | None = None

    @field_validator("folders")
    @classmethod
    def _folders(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("folders are listed more than once")
        return [check_folder(f) for f in v]

    @field_validator("move_to", "error_folder")
    @classmethod
    def _folder(cls, v: str | None) -> str | None:
        return None if v is None else check_folder(v)

    @field_validator("username", "host")
    @classmethod
    def _no_controls(cls, v: str) -> str:
        if not v or not v.isprintable() or " " in v or '"' in v:
            raise ValueError("must be printable, without spaces or quotes")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ImapConfig:
        if (self.password is None) == (self.oauth2_token is None):
            raise ValueError("set exactly one of password and oauth2_token (both are secrets)")
        if self.after == "move" and not self.move_to:
            raise ValueError("after: move needs move_to (the folder to move handled mail into)")
        if self.move_to and self.move_to in self.folders:
            raise ValueError("move_to must not be one of the watched folders")
        if self.error_folder and self.error_folder in self.folders:
            raise ValueError("error_folder must not be one of the watched folders")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    @property
    def mailbox_address(self) -> str:
        return (self.address or self.username).lower()


def _folder_value(value: Any) -> Any:
    check_folder(str(value))
    return value


class ImapTarget(MailOptions):
    """A route's ``to:`` entry for APPEND: the message (see :class:`MailOptions`; recipients are
    optional here) and where it goes."""

    #: The folder to append to (a template; created when missing).
    folder: str = "INBOX"
    #: Flags for the appended message, e.g. ``["\\Seen"]``.
    flags: list[str] = Field(default_factory=list)
    #: This route's sealing over the connector's smime/pgp settings.
    seal: SealOptions | None = None

    substitution_checks: ClassVar[dict[str, SubstitutionCheck]] = {
        **MailOptions.substitution_checks, "folder": SubstitutionCheck(each=_folder_value)}

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if not FLAG.match(f) or f.lower() == "\\recent"]
        if bad:
            raise ValueError(f"invalid flag(s) {bad}: use system flags like \\Seen or keywords like $label")
        return v
