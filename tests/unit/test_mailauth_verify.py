"""Inbound checks (SPF, DKIM, DMARC), the Authentication-Results header and the SMTP policy.

DNS is a stub server on 127.0.0.1 (tests/mailauth_support.py); keys are made here. Messages
are signed with dkimpy directly, independently of our signer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connectors.mailauth import AuthCheck, AuthResults, Verifier, add_authentication_results, smtp_reply
from connectors.mailauth.dmarc import organizational_domain, parse_record
from connectors.mailauth.verify import from_header_domains, summarize
from tests.mailauth_support import StubDns, dkim_txt, ed25519_seed, message, pem, rsa_key, stub_dns, wire

IP_OK = "127.0.0.1"
IP_BAD = "192.0.2.9"


@pytest.fixture(scope="module")
def key() -> object:
    return rsa_key()


@pytest.fixture(scope="module")
def other_key() -> object:
    return rsa_key()


@pytest.fixture
def dns() -> Iterator[StubDns]:
    with stub_dns() as server:
        yield server


def check(dns: StubDns, policy: str = "reject", timeout: float = 1.0, **kw: object) -> AuthCheck:
    return AuthCheck(resolver=dns.address, timeout=timeout, policy=policy, authserv_id="mx.gw.test", **kw)


def signed(raw: bytes, key: object, domain: str = "example.test", selector: str = "sel") -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = dkim.sign(raw, selector.encode(), domain.encode(), ed25519_seed(key).encode(),
                        signature_algorithm=b"ed25519-sha256")
    else:
        sig = dkim.sign(raw, selector.encode(), domain.encode(), pem(key, "pkcs1").encode())
    return sig + raw


def publish(dns: StubDns, key: object, *, spf: str = "v=spf1 ip4:127.0.0.1 -all",
            dmarc: str | None = "v=DMARC1; p=reject", domain: str = "example.test", selector: str = "sel") -> None:
    dns.txt(f"{selector}._domainkey.{domain}", dkim_txt(key))
    if spf:
        dns.txt(domain, spf)
    if dmarc:
        dns.txt(f"_dmarc.{domain}", dmarc)


async def verify(cfg: AuthCheck, raw: bytes, ip: str = IP_OK, mail_from: str = "alice@example.test",
                 helo: str = "mail.example.test") -> AuthResults:
    return await Verifier(cfg).verify(raw, ip, helo, mail_from)


# --- SPF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("record", "ip", "expected"), [
    ("v=spf1 ip4:127.0.0.1 -all", IP_OK, "pass"),
    ("v=spf1 ip4:127.0.0.1 -all", IP_BAD, "fail"),
    ("v=spf1 ip4:127.0.0.1 ~all", IP_BAD, "softfail"),
    ("v=spf1 ?all", IP_BAD, "neutral"),
    ("v=spf1 ip4:127.0.0.1 bogus:x -all", IP_OK, "permerror"),
    (None, IP_OK, "none"),
])
async def test_spf_results(dns: StubDns, record: str | None, ip: str, expected: str) -> None:
    if record:
        dns.txt("example.test", record)
    results = await verify(check(dns, dkim=True, dmarc=False), wire(message()), ip=ip)
    assert results.spf == expected
    assert results.spf_domain == "example.test"


async def test_spf_follows_mx_and_include_through_our_resolver(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 include:_spf.example.test -all")
    dns.txt("_spf.example.test", "v=spf1 mx -all")
    dns.add("_spf.example.test", "MX", "10 mx1.example.test.")
    dns.add("mx1.example.test", "A", "127.0.0.1")
    results = await verify(check(dns, dmarc=False), wire(message()))
    assert results.spf == "pass"
    assert ("mx1.example.test", "A") in dns.queries


async def test_spf_servfail_is_temperror_and_451_never_550(dns: StubDns) -> None:
    dns.servfail.add("example.test")
    cfg = check(dns, dmarc=False)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert results.spf == "temperror"
    assert smtp_reply(results, cfg) == "451 4.7.24 SPF validation could not complete (DNS), try again later"


async def test_spf_dns_timeout_is_temperror(dns: StubDns) -> None:
    dns.silent.add("example.test")
    results = await verify(check(dns, timeout=0.3, dmarc=False), wire(message()))
    assert results.spf == "temperror"
    assert "timeout" in results.spf_reason.lower()


async def test_spf_null_sender_checks_helo(dns: StubDns) -> None:
    dns.txt("mail.example.test", "v=spf1 ip4:127.0.0.1 -all")
    results = await verify(check(dns, dmarc=False), wire(message()), mail_from="")
    assert (results.spf, results.spf_identity, results.spf_domain) == ("pass", "helo", "mail.example.test")
    assert "smtp.helo=mail.example.test" in results.header_value()


async def test_spf_without_client_ip_is_none(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    results = await verify(check(dns, dmarc=False), wire(message()), ip="")
    assert results.spf == "none"
    assert dns.queries == []


async def test_spf_fail_is_refused_when_dmarc_is_off(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    cfg = check(dns, dmarc=False)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert smtp_reply(results, cfg) == "550 5.7.23 Message rejected: SPF validation failed for example.test"


# --- DKIM -----------------------------------------------------------------------------------


async def test_dkim_valid_rsa_and_ed25519(dns: StubDns, key: object) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    publish(dns, key)
    publish(dns, ed, selector="ed", spf="", dmarc=None)
    raw = signed(signed(wire(message()), key), ed, selector="ed")
    results = await verify(check(dns), raw)
    assert results.dkim == "pass"
    assert [(s.result, s.selector, s.algorithm) for s in results.signatures] == [
        ("pass", "ed", "ed25519-sha256"), ("pass", "sel", "rsa-sha256")]
    assert results.as_dict()["dkim_domains"] == ["example.test"]


@pytest.mark.parametrize("tamper", [
    lambda raw: raw.replace(b"93 C", b"13 C"),           # body
    lambda raw: raw.replace(b"Subject: Boiler 7", b"Subject: Boiler 8"),  # a signed header
])
async def test_dkim_tampered_fails(dns: StubDns, key: object, tamper: object) -> None:
    publish(dns, key)
    raw = tamper(signed(wire(message()), key))  # type: ignore[operator]
    results = await verify(check(dns), raw, ip=IP_BAD)
    assert results.dkim == "fail"
    assert results.dmarc == "fail"


async def test_dkim_missing_signature_is_none(dns: StubDns, key: object) -> None:
    publish(dns, key)
    results = await verify(check(dns), wire(message()))
    assert results.dkim == "none"
    assert results.signatures == ()
    assert "dkim=none" in results.header_value()


async def test_dkim_key_not_published_is_permerror(dns: StubDns, key: object) -> None:
    dns.txt("example.test", "v=spf1 -all")
    results = await verify(check(dns, dmarc=False), signed(wire(message()), key))
    assert results.dkim == "permerror"
    assert results.signatures[0].reason == "no key published"


async def test_dkim_key_lookup_failure_is_temperror_and_dmarc_waits(dns: StubDns, key: object) -> None:
    publish(dns, key, spf="v=spf1 -all")
    dns.servfail.add("sel._domainkey.example.test")
    cfg = check(dns)
    results = await verify(cfg, signed(wire(message()), key), ip=IP_BAD)
    assert (results.spf, results.dkim, results.dmarc) == ("fail", "temperror", "temperror")
    # The signature might pass once DNS answers: retry, never reject.
    assert smtp_reply(results, cfg) == "451 4.7.1 Sender authentication could not complete (DNS), try again later"


async def test_dkim_malformed_signature_is_permerror(dns: StubDns, key: object) -> None:
    publish(dns, key)
    raw = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel; b=\r\n" + wire(message())
    results = await verify(check(dns), raw)
    assert results.dkim == "permerror"
    assert ("sel._domainkey.example.test", "TXT") not in dns.queries


async def test_dkim_one_good_signature_among_bad_ones_passes(dns: StubDns, key: object, other_key: object) -> None:
    publish(dns, key)
    publish(dns, other_key, domain="other.test", selector="x", spf="", dmarc=None)
    raw = signed(wire(message()), key)
    forged = signed(raw, key, domain="other.test", selector="x")  # signed with the wrong key
    results = await verify(check(dns), forged)
    assert [s.result for s in results.signatures] == ["fail", "pass"]
    assert results.dkim == "pass"
    assert summarize(results.signatures) == "pass"


async def test_dkim_rsa_sha1_is_not_accepted(dns: StubDns, key: object) -> None:
    publish(dns, key, spf="v=spf1 -all")
    raw = wire(message())
    raw = dkim.sign(raw, b"sel", b"example.test", pem(key, "pkcs1").encode(), signature_algorithm=b"rsa-sha1") + raw
    cfg = check(dns)
    results = await verify(cfg, raw, ip=IP_BAD)
    assert [(s.result, s.algorithm) for s in results.signatures] == [("policy", "rsa-sha1")]
    assert (results.dkim, results.dmarc) == ("policy", "fail")
    assert smtp_reply(results, cfg) == "550 5.7.1 Message rejected: it fails the DMARC policy of example.test"
    assert "dkim=policy (rsa-sha1 is not accepted [RFC 8301]) header.d=example.test" in results.header_value()


async def test_dkim_body_length_limit_covers_nothing_appended(dns: StubDns, key: object) -> None:
    publish(dns, key, spf="v=spf1 -all")
    raw = wire(message())
    raw = dkim.sign(raw, b"sel", b"example.test", pem(key, "pkcs1").encode(), length=True) + raw
    cfg = check(dns)
    exact = await verify(cfg, raw, ip=IP_BAD)
    assert (exact.dkim, exact.dmarc) == ("pass", "pass")
    appended = raw + b"\r\nPay the invoice to account 666 instead.\r\n"
    results = await verify(cfg, appended, ip=IP_BAD)
    assert results.signatures[0].result == "policy"
    assert "l= leaves 43 bytes of the body unsigned" in results.signatures[0].reason
    assert (results.dkim, results.dmarc) == ("policy", "fail")
    assert smtp_reply(results, cfg) is not None


async def test_dkim_caps_the_number_of_signatures(dns: StubDns, key: object) -> None:
    publish(dns, key)
    raw = wire(message())
    for _ in range(10):
        raw = signed(raw, key)
    results = await verify(check(dns), raw)
    assert len(results.signatures) == 10
    assert [s.result for s in results.signatures].count("neutral") == 2
    assert results.dkim == "pass"


# --- DMARC ----------------------------------------------------------------------------------


async def test_dmarc_aligned_dkim_passes_even_when_spf_fails(dns: StubDns, key: object) -> None:
    publish(dns, key, spf="v=spf1 -all")
    cfg = check(dns)
    results = await verify(cfg, signed(wire(message()), key), ip=IP_BAD)
    assert (results.spf, results.dkim, results.dmarc) == ("fail", "pass", "pass")
    assert smtp_reply(results, cfg) is None


async def test_dmarc_relaxed_spf_alignment_with_a_subdomain(dns: StubDns, key: object) -> None:
    publish(dns, key, spf="")
    dns.txt("bounce.example.test", "v=spf1 ip4:127.0.0.1 -all")
    results = await verify(check(dns), wire(message()), mail_from="b@bounce.example.test")
    assert (results.spf, results.dkim, results.dmarc) == ("pass", "none", "pass")


async def test_dmarc_unaligned_passes_fail_under_p_reject_with_550(dns: StubDns, key: object) -> None:
    # Both checks pass, but for other.test: the From domain example.test is spoofed.
    publish(dns, key, domain="other.test", spf="v=spf1 ip4:127.0.0.1 -all", dmarc=None)
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject; rua=mailto:d@example.test")
    cfg = check(dns)
    results = await verify(cfg, signed(wire(message()), key, domain="other.test"), mail_from="x@other.test")
    assert (results.spf, results.dkim, results.dmarc) == ("pass", "pass", "fail")
    assert (results.dmarc_policy, results.dmarc_disposition) == ("reject", "reject")
    assert smtp_reply(results, cfg) == "550 5.7.1 Message rejected: it fails the DMARC policy of example.test"


async def test_dmarc_strict_dkim_alignment(dns: StubDns, key: object) -> None:
    publish(dns, key, domain="mail.example.test", spf="v=spf1 -all", dmarc=None)
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject; adkim=s")
    results = await verify(check(dns), signed(wire(message()), key, domain="mail.example.test"), ip=IP_BAD)
    assert (results.dkim, results.dmarc) == ("pass", "fail")


async def test_dmarc_quarantine_is_tagged_not_refused(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=quarantine")
    cfg = check(dns)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert (results.dmarc, results.dmarc_disposition) == ("fail", "quarantine")
    assert smtp_reply(results, cfg) is None


async def test_dmarc_subdomain_policy_from_the_organizational_domain(dns: StubDns) -> None:
    dns.txt("news.example.test", "v=spf1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=none; sp=reject")
    results = await verify(check(dns), wire(message(sender="n@news.example.test")), ip=IP_BAD,
                           mail_from="n@news.example.test")
    assert (results.from_domain, results.dmarc, results.dmarc_policy) == ("news.example.test", "fail", "reject")
    assert ("_dmarc.news.example.test", "TXT") in dns.queries


async def test_dmarc_pct_zero_downgrades_reject_to_quarantine(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject; pct=0")
    cfg = check(dns)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert (results.dmarc, results.dmarc_policy, results.dmarc_disposition) == ("fail", "reject", "quarantine")
    assert smtp_reply(results, cfg) is None


async def test_dmarc_no_record_is_none(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    cfg = check(dns)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert results.dmarc == "none"
    assert smtp_reply(results, cfg) is None


async def test_dmarc_record_lookup_failure_is_temperror(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    dns.silent.add("_dmarc.example.test")
    cfg = check(dns, timeout=0.3)
    results = await verify(cfg, wire(message()), ip=IP_BAD)
    assert results.dmarc == "temperror"
    assert smtp_reply(results, cfg).startswith("451 4.7.1 ")  # type: ignore[union-attr]


def with_second_from(raw: bytes, author: str) -> bytes:
    return f"From: {author}\r\n".encode() + raw


@pytest.mark.parametrize("spoof", [
    lambda raw: raw.replace(b"From: mallory@evil.test", b"From: mallory@evil.test, ceo@example.test"),
    lambda raw: raw.replace(b"From: mallory@evil.test", b"From: ceo@example.test, mallory@evil.test"),
    lambda raw: with_second_from(raw, "ceo@example.test"),
    lambda raw: raw.replace(b"From: mallory@evil.test", b"From: mallory@evil.test\r\nFrom: ceo@example.test"),
    lambda raw: raw.replace(b"From: mallory@evil.test", b"From: mallory@evil.test <ceo@example.test>"),
], ids=["second-address", "first-address", "from-header-above", "from-header-below", "ambiguous"])
async def test_dmarc_a_second_author_gets_its_domains_policy(dns: StubDns, key: object, spoof: object) -> None:
    # mallory's own domain passes SPF and DKIM; the spoofed author example.test publishes p=reject.
    publish(dns, key, domain="evil.test", spf="v=spf1 ip4:127.0.0.1 -all", dmarc="v=DMARC1; p=none")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    raw = signed(spoof(wire(message(sender="mallory@evil.test"))), key, domain="evil.test")  # type: ignore[operator]
    cfg = check(dns)
    results = await verify(cfg, raw, mail_from="mallory@evil.test")
    assert (results.spf, results.dkim, results.dmarc) == ("pass", "pass", "fail")
    assert (results.from_domain, results.dmarc_disposition) == ("example.test", "reject")
    assert set(results.from_domains) == {"evil.test", "example.test"}
    assert smtp_reply(results, cfg) == "550 5.7.1 Message rejected: it fails the DMARC policy of example.test"
    assert "dmarc=fail (p=reject dis=reject) header.from=example.test" in results.header_value()


async def test_dmarc_passes_only_when_every_author_passes(dns: StubDns, key: object) -> None:
    publish(dns, key)
    publish(dns, key, domain="example.org", spf="", dmarc="v=DMARC1; p=quarantine", selector="org")
    raw = signed(signed(wire(message(sender="a@example.test, b@example.org")), key), key, domain="example.org",
                 selector="org")
    cfg = check(dns)
    results = await verify(cfg, raw)
    assert (results.dmarc, results.from_domains) == ("pass", ("example.test", "example.org"))
    assert smtp_reply(results, cfg) is None


@pytest.mark.parametrize(("mangle", "problem"), [
    (lambda raw: raw.replace(b"From: mallory@evil.test\r\n", b""), "no From header"),
    (lambda raw: raw.replace(b"From: mallory@evil.test", b"From: undisclosed"), "without a valid domain"),
    (lambda raw: raw.replace(b"From: mallory@evil.test", b"From: <>"), "no From address"),
    (lambda raw: raw.replace(b"From: mallory@evil.test", b"From: Mallory <mallory@evil.test"),
     "unparsable From address"),
    (lambda raw: with_second_from(raw, "mallory@evil.test"), "2 From headers"),
])
async def test_dmarc_an_author_that_cannot_be_told_is_refused_under_reject(dns: StubDns, key: object,
                                                                           mangle: object, problem: str) -> None:
    publish(dns, key, domain="evil.test", spf="v=spf1 ip4:127.0.0.1 -all", dmarc=None)
    raw = mangle(signed(wire(message(sender="mallory@evil.test")), key, domain="evil.test"))  # type: ignore[operator]
    cfg = check(dns)
    results = await verify(cfg, raw, mail_from="mallory@evil.test")
    assert results.dmarc == "permerror"
    assert problem in results.author_problem
    reply = f"550 5.7.1 Message rejected: DMARC cannot tell its author ({results.author_problem})"
    assert smtp_reply(results, cfg) == reply
    assert smtp_reply(results, check(dns, policy="tag")) is None
    assert "dmarc=permerror" in results.header_value()


async def test_dmarc_invalid_record_is_permerror(dns: StubDns) -> None:
    dns.txt("_dmarc.example.test", "v=DMARC1; p=maybe")
    results = await verify(check(dns), wire(message()), ip=IP_BAD)
    assert results.dmarc == "permerror"


def test_dmarc_record_parsing_and_organizational_domains() -> None:
    rec = parse_record("v=DMARC1; p=Reject; sp=none; adkim=s; pct=50; rua=mailto:x@y")
    assert (rec.p, rec.sp, rec.adkim, rec.aspf, rec.pct) == ("reject", "none", "s", "r", 50)
    assert parse_record("v=DMARC1; rua=mailto:x@y").p == "none"
    assert organizational_domain("a.b.example.co.uk") == "example.co.uk"
    assert organizational_domain("mail.example.test") == "example.test"
    assert from_header_domains(b"From: =?utf-8?q?J=C3=B6rg?= <j@Example.TEST>\r\n\r\n") == (["example.test"], "")
    assert from_header_domains("From: J\u00f6rg <j@b\u00fccher.test>\r\n\r\n".encode()) == (["xn--bcher-kva.test"], "")
    assert from_header_domains(b"From: a@x.test, b@y.test, a@x.test\r\n\r\n") == (["x.test", "y.test"], "")
    assert from_header_domains(b"Subject: x\r\n\r\n") == ([], "no From header")
    many = ", ".join(f"a@d{i}.test" for i in range(20)).encode()
    assert from_header_domains(b"From: " + many + b"\r\n\r\n")[1] == "20 author domains"


# --- policy, header, config -----------------------------------------------------------------


async def test_policy_tag_and_off(dns: StubDns) -> None:
    dns.txt("example.test", "v=spf1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    tag = check(dns, policy="tag")
    results = await verify(tag, wire(message()), ip=IP_BAD)
    assert results.dmarc == "fail"
    assert smtp_reply(results, tag) is None
    off = check(dns, policy="off")
    queries = len(dns.queries)
    results = await verify(off, wire(message()), ip=IP_BAD)
    assert (results.spf, results.dkim, results.dmarc, results.checked) == ("none", "none", "none", ())
    assert len(dns.queries) == queries
    assert results.header_value() == "mx.gw.test; none"


async def test_authentication_results_header_replaces_forgeries_and_keeps_dkim_valid(dns: StubDns,
                                                                                    key: object) -> None:
    publish(dns, key)
    raw = signed(wire(message()), key)
    forged = (b"Authentication-Results: MX.GW.TEST; dmarc=pass header.from=example.test\r\n"
              b"Authentication-Results: other.example; spf=pass\r\n" + raw)
    cfg = check(dns)
    results = await verify(cfg, forged)
    out = add_authentication_results(forged, results)
    assert out.startswith(b"Authentication-Results: mx.gw.test;\r\n\tspf=pass smtp.mailfrom=alice@example.test;\r\n"
                          b"\tdkim=pass header.d=example.test header.s=sel header.a=rsa-sha256 header.b=")
    assert out.count(b"Authentication-Results:") == 2
    assert b"MX.GW.TEST" not in out and b"other.example; spf=pass" in out
    assert b"\n" not in out.replace(b"\r\n", b"")
    again = await verify(cfg, out)
    assert again.dkim == "pass"


def test_authentication_results_on_an_lf_message_and_odd_values() -> None:
    results = AuthResults("mx.gw.test", spf="softfail", mail_from='a "b"@x.test', checked=("spf",),
                          spf_reason="because\r\nBcc: evil")
    out = add_authentication_results(b"Subject: x\nFrom: a@x.test\n\nbody\n", results)
    head = out.split(b"\n\n")[0]
    assert head.startswith(b"Authentication-Results: mx.gw.test;\n\tspf=softfail (because  Bcc: evil) "
                           b'smtp.mailfrom="a \\"b\\"@x.test"\nSubject: x\n')
    assert b"\r" not in out


def test_authcheck_config() -> None:
    cfg = AuthCheck(resolver=["127.0.0.1:5353", "[::1]", "10.0.0.1"], timeout="2s", authserv_id="mx.gw.test")
    assert cfg.nameservers() == [("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53)]
    assert AuthCheck(resolver="127.0.0.1", authserv_id="mx").resolver == ["127.0.0.1"]
    with pytest.raises(ValueError, match="not an IP address"):
        AuthCheck(resolver="dns.example:53")
    with pytest.raises(ValueError, match="dmarc is computed from spf and dkim"):
        AuthCheck(spf=False)
    with pytest.raises(ValueError, match="authserv_id"):
        AuthCheck(authserv_id="mx; dkim=pass")
    with pytest.raises(ValueError, match="timeout"):
        AuthCheck(timeout=0)
    with pytest.raises(ValueError):
        AuthCheck(policy="drop")


async def test_check_logs_failures_without_the_body(dns: StubDns, caplog: pytest.LogCaptureFixture) -> None:
    dns.txt("example.test", "v=spf1 -all")
    dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
    with caplog.at_level(logging.INFO, logger="gateway.mailauth"):
        await verify(check(dns), wire(message()), ip=IP_BAD)
    record = next(r for r in caplog.records if r.getMessage() == "mailauth.checked")
    assert record.levelno == logging.INFO
    assert record.fields["dmarc"] == "fail"  # type: ignore[attr-defined]
    assert "93 C" not in caplog.text
