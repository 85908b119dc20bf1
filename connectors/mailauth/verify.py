"""Inbound verification: SPF (pyspf), DKIM (dkimpy, every signature), DMARC; the
Authentication-Results header (RFC 8601); the SMTP answer a policy gives for the results.

Results use RFC 8601's words: pass, fail, softfail, neutral, none, temperror, permerror, and
``policy`` for a DKIM signature that verifies but is not accepted: ``rsa-sha1`` (RFC 8301), or
an ``l=`` body length shorter than the body (what follows it is unsigned and could be anything).
Such a signature counts for nothing, DMARC alignment included. A check that is switched off
reports ``none`` and is left out of the header. DNS failures are ``temperror`` everywhere (see
:mod:`connectors.mailauth.dns`).

DMARC needs the author: every address of every From field is checked, the strictest outcome
decides (:func:`connectors.mailauth.dmarc.strictest`). A message whose author cannot be
determined (no From, several From fields, an address that does not parse or has no domain)
is ``dmarc=permerror`` and, under ``policy: reject``, refused like a DMARC failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy as email_policy
from email.errors import HeaderMissingRequiredValue, InvalidHeaderDefect
from email.parser import HeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

import dkim  # type: ignore[import-untyped]
import spf  # type: ignore[import-untyped]
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from connectors.mailauth import dmarc
from connectors.mailauth.config import AuthCheck
from connectors.mailauth.dns import DnsTemporaryError, Resolver, spf_resolver
from connectors.mailauth.mime import field_name, field_value, split_head
from gateway.sdk import event

#: RFC 7208 4.6.4: an SPF evaluation may take this long in all (each query: ``timeout``).
SPF_BUDGET = 20.0
#: Signatures verified per message; more are reported as not checked (a DNS-amplification guard).
MAX_SIGNATURES = 8
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

R_DMARC_REJECT = "550 5.7.1 Message rejected: it fails the DMARC policy of {domain}"
R_AUTHOR_UNKNOWN = "550 5.7.1 Message rejected: DMARC cannot tell its author ({reason})"
R_SPF_FAIL = "550 5.7.23 Message rejected: SPF validation failed for {domain}"
R_TEMPERROR = "451 4.7.1 Sender authentication could not complete (DNS), try again later"
R_SPF_TEMPERROR = "451 4.7.24 SPF validation could not complete (DNS), try again later"

_HEADER_PARSER = HeaderParser(policy=compat32)
_STRICT_HEADER_PARSER = HeaderParser(policy=email_policy.default)
#: RFC 8301 3.1: verifiers must not consider rsa-sha1 signatures valid.
REFUSED_ALGORITHMS = frozenset({"rsa-sha1"})
#: From fields longer than this are not parsed (email's parser is slow on hostile input).
MAX_FROM_LENGTH = 4096
#: Author domains DMARC looks up per message; more are a problem (a DNS-amplification guard).
MAX_AUTHOR_DOMAINS = 8
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+./=?^_`{|}~@-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class DkimSignatureResult:
    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    #: The first 8 characters of b= (RFC 6008 header.b), to tell signatures apart.
    b: str = ""
    reason: str = ""


@dataclass(frozen=True)
class AuthResults:
    """What the checks found for one message."""

    authserv_id: str
    spf: str = "none"
    dkim: str = "none"
    dmarc: str = "none"
    #: ``mailfrom``, or ``helo`` when MAIL FROM was empty (RFC 7208 2.4).
    spf_identity: str = "mailfrom"
    #: The domain SPF checked (MAIL FROM's, or the HELO name's).
    spf_domain: str = ""
    mail_from: str = ""
    helo: str = ""
    spf_reason: str = ""
    signatures: tuple[DkimSignatureResult, ...] = ()
    from_domain: str = ""
    #: Every author domain found in From (DMARC checks each; ``from_domain`` is the deciding one).
    from_domains: tuple[str, ...] = ()
    #: Why DMARC cannot tell the author ("" when it can): no From, several, unparsable.
    author_problem: str = ""
    dmarc_policy: str = ""
    dmarc_disposition: str = "none"
    dmarc_reason: str = ""
    #: The checks that ran (spf, dkim, dmarc).
    checked: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready view routes see as ``auth`` (``auth.dmarc == 'fail'``)."""
        return {
            "spf": self.spf,
            "dkim": self.dkim,
            "dmarc": self.dmarc,
            "spf_domain": self.spf_domain,
            "from_domain": self.from_domain,
            "from_domains": list(self.from_domains),
            "dmarc_policy": self.dmarc_policy,
            "dmarc_disposition": self.dmarc_disposition,
            "dkim_domains": sorted({s.domain for s in self.signatures if s.result == "pass"}),
            "signatures": [{"domain": s.domain, "selector": s.selector, "algorithm": s.algorithm,
                            "result": s.result} for s in self.signatures],
        }

    def header_value(self) -> str:
        """The Authentication-Results value (RFC 8601), one result per folded line."""
        parts: list[str] = []
        if "spf" in self.checked:
            if self.spf_identity == "helo":
                prop = f"smtp.helo={_pvalue(self.helo)}"
            else:
                prop = f"smtp.mailfrom={_pvalue(self.mail_from or self.spf_domain)}"
            parts.append(f"spf={self.spf}{_comment(self.spf_reason, self.spf not in ('pass', 'none'))} {prop}")
        if "dkim" in self.checked:
            if not self.signatures:
                parts.append("dkim=none")
            for sig in self.signatures:
                props = [f"header.d={_pvalue(sig.domain)}"] if sig.domain else []
                if sig.selector:
                    props.append(f"header.s={_pvalue(sig.selector)}")
                if sig.algorithm:
                    props.append(f"header.a={_pvalue(sig.algorithm)}")
                if sig.b:
                    props.append(f"header.b={_pvalue(sig.b)}")
                parts.append(" ".join([f"dkim={sig.result}{_comment(sig.reason, sig.result != 'pass')}",
                                       *props]))
        if "dmarc" in self.checked:
            info = ""
            if self.dmarc_policy:
                info = f" (p={self.dmarc_policy} dis={self.dmarc_disposition})"
            elif self.dmarc_reason and self.dmarc != "none":
                info = _comment(self.dmarc_reason, True)
            frm = f" header.from={_pvalue(self.from_domain)}" if self.from_domain else ""
            parts.append(f"dmarc={self.dmarc}{info}{frm}")
        if not parts:
            return f"{self.authserv_id}; none"
        return f"{self.authserv_id};\r\n\t" + ";\r\n\t".join(parts)


def _pvalue(value: str) -> str:
    text = _CONTROL.sub("", value)[:254]
    if text and _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(reason: str, show: bool) -> str:
    if not show or not reason:
        return ""
    text = _CONTROL.sub(" ", reason).replace("(", "[").replace(")", "]").replace("\\", "/")
    return f" ({text[:120].strip()})"


# --- the checks ---------------------------------------------------------------------------


class Verifier:
    """Checks inbound messages with one connector's ``auth_check`` settings.

    Build one per connector (it holds the DNS resolver and its cache) and call :meth:`verify`
    for each message; it never raises for anything the message or DNS does.
    """

    def __init__(self, cfg: AuthCheck, *, log: logging.Logger | None = None):
        self.cfg = cfg
        self.log = log or logging.getLogger("gateway.mailauth")
        self.resolver = Resolver(cfg.nameservers(), cfg.timeout)

    async def verify(self, raw: bytes, ip: str, helo: str, mail_from: str, *, connector: str = "") -> AuthResults:
        """SPF for (``ip``, ``helo``, ``mail_from``), DKIM and DMARC for ``raw``.

        ``ip`` may be empty (mail fetched over IMAP/POP3): SPF is then ``none``.
        """
        cfg = self.cfg
        base = AuthResults(cfg.authserv_id, mail_from=mail_from, helo=helo)
        if cfg.policy == "off":
            return base
        spf_job = asyncio.to_thread(self.check_spf, ip, helo, mail_from) if cfg.spf else _none_spf()
        dkim_job = asyncio.to_thread(self.check_dkim, raw) if cfg.dkim else _no_signatures()
        (spf_result, identity, spf_domain, spf_reason), signatures = await asyncio.gather(spf_job, dkim_job)
        checked = tuple(name for name, on in (("spf", cfg.spf), ("dkim", cfg.dkim), ("dmarc", cfg.dmarc)) if on)
        results = AuthResults(
            cfg.authserv_id, spf=spf_result, dkim=summarize(signatures), spf_identity=identity,
            spf_domain=spf_domain, mail_from=mail_from, helo=helo, spf_reason=spf_reason,
            signatures=tuple(signatures), checked=checked)
        if cfg.dmarc:
            results = await asyncio.to_thread(self.check_dmarc, raw, results)
        bad = results.dmarc in ("fail", "temperror") or "temperror" in (results.spf, results.dkim)
        event(self.log, "mailauth.checked", logging.INFO if bad else logging.DEBUG, connector=connector,
              spf=results.spf, dkim=results.dkim, dmarc=results.dmarc, from_domain=results.from_domain,
              disposition=results.dmarc_disposition)
        return results

    def check_dmarc(self, raw: bytes, results: AuthResults) -> AuthResults:
        """``results`` with DMARC for every author domain; the strictest decides. Blocking."""
        domains, problem = from_header_domains(raw)
        dkim_results = [(s.domain, s.result) for s in results.signatures]
        outcomes = [(domain, dmarc.evaluate(self.resolver, domain, results.spf, results.spf_domain, dkim_results))
                    for domain in domains]
        if outcomes:
            from_domain, outcome = dmarc.strictest(outcomes)
        else:
            from_domain, outcome = "", dmarc.DmarcOutcome("none")
        if problem and outcome.result not in ("fail", "temperror"):
            # The author we could not read may be the one a policy protects.
            outcome = dmarc.DmarcOutcome("permerror", outcome.policy, outcome.disposition, problem)
        return dataclasses.replace(
            results, dmarc=outcome.result, from_domain=from_domain, from_domains=tuple(domains),
            author_problem=problem, dmarc_policy=outcome.policy, dmarc_disposition=outcome.disposition,
            dmarc_reason=outcome.reason)

    def check_spf(self, ip: str, helo: str, mail_from: str) -> tuple[str, str, str, str]:
        """(result, identity, domain, reason). Blocking: run it on a worker thread."""
        identity = "mailfrom" if mail_from else "helo"
        domain = (mail_from.rpartition("@")[2] if mail_from else helo).lower()
        if not ip:
            return "none", identity, domain, "no client IP"
        try:
            query = spf.query(i=ip, s=mail_from, h=helo, timeout=self.cfg.timeout, querytime=SPF_BUDGET)
            with spf_resolver(self.resolver):
                result, _code, explanation = query.check()
        except spf.TempError as exc:
            return "temperror", identity, domain, str(exc)
        except spf.PermError as exc:
            return "permerror", identity, domain, str(exc)
        except Exception as exc:  # pyspf on hostile input: an error of the record, not ours
            self.log.debug("mailauth.spf_crash", exc_info=exc)
            return "permerror", identity, domain, f"SPF evaluation failed ({type(exc).__name__})"
        result = str(result).lower()
        if result not in RESULTS:
            result = "permerror"
        return result, identity, str(query.o or domain).lower(), str(explanation)

    def check_dkim(self, raw: bytes) -> list[DkimSignatureResult]:
        """One result per DKIM-Signature (at most :data:`MAX_SIGNATURES`). Blocking."""
        fields, _ = split_head(raw)
        sig_fields = [f for f in fields if field_name(f) == "dkim-signature"]
        if not sig_fields:
            return []
        try:
            verifier = dkim.DKIM(raw, logger=_DkimLog(self.log), minkey=1024, timeout=int(self.cfg.timeout) or 1)
        except Exception as exc:
            return [DkimSignatureResult("permerror", reason=f"unparsable message ({type(exc).__name__})")]
        return [self._one_signature(verifier, idx, sig_field) if idx < MAX_SIGNATURES
                else DkimSignatureResult("neutral", *_sig_tags(sig_field), reason="not checked: too many signatures")
                for idx, sig_field in enumerate(sig_fields)]

    def _one_signature(self, verifier: Any, idx: int, sig_field: bytes) -> DkimSignatureResult:
        tags = _sig_tags(sig_field)
        if tags[2] in REFUSED_ALGORITHMS:
            return DkimSignatureResult("policy", *tags, reason=f"{tags[2]} is not accepted (RFC 8301)")
        key: dict[str, str] = {}

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
            records = [r for r in self.resolver.txt(name.decode("ascii", "replace").rstrip("."))
                       if b"p=" in r or r.startswith(b"v=DKIM1")]
            if len(records) != 1:
                key["problem"] = "no key published" if not records else "several keys published"
                return None
            try:
                dkim.evaluate_pk(name, records[0])
            except Exception as exc:
                key["problem"] = f"unusable key ({exc.__class__.__name__})"
            key["found"] = "yes"
            return records[0]

        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except DnsTemporaryError as exc:
            return DkimSignatureResult("temperror", *tags, reason=str(exc))
        except dkim.KeyFormatError as exc:  # e.g. an RSA key under 1024 bits (RFC 8301)
            return DkimSignatureResult("permerror", *tags, reason=str(exc).split(" (", 1)[0][:120])
        except dkim.DKIMException as exc:
            # Before the key lookup: the signature itself is malformed (or expired).
            result = "fail" if "found" in key else "permerror"
            return DkimSignatureResult(result, *tags, reason=str(exc).split(" (", 1)[0][:120])
        except Exception as exc:  # dkimpy on hostile input
            self.log.debug("mailauth.dkim_crash", exc_info=exc)
            return DkimSignatureResult("permerror", *tags, reason=f"verification failed ({type(exc).__name__})")
        if ok:
            unsigned = _unsigned_body_bytes(verifier)
            if unsigned:
                return DkimSignatureResult("policy", *tags,
                                           reason=f"l= leaves {unsigned} bytes of the body unsigned")
            return DkimSignatureResult("pass", *tags)
        if "problem" in key:
            return DkimSignatureResult("permerror", *tags, reason=key["problem"])
        return DkimSignatureResult("fail", *tags, reason="signature did not verify")


async def _none_spf() -> tuple[str, str, str, str]:
    return "none", "mailfrom", "", ""


async def _no_signatures() -> list[DkimSignatureResult]:
    return []


def _unsigned_body_bytes(verifier: Any) -> int:
    """How much of the canonical body the signature just verified leaves out with its l= tag."""
    sig = verifier.signature_fields
    if b"l" not in sig:
        return 0
    canonical = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple")).canonicalize_body(verifier.body)
    return max(0, len(canonical) - int(sig[b"l"]))


def _sig_tags(sig_field: bytes) -> tuple[str, str, str, str]:
    """(d, s, a, first 8 of b) of a DKIM-Signature field, best effort."""
    try:
        value = sig_field.split(b":", 1)[1]
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except Exception:
        return "", "", "", ""

    def text(name: bytes, limit: int = 253) -> str:
        raw = tags.get(name, b"")
        return _CONTROL.sub("", raw.decode("ascii", "replace").strip())[:limit]

    b = re.sub(r"\s+", "", text(b"b", 100_000))[:8]
    return text(b"d").lower(), text(b"s"), text(b"a", 40).lower(), b


class _DkimLog:
    """dkimpy logs key and signature problems at ERROR; for us they are the sender's, not ours."""

    def __init__(self, log: logging.Logger):
        self.log = log

    def _debug(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log.debug("mailauth.dkimpy %s", str(msg)[:300])

    debug = info = warning = error = _debug


def summarize(signatures: Sequence[DkimSignatureResult]) -> str:
    """One DKIM word for a message: pass if any signature passes, else the most telling result."""
    found = {s.result for s in signatures}
    for result in ("pass", "temperror", "fail", "policy", "permerror", "neutral"):
        if result in found:
            return result
    return "none"


def from_header_domains(raw: bytes) -> tuple[list[str], str]:
    """(every author domain, each once; why the author cannot be told, or "").

    RFC 5322 3.6 allows exactly one From field; it may hold several addresses. Two parsers
    read it (email's compat32 ``getaddresses`` and its RFC 5322 header registry): what either
    finds is an author, and a disagreement, a defect or an address without a valid domain is a
    problem, since a mail client may show the author the other parser found.
    """
    try:
        fields = [f for f in split_head(raw)[0] if field_name(f) == "from"]
    except Exception:
        return [], "unparsable header"
    if not fields:
        return [], "no From header"
    if any(len(f) > MAX_FROM_LENGTH for f in fields):
        return [], "From header too long"
    # RFC 6532 allows UTF-8 in headers; anything else undecodable is replaced, never guessed.
    block = b"".join(fields).decode("utf-8", "replace") + "\r\n"
    problems: list[str] = []
    if len(fields) > 1:
        problems.append(f"{len(fields)} From headers")
    try:
        loose = [addr for _, addr in getaddresses([str(v) for v in _HEADER_PARSER.parsestr(block).get_all("From")
                                                   or []])]
        strict: list[str] = []
        for value in _STRICT_HEADER_PARSER.parsestr(block).get_all("From") or []:
            if any(isinstance(d, InvalidHeaderDefect | HeaderMissingRequiredValue) for d in value.defects):
                problems.append("unparsable From address")
            strict.extend(f"{a.username}@{a.domain}" if a.domain else a.username for a in value.addresses)
    except Exception:
        return [], "unparsable From header"
    addresses = list(dict.fromkeys(a for a in [*loose, *strict] if a))
    if not addresses:
        problems.append("no From address")
    domains: list[str] = []
    for address in addresses:
        domain = _author_domain(address)
        if domain:
            domains.append(domain)
        else:
            problems.append("a From address without a valid domain")
    if {_author_domain(a) for a in loose if a} != {_author_domain(a) for a in strict if a}:
        problems.append("ambiguous From address")
    domains = list(dict.fromkeys(domains))
    if len(domains) > MAX_AUTHOR_DOMAINS:
        problems.append(f"{len(domains)} author domains")
        domains = domains[:MAX_AUTHOR_DOMAINS]
    return domains, ", ".join(dict.fromkeys(problems))


def _author_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return ""
    try:
        ascii_domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""
    if not re.fullmatch(r"[a-z0-9_.-]+", ascii_domain) or ".." in ascii_domain:
        return ""
    return ascii_domain


async def verify_message(raw: bytes, ip: str, helo: str, mail_from: str, cfg: AuthCheck) -> AuthResults:
    """One-off :meth:`Verifier.verify` (a connector keeps a :class:`Verifier` instead)."""
    return await Verifier(cfg).verify(raw, ip, helo, mail_from)


# --- what the results mean -----------------------------------------------------------------


def smtp_reply(results: AuthResults, cfg: AuthCheck) -> str | None:
    """The SMTP answer the connector's policy gives, or None to accept (and tag).

    Only ``policy: reject`` refuses. With DMARC on, DMARC decides: ``fail`` under a reject
    disposition (of any author domain) → 550 5.7.1, ``temperror`` → 451 (the sender retries);
    a message whose author cannot be told → 550 5.7.1; quarantine is accepted and tagged. With
    DMARC off, an SPF ``fail`` (the domain's own ``-all``) → 550 5.7.23 and an SPF ``temperror``
    → 451 4.7.24. DKIM alone never refuses (RFC 6376 6.3: a broken signature
    is as if there were none).
    """
    if cfg.policy != "reject":
        return None
    if cfg.dmarc and "dmarc" in results.checked:
        if results.dmarc == "fail" and results.dmarc_disposition == "reject":
            return R_DMARC_REJECT.format(domain=_safe_domain(results.from_domain))
        if results.dmarc == "temperror":
            return R_TEMPERROR
        if results.author_problem:
            return R_AUTHOR_UNKNOWN.format(reason=_CONTROL.sub(" ", results.author_problem)[:120])
        return None
    if cfg.spf and "spf" in results.checked:
        if results.spf == "fail":
            return R_SPF_FAIL.format(domain=_safe_domain(results.spf_domain))
        if results.spf == "temperror":
            return R_SPF_TEMPERROR
    return None


def _safe_domain(domain: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "?", domain)[:253] or "?"


def add_authentication_results(raw: bytes, results: AuthResults) -> bytes:
    """``raw`` with our Authentication-Results header on top.

    Headers that claim our authserv-id are removed first (RFC 8601 5: a sender could forge
    them); other hosts' headers stay. The line ending follows the message's own.
    """
    fields, rest = split_head(raw)
    linesep = b"\r\n" if (fields and fields[0].endswith(b"\r\n")) or rest.startswith(b"\r\n") else b"\n"
    ours = results.authserv_id.lower()
    kept = [f for f in fields
            if not (field_name(f) == "authentication-results" and _authserv_id(field_value(f)) == ours)]
    header = ("Authentication-Results: " + results.header_value()).encode("ascii", "replace")
    header = header.replace(b"\r\n", linesep) + linesep
    if not fields and not rest:
        return header + linesep
    return header + b"".join(kept) + rest


def _authserv_id(value: str) -> str:
    # authserv-id [ CFWS authres-version ] ; …  (comments stripped)
    head = re.sub(r"\([^)]*\)", " ", value.split(";", 1)[0]).strip()
    return head.split()[0].lower() if head else ""
