"""A fetched message → the envelope SMTP inbound makes too (shared by IMAP and POP3). Pure."""

from __future__ import annotations

from typing import Any

from connectors.mail_common import MESSAGE_RFC822, addresses, envelope_headers, parse_message
from gateway.envelope import Envelope


def mail_envelope(raw: bytes, *, source: str, protocol: str, mailbox: str, extra: dict[str, Any],
                  idempotency_key: str) -> Envelope:
    """``subject`` = the mailbox's address (as SMTP's is the recipient), ``body`` = the message
    bytes as fetched, ``content_type`` = ``message/rfc822``, ``headers`` = the common and
    ``x-*`` headers, ``attributes``: ``mail_from`` (Return-Path, else From), ``rcpt`` (the
    mailbox), ``size``, ``email`` (the parsed view), ``idempotency_key`` (so a message fetched
    again after a crash is answered from its first outcome instead of delivered twice), and the
    protocol's own ``extra`` (``imap.folder``, ``imap.uid``…)."""
    view = parse_message(raw)
    return_path = addresses(str(view["headers"].get("return-path", "")))
    attributes: dict[str, Any] = {
        "mail_from": return_path[0] if return_path else view["from"],
        "rcpt": mailbox,
        "size": len(raw),
        "email": view,
        "idempotency_key": idempotency_key,
        **extra,
    }
    return Envelope(source=source, protocol=protocol, subject=mailbox, body=raw, content_type=MESSAGE_RFC822,
                    headers=envelope_headers(view), attributes=attributes)
