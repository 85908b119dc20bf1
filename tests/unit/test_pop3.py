"""POP3: config rules and the bounded line reader (line limit, per-message byte budget). Pure."""

from __future__ import annotations

import io
import poplib

import pytest
from pydantic import ValidationError

from connectors.pop3 import Pop3Config
from connectors.pop3.maildrop import MAX_LINE, _Bounded, _text
from gateway.config.yamlsrc import FromEnv


def cfg(**extra: object) -> Pop3Config:
    return Pop3Config.model_validate({"type": "pop3", "host": "pop.example.com", "username": "invoices",
                                      "password": FromEnv("pw"), **extra})


def test_config_rules() -> None:
    assert (cfg().effective_port, cfg(tls="starttls").effective_port, cfg(tls="none").effective_port) == (995, 110, 110)
    assert cfg(address="Invoices@Example.com").mailbox_address == "invoices@example.com"
    assert not cfg().leave_on_server and cfg().backfill == 0
    for bad, why in [({"password": "inline"}, "never written inline"), ({"username": "a b"}, "without spaces"),
                     ({"tls": "off"}, "tls"), ({"backfill": -1}, "greater than or equal")]:
        with pytest.raises(ValidationError, match=why):
            cfg(**bad)


def reader(data: bytes) -> _Bounded:
    r = _Bounded()
    r.file = io.BytesIO(data)
    return r


def test_lines_longer_than_poplib_allows_are_read() -> None:
    long = b"x" * 5000
    r = reader(long + b"\r\nshort\n")
    assert r._getline() == (long, 5002)
    assert r._getline() == (b"short", 6)
    with pytest.raises(poplib.error_proto, match="EOF"):
        r._getline()
    with pytest.raises(poplib.error_proto, match="longer than 1 MiB"):
        reader(b"y" * (MAX_LINE + 10) + b"\r\n")._getline()


def test_a_message_larger_than_announced_is_cut_off() -> None:
    r = reader(b"a" * 98 + b"\r\n" + b"b" * 98 + b"\r\n")
    r.budget = 150
    r._getline()
    with pytest.raises(poplib.error_proto, match="more than the size it announced"):
        r._getline()


def test_error_texts_never_hide_the_reason() -> None:
    assert _text(poplib.error_proto(b"-ERR [AUTH] Authentication failed.")) == "-ERR [AUTH] Authentication failed."
    assert _text(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection refused"
