"""Mapping tests for connectors.mail_common: real .eml samples in, the parsed view out; and the
messages the mail targets build (headers, parts, injection refusals), read back with the parser."""

from __future__ import annotations

import email
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.mail_common import (
    MAX_DEPTH,
    MAX_PARTS,
    Attachment,
    HeaderInjection,
    MailError,
    MailOptions,
    build_mail,
    build_message,
    envelope_headers,
    parse_message,
    validated_options,
)
from connectors.mail_common.mailbox import RetryLater, auth_verifier
from connectors.mailauth import AuthCheck
from gateway.contract import Outcome, Target
from gateway.envelope import Envelope

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "mail"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def assert_safe(view: dict[str, Any]) -> None:
    """JSON-encodable as UTF-8 and no CR, LF or NUL in any header-like value."""
    json.dumps(view, ensure_ascii=False).encode("utf-8")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(k, where)
                walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for v in value:
                walk(v, where)
        elif isinstance(value, str) and where not in ("view.text", "view.html"):
            assert not any(c in value for c in "\r\n\0"), f"{where}: {value!r}"

    walk(view, "view")


# --- parsing real samples ----------------------------------------------------------------


def test_plain_message_with_encoded_subject_and_address_lists() -> None:
    view = parse_message(sample("plain.eml"))
    assert view["subject"] == "Kessel 7 über 90 °C"
    assert view["from"] == "sensor@plant.example"
    assert view["to"] == ["ops@example.com", "night@example.com"]
    assert view["cc"] == ["audit@example.com"]
    assert view["message_id"] == "boiler-7-0001@plant.example"
    assert view["date"] == "2024-05-14T09:12:00+02:00"
    assert view["text"] == "Temperature 93.5 °C at 09:11:58.\nPressure normal.\n"
    assert view["html"] is None and view["attachments"] == [] and view["defects"] == []
    assert view["headers"]["x-plant-site"] == "7"
    assert view["headers"]["from"] == "Boiler Seven <sensor@plant.example>"
    # folded Received header is unfolded onto one line
    assert view["headers"]["received"].startswith("from edge1.plant.example (edge1 [10.0.0.7]) by mx.example.com")
    assert_safe(view)


def test_envelope_headers_are_the_common_ones_and_x_headers() -> None:
    headers = envelope_headers(parse_message(sample("plain.eml")))
    assert set(headers) == {"from", "to", "cc", "subject", "date", "message-id", "x-plant-site"}
    assert headers["subject"] == "Kessel 7 über 90 °C"


def test_alternative_gives_text_and_html() -> None:
    view = parse_message(sample("alternative.eml"))
    assert view["text"] == "Uptime 99.98 %.\n"
    assert view["html"] == "<html><body><p>Uptime <b>99.98&nbsp;%</b>.</p><p>Übersicht</p></body></html>\n"
    assert view["attachments"] == []


def test_attachments_names_types_sizes() -> None:
    view = parse_message(sample("attachments.eml"))
    assert view["text"] == "Bericht für Kessel 7 anbei.\n"  # iso-8859-1, quoted-printable
    assert view["html"].startswith("<p>Bericht für Kessel 7 anbei.</p>")
    assert view["attachments"] == [
        {"filename": "logo.png", "content_type": "image/png", "size": 69, "disposition": "inline"},
        {"filename": "Prüfbericht K7.pdf", "content_type": "application/pdf", "size": 1040,
         "disposition": "attachment"},
        # a path in the name is metadata only: the directory part is dropped
        {"filename": "readings.csv", "content_type": "text/csv", "size": 35, "disposition": "attachment"},
        {"filename": "original.eml", "content_type": "message/rfc822", "size": 96, "disposition": "attachment"},
    ]
    assert_safe(view)


def test_missing_closing_boundary_keeps_what_was_read() -> None:
    view = parse_message(sample("broken-boundary.eml"))
    assert view["text"] == "The text part is fine.\n"
    assert [a["filename"] for a in view["attachments"]] == ["cut.bin"]
    assert "CloseBoundaryNotFoundDefect" in view["defects"]


def test_bad_base64_and_unknown_charset_do_not_crash() -> None:
    view = parse_message(sample("bad-base64.eml"))
    assert view["text"] == "body with an unknown charset \ufffd"
    assert view["attachments"][0]["filename"] == "photo.jpg"
    assert "InvalidBase64CharactersDefect" in view["defects"]
    assert_safe(view)


def test_encoded_crlf_and_nul_never_become_new_lines() -> None:
    view = parse_message(sample("header-injection.eml"))
    assert view["subject"] == "hello Bcc: victim@example.org"
    assert view["from"] == "eve@example.net"  # the display name cannot pose as an address
    assert view["to"] == ["ops@example.com"] and view["cc"] == []
    assert view["headers"]["x-trace"] == "with nul"
    assert_safe(view)


def test_raw_utf8_headers_are_decoded() -> None:
    view = parse_message(sample("8bit-headers.eml"))
    assert view["subject"] == "Grüße aus Köln"
    assert view["headers"]["from"] == "Jörg Müller <joerg@example.de>"
    assert view["from"] == "joerg@example.de"
    assert view["text"] == "Schöne Grüße.\n"


def test_html_only_and_binary_single_part() -> None:
    html = parse_message(sample("html-only.eml"))
    assert html["text"] is None and html["html"].startswith("<html><body><h1>DiskFull")
    binary = parse_message(sample("binary-body.eml"))
    assert binary["text"] is None
    assert binary["attachments"] == [{"filename": "", "content_type": "image/jpeg", "size": 57,
                                      "disposition": "inline"}]


# --- hostile structure --------------------------------------------------------------------


def nested(depth: int) -> bytes:
    head = b"From: a@example.com\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
    body = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth))
    body += b"Content-Type: text/plain\r\n\r\nleaf\r\n"
    body += b"".join(b"--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + body


def test_200_nested_multiparts_stop_at_the_depth_limit() -> None:
    view = parse_message(nested(200))
    assert view["subject"] == "deep"
    assert view["truncated"] is True and view["text"] is None  # the leaf is below MAX_DEPTH
    view = parse_message(nested(MAX_DEPTH - 1))
    assert view["text"] == "leaf" and view["truncated"] is False


def test_nesting_that_breaks_the_parser_still_gives_the_headers() -> None:
    view = parse_message(nested(3000))
    assert view["subject"] == "deep" and view["from"] == "a@example.com"
    assert any(d.startswith("unparsable structure") for d in view["defects"])


def test_part_count_is_bounded() -> None:
    parts = b"".join(b"--b\r\nContent-Type: application/octet-stream\r\n\r\nx\r\n" for _ in range(MAX_PARTS + 50))
    raw = b"Subject: many\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    view = parse_message(raw)
    assert view["truncated"] is True
    assert len(view["attachments"]) == MAX_PARTS - 1


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\xfe garbage", b"Subject: \xff\xfe\r\n\r\n\xff", b"no headers at all",
                                 b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter"])
def test_odd_inputs_never_raise(raw: bytes) -> None:
    assert_safe(parse_message(raw))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"]))
def test_any_bytes_parse_to_a_safe_view(body: bytes, prefix: bytes) -> None:
    assert_safe(parse_message(b"Subject: =?utf-8?q?a=0Db?=\r\n" + prefix + body))


# --- building ------------------------------------------------------------------------------


def env(body: bytes = b'{"temperature": 93.5}', content_type: str = "application/json", **kw: Any) -> Envelope:
    return Envelope(id="01HZZZZZZZZZZZZZZZZZZZZZZZ", source="plant", protocol="mqtt", subject="plant/7/boiler/alert",
                    body=body, content_type=content_type, time=datetime(2024, 5, 14, 7, 12, tzinfo=UTC), **kw)


def opts(**kw: Any) -> MailOptions:
    return MailOptions.model_validate(kw)


def test_built_message_reads_back() -> None:
    built = build_mail(env(), opts(
        sender="Gateway <gw@example.com>", to=["ops@example.com, Night <night@example.com>"], cc="audit@example.com",
        bcc=["hidden@example.com"], reply_to="desk@example.com", subject="Kessel 7: 93.5 °C",
        text="Temperature 93.5\n", html="<p>Temperature <b>93.5</b></p>",
        attachments=[{"filename": "reading.json"}], mail_headers={"X-Priority": "1"}), route="alerts",
        default_sender=None)
    assert built.sender == "gw@example.com"
    assert built.recipients == ["ops@example.com", "night@example.com", "audit@example.com", "hidden@example.com"]
    assert b"\r\n" in built.data and b"\n" not in built.data.replace(b"\r\n", b"")
    view = parse_message(built.data)
    assert view["subject"] == "Kessel 7: 93.5 °C"
    assert view["from"] == "gw@example.com"
    assert view["to"] == ["ops@example.com", "night@example.com"] and view["cc"] == ["audit@example.com"]
    assert view["reply_to"] == ["desk@example.com"]
    assert "bcc" not in view["headers"] and b"hidden@example.com" not in built.data
    assert view["text"] == "Temperature 93.5\n"
    assert view["html"].strip() == "<p>Temperature <b>93.5</b></p>"
    assert view["attachments"] == [{"filename": "reading.json", "content_type": "application/json", "size": 21,
                                    "disposition": "attachment"}]
    assert view["headers"]["auto-submitted"] == "auto-generated"
    assert view["headers"]["x-gateway-envelope-id"] == "01HZZZZZZZZZZZZZZZZZZZZZZZ"
    assert view["headers"]["x-priority"] == "1"
    assert view["date"] == "2024-05-14T07:12:00+00:00"
    assert view["message_id"] == built.message_id.strip("<>")
    assert built.message_id.startswith("<01HZZZZZZZZZZZZZZZZZZZZZZZ.") and built.message_id.endswith("@example.com>")


def test_message_id_is_stable_per_envelope_and_route() -> None:
    o = opts(sender="gw@example.com", to="ops@example.com")
    first = build_mail(env(), o, route="a", default_sender=None).message_id
    assert build_mail(env(), o, route="a", default_sender=None).message_id == first
    assert build_mail(env(), o, route="b", default_sender=None).message_id != first
    given_id = build_mail(env(), opts(sender="gw@example.com", to="ops@example.com", message_id="<x.1@example.com>"),
                          route="a", default_sender=None)
    assert given_id.message_id == "<x.1@example.com>"


def test_defaults_subject_from_envelope_and_text_from_body() -> None:
    built = build_mail(env(), opts(to="ops@example.com"), route="r", default_sender="gw@example.com")
    view = parse_message(built.data)
    assert view["subject"] == "plant/7/boiler/alert"
    assert view["text"] == '{"temperature": 93.5}\n'


@pytest.mark.parametrize("field,value", [
    ("subject", "x\r\nBcc: evil@example.net"),
    ("subject", "x\nBcc: evil@example.net"),
    ("subject", "x\rBcc: evil@example.net"),
    ("subject", "nul\0byte"),
    ("to", "ops@example.com\r\nBcc: evil@example.net"),
    ("cc", ["a@example.com", "b@example.com\nX: y"]),
    ("sender", "gw@example.com\r\nBcc: evil@example.net"),
    ("reply_to", "r@example.com\r\nX: y"),
    ("message_id", "<a@b>\r\nBcc: evil@example.net"),
    ("mail_headers", {"X-Note": "a\r\nBcc: evil@example.net"}),
    ("mail_headers", {"X-Note\r\nBcc": "evil@example.net"}),
    ("attachments", [{"filename": "a.txt\r\nBcc: evil@example.net", "content": "x"}]),
])
def test_header_injection_is_refused(field: str, value: Any) -> None:
    o = opts(**{"sender": "gw@example.com", "to": "ops@example.com", field: value})
    with pytest.raises(HeaderInjection):
        build_mail(env(), o, route="r", default_sender=None)


@pytest.mark.parametrize("kw,message", [
    ({"to": "not-an-address"}, "not a valid address"),
    ({"to": "ops@exa mple.com"}, "not a valid address"),
    ({"to": []}, "no recipients"),
    ({"to": "a@example.com", "sender": None}, "no sender"),
    ({"to": "a@example.com", "sender": "a@example.com, b@example.com"}, "exactly one"),
    ({"to": "a@example.com", "mail_headers": {"Bcc": "x@example.com"}}, "cannot be set"),
    ({"to": "a@example.com", "mail_headers": {"Content-Type": "text/html"}}, "cannot be set"),
    ({"to": "a@example.com", "message_id": "no-angle-brackets"}, "not of the form"),
    ({"to": "a@example.com", "attachments": [{"filename": "x", "content_type": "bogus"}]}, "not a MIME type"),
    ({"to": "a@example.com", "forward": True}, "forward needs a message/rfc822 body"),
])
def test_unbuildable_messages_are_mail_errors(kw: dict[str, Any], message: str) -> None:
    kw.setdefault("sender", "gw@example.com")
    with pytest.raises(MailError, match=message):
        build_mail(env(), opts(**kw), route="r", default_sender=None)


def test_inbound_message_is_forwarded_unchanged() -> None:
    raw = sample("attachments.eml")
    mail = env(body=raw, content_type="message/rfc822",
               attributes={"rcpt": "ops@example.com", "mail_from": "service@vendor.example"})
    built = build_mail(mail, opts(), route="r", default_sender="gw@example.com")
    assert built.forwarded and built.data == raw
    assert built.recipients == ["ops@example.com"] and built.sender == "gw@example.com"
    built = build_mail(mail, opts(to="archive@example.com"), route="r", default_sender=None)
    assert built.data == raw and built.recipients == ["archive@example.com"]
    assert built.sender == "service@vendor.example"
    # asking for a subject builds a new message that carries the original as an attachment
    built = build_mail(mail, opts(to="ops@example.com", subject="fwd", attachments=[{"filename": "orig.eml"}]),
                       route="r", default_sender="gw@example.com")
    view = parse_message(built.data)
    assert not built.forwarded and view["subject"] == "fwd"
    assert view["attachments"][0]["filename"] == "orig.eml"
    assert view["attachments"][0]["size"] == len(raw)


def test_templated_attachment_after_router_copy_validates() -> None:
    # The router renders templated options with model_copy(update=...), which leaves dicts.
    rendered = opts(to="ops@example.com").model_copy(
        update={"attachments": [{"filename": "r.txt", "content": "rendered"}]})
    target = Target(route="r", connector="mail", options=rendered)
    again = MailOptions.model_validate(validated_options(target))
    assert again.attachments == [Attachment(filename="r.txt", content="rendered")]
    view = parse_message(build_mail(env(), again, route="r", default_sender="gw@example.com").data)
    assert view["attachments"] == [{"filename": "r.txt", "content_type": "text/plain", "size": 8,
                                    "disposition": "attachment"}]


def test_build_message_gives_the_email_message() -> None:
    msg = build_message(env(), opts(to="ops@example.com", subject="s", text="t"), route="r",
                        default_sender="gw@example.com")
    assert msg["Subject"] == "s" and msg["To"] == "ops@example.com" and msg.get_content() == "t\n"
    with pytest.raises(HeaderInjection):
        build_message(env(), opts(subject="a\nb"), route="r", default_sender="gw@example.com")


# --- what the mailbox readers (imap, pop3) share ----------------------------------------------


def test_retry_later_waits_at_least_a_second_and_five_without_a_retry_after() -> None:
    assert RetryLater.after_outcome(Outcome.retry("e1", "spool full", retry_after=30)).after == 30
    assert RetryLater.after_outcome(Outcome.retry("e1", "busy", retry_after=0.2)).after == 1.0
    assert RetryLater.after_outcome(Outcome.retry("e1", "timeout")).after == 5.0


def test_auth_verifier_only_for_a_check_that_is_on() -> None:
    log = logging.getLogger("test.mailbox")
    assert auth_verifier(None, log) is None
    assert auth_verifier(AuthCheck(policy="off", resolver=["127.0.0.1"]), log) is None
    verifier = auth_verifier(AuthCheck(policy="tag", resolver=["127.0.0.1"]), log)
    assert verifier is not None and verifier.cfg.policy == "tag" and verifier.log is log


_CONTENT_TYPES = [
    "text/plain", "text/plain; charset=utf-8", 'text/plain; charset="ISO-8859-1"', "TEXT/PLAIN; CHARSET=UTF-8",
    "text/plain;\r\n charset=windows-1252; format=flowed", "text/plain; charset*=utf-8''latin-1",
    "text/plain; charset*=us-ascii'en'utf%2D8", "text/plain; charset=", "text/plain; charset=\"\"",
    "text/plain; charset=ütf-8", "text/plain; charset=utf-8; charset=latin-1", "text/html; name=x; charset=koi8-r",
    "text/plain; charset=\"utf-8", "; charset=utf-8", "text/plain; charset*0=utf; charset*1=-8",
]


@pytest.mark.parametrize("ctype", _CONTENT_TYPES)
def test_the_kept_charset_is_what_the_email_package_reads(ctype: str) -> None:
    from connectors.mail_common.parse import _charset

    raw = f"Content-Type: {ctype}\r\nSubject: x\r\n\r\nbody\r\n".encode("utf-8", "surrogateescape")
    part = email.message_from_bytes(raw)
    assert _charset(part) == part.get_content_charset()
    assert _charset(part) == part.get_content_charset()  # again, from what was kept


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60))
@settings(max_examples=300, deadline=None)
def test_the_kept_charset_matches_for_any_printable_parameter_text(params: str) -> None:
    from connectors.mail_common.parse import _charset

    part = email.message_from_bytes(f"Content-Type: text/plain; {params}\r\n\r\nx\r\n".encode())
    assert _charset(part) == part.get_content_charset()


@pytest.mark.parametrize("text", ["plain", "tab\there", "nul\x00x", "cr\rlf\nx", "del\x7fx", "nbsp\u00a0x",
                                  "line\u2028sep", "bidi\u202ex", "  padded  ", "é", "\x1b[31m"])
def test_clean_gives_what_the_control_pattern_gives(text: str) -> None:
    from connectors.mail_common.parse import _CONTROL, clean

    assert clean(text) == _CONTROL.sub(" ", text).strip()


def test_long_header_values_are_read_but_not_kept() -> None:
    """What is kept is bounded: 512 values of at most 256 characters, whatever a sender sends."""
    from connectors.mail_common.parse import _charset, _charset_of, _iso_date, _kept_iso_date

    long_type = "text/plain; charset=utf-8; x=" + "a" * 20_000
    part = email.message_from_bytes(f"Content-Type: {long_type}\r\n\r\nx\r\n".encode())
    before = _charset_of.cache_info().currsize, _kept_iso_date.cache_info().currsize
    assert _charset(part) == "utf-8"
    assert _iso_date("Tue, 14 May 2024 09:12:00 +0200" + " " * 300) == "2024-05-14T09:12:00+02:00"
    assert (_charset_of.cache_info().currsize, _kept_iso_date.cache_info().currsize) == before
    assert _charset_of.cache_info().maxsize == _kept_iso_date.cache_info().maxsize == 512
