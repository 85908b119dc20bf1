"""Inbound verification: SPF (pyspf), DKIM (dkimpy, every signature), DMARC; the
Authentication-Results header (RFC 8601); the SMTP answer a policy gives for the results.

Results use RFC 8601's words: pass, fail, softfail, neutral, none, temperror, permerror. A
check that is switched off reports ``none`` and is left out of the header. DNS failures are
``temperror`` everywhere (see :mod:`connectors.mailauth.dns`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from typing import Any

import dkim  # type: ignore[import-untyped]
import spf  # type: ignore[import-untyped]
from dkim.util import parse_tag_value  # type: ignore[import-untyped]

from connectors.mailauth import dmarc
from connectors.mailauth.config import AuthCheck
from connectors.mailauth.dns import DnsTemporaryError, Resolver, spf_resolver
from connectors.mailauth.mime import field_name, field_value, split_head
from gateway.logs import event

#: RFC 7208 4.6.4: an SPF evaluation may take this long in all (each query: ``timeout``).
SPF_BUDGET = 20.0
#: Signatures verified per message; more are reported as not checked (a DNS-amplification guard).
MAX_SIGNATURES = 8
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")

R_DMARC_REJECT = "550 5.7.1 Message rejected: it fails the DMARC policy of {domain}"
R_SPF_FAIL = "550 5.7.23 Message rejected: SPF validation failed for {domain}"
R_TEMPERROR = "451 4.7.1 Sender authentication could not complete (DNS), try again later"
R_SPF_TEMPERROR = "451 4.7.24 SPF validation could not complete (DNS), try again later"

_HEADER_PARSER = BytesHeaderParser(policy=compat32)
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
            from_domain, problem = from_header_domain(raw)
            if problem:
                outcome = dmarc.DmarcOutcome("permerror", reason=problem)
            else:
                outcome = await asyncio.to_thread(
                    dmarc.evaluate, self.resolver, from_domain, spf_result, spf_domain,
                    [(s.domain, s.result) for s in signatures])
            results = dataclasses.replace(
                results, dmarc=outcome.result, from_domain=from_domain, dmarc_policy=outcome.policy,
                dmarc_disposition=outcome.disposition, dmarc_reason=outcome.reason)
        bad = results.dmarc in ("fail", "temperror") or "temperror" in (results.spf, results.dkim)
        event(self.log, "mailauth.checked", logging.INFO if bad else logging.DEBUG, connector=connector,
              spf=results.spf, dkim=results.dkim, dmarc=results.dmarc, from_domain=results.from_domain,
              disposition=results.dmarc_disposition)
        return results

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
            return DkimSignatureResult("pass", *tags)
        if "problem" in key:
            return DkimSignatureResult("permerror", *tags, reason=key["problem"])
        return DkimSignatureResult("fail", *tags, reason="signature did not verify")


async def _none_spf() -> tuple[str, str, str, str]:
    return "none", "mailfrom", "", ""


async def _no_signatures() -> list[DkimSignatureResult]:
    return []


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
    for result in ("pass", "temperror", "fail", "permerror", "neutral"):
        if result in found:
            return result
    return "none"


def from_header_domain(raw: bytes) -> tuple[str, str]:
    """(the From domain, "") or ("", why DMARC cannot apply): RFC 7489 6.6.1 needs exactly one."""
    try:
        headers = _HEADER_PARSER.parsebytes(raw)
        values = headers.get_all("From") or []
        addresses = [addr for _, addr in getaddresses([str(v) for v in values])]
    except Exception:
        return "", "unparsable From header"
    if len(values) != 1 or len(addresses) != 1:
        return "", f"{len(addresses)} From addresses in {len(values)} From headers (exactly one is needed)"
    local, at, domain = addresses[0].rpartition("@")
    if not at or not local or not domain:
        return "", "the From address has no domain"
    try:
        ascii_domain = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return "", "the From domain is not a valid domain name"
    if not re.fullmatch(r"[a-z0-9_.-]+", ascii_domain) or ".." in ascii_domain:
        return "", "the From domain is not a valid domain name"
    return ascii_domain, ""


async def verify_message(raw: bytes, ip: str, helo: str, mail_from: str, cfg: AuthCheck) -> AuthResults:
    """One-off :meth:`Verifier.verify` (a connector keeps a :class:`Verifier` instead)."""
    return await Verifier(cfg).verify(raw, ip, helo, mail_from)


# --- what the results mean -----------------------------------------------------------------


def smtp_reply(results: AuthResults, cfg: AuthCheck) -> str | None:
    """The SMTP answer the connector's policy gives, or None to accept (and tag).

    Only ``policy: reject`` refuses. With DMARC on, DMARC decides: ``fail`` under a reject
    disposition → 550 5.7.1, ``temperror`` → 451 (the sender retries); quarantine is accepted
    and tagged. With DMARC off, an SPF ``fail`` (the domain's own ``-all``) → 550 5.7.23 and an
    SPF ``temperror`` → 451 4.7.24. DKIM alone never refuses (RFC 6376 6.3: a broken signature
    is as if there were none).
    """
    if cfg.policy != "reject":
        return None
    if cfg.dmarc and "dmarc" in results.checked:
        if results.dmarc == "fail" and results.dmarc_disposition == "reject":
            return R_DMARC_REJECT.format(domain=_safe_domain(results.from_domain))
        if results.dmarc == "temperror":
            return R_TEMPERROR
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
