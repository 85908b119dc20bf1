"""A fetched message → the envelope SMTP inbound makes too (shared by IMAP and POP3).

:func:`mail_envelope` is pure; :func:`authenticate` runs the ``auth_check`` (DNS) first.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from connectors.mail_common import MESSAGE_RFC822, addresses, envelope_headers, parse_message, trace_attributes
from connectors.mailauth import Verifier, add_authentication_results
from connectors.mailauth.mime import field_name, field_value, split_head
from gateway.sdk import PARSE_INLINE_BYTES, Envelope


async def authenticate(verifier: Verifier | None, raw: bytes, *, connector: str) -> tuple[bytes, dict[str, Any] | None]:
    """(``raw`` with our Authentication-Results header, the results for ``attributes.auth``), or
    (``raw``, None) without a verifier.

    A fetched message has no client IP and no HELO: SPF is ``none`` and DMARC rests on DKIM.
    MAIL FROM is the Return-Path the delivering server wrote. Nothing is refused here (the
    message is already in the mailbox): ``policy: reject`` tags like ``tag``, and routes decide.
    """
    if verifier is None:
        return raw, None
    results = await verifier.verify(raw, "", "", return_path(raw), connector=connector)
    return add_authentication_results(raw, results), results.as_dict()


def return_path(raw: bytes) -> str:
    """The address in the first Return-Path header ("" for none or ``<>``)."""
    fields, _ = split_head(raw)
    for field in fields:
        if field_name(field) == "return-path":
            found = addresses(field_value(field))
            return found[0] if found else ""
    return ""


def mail_envelope(raw: bytes, *, source: str, protocol: str, mailbox: str, extra: dict[str, Any],
                  idempotency_key: str, auth: dict[str, Any] | None = None) -> Envelope:
    """``subject`` = the mailbox's address (as SMTP's is the recipient), ``body`` = the message
    bytes as fetched, ``content_type`` = ``message/rfc822``, ``headers`` = the common and
    ``x-*`` headers, ``attributes``: ``mail_from`` (Return-Path, else From), ``rcpt`` (the
    mailbox), ``size``, ``email`` (the parsed view), ``idempotency_key`` (so a message fetched
    again after a crash is answered from its first outcome instead of delivered twice), ``auth``
    (the :func:`authenticate` results, when checked), the trace context of its ``Traceparent``
    header (``traceparent``/``tracestate``, when valid), and the protocol's own ``extra``
    (``imap.folder``, ``imap.uid``…)."""
    view = parse_message(raw)
    bounce_to = addresses(str(view["headers"].get("return-path", "")))
    attributes: dict[str, Any] = {
        "mail_from": bounce_to[0] if bounce_to else view["from"],
        "rcpt": mailbox,
        "size": len(raw),
        "email": view,
        "idempotency_key": idempotency_key,
        **trace_attributes(view),
        **extra,
    }
    if auth is not None:
        attributes["auth"] = auth
    env = Envelope(source=source, protocol=protocol, subject=mailbox, body=raw, content_type=MESSAGE_RFC822,
                   headers=envelope_headers(view), attributes=attributes)
    env.__dict__["data"] = view  # what Envelope.data would parse again from the body (message/rfc822)
    return env


async def mail_envelope_off_loop(raw: bytes, **kwargs: Any) -> Envelope:
    """:func:`mail_envelope`, in a worker thread for a large message: the e-mail parser is pure
    Python (about 20 ms a megabyte), and a mailbox may hold messages of tens of megabytes."""
    if len(raw) > PARSE_INLINE_BYTES:
        return await asyncio.to_thread(functools.partial(mail_envelope, raw, **kwargs))
    return mail_envelope(raw, **kwargs)
