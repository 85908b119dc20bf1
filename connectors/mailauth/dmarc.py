"""DMARC (RFC 7489) on top of the SPF and DKIM results: record discovery, alignment, policy.

The organizational domain comes from the public suffix list that ``publicsuffixlist`` ships
(no download at run time). A DNS failure while looking for the record, or an aligned check that
ended in ``temperror``, makes the result ``temperror`` (retry later), never ``fail``.

A message with several authors (one From with several addresses, or several From fields) is
evaluated for every author domain and gets the strictest outcome (RFC 7489 6.6.1): a spoofed
second author cannot hide behind a first one that passes (:func:`strictest`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from connectors.mailauth.dns import DnsTemporaryError, Resolver

_POLICIES = ("none", "quarantine", "reject")
#: The order in which one author's outcome outweighs another's (:func:`strictest`).
_RESULT_WEIGHT = {"pass": 0, "none": 1, "permerror": 2, "temperror": 3, "fail": 4}
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class DmarcSyntaxError(ValueError):
    """The published record is not valid DMARC."""


@dataclass(frozen=True)
class DmarcRecord:
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DmarcOutcome:
    #: pass / fail / none / temperror / permerror
    result: str
    #: The policy published for the From domain (p=, or sp= for a subdomain); "" when none.
    policy: str = ""
    #: What the policy asks for this message: none / quarantine / reject (pct= applied).
    disposition: str = "none"
    reason: str = ""


@functools.cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """``mail.example.co.uk`` → ``example.co.uk`` (RFC 7489 3.2); a public suffix stays itself."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment: ``s``trict needs the same name, ``r``elaxed the same org domain."""
    domain, from_domain = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not domain or not from_domain:
        return False
    if mode == "s":
        return domain == from_domain
    return organizational_domain(domain) == organizational_domain(from_domain)


def parse_record(text: str) -> DmarcRecord:
    """Tags of one ``v=DMARC1; p=…`` record; raises :class:`DmarcSyntaxError`."""
    parts = [p.strip() for p in text.split(";")]
    if parts[0].replace(" ", "") != "v=DMARC1":
        raise DmarcSyntaxError("the record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise DmarcSyntaxError(f"tag without a value: {part[:40]!r}")
        tags.setdefault(key.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in _POLICIES:
        if "rua" not in tags:  # RFC 7489 6.6.3: without p= only a record with rua= counts (as p=none)
            raise DmarcSyntaxError(f"invalid or missing p= ({p[:20]!r})")
        p = "none"
    sp = tags.get("sp", p).lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DmarcRecord(
        p=p,
        sp=sp if sp in _POLICIES else p,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=min(100, max(0, pct)),
    )


def _lookup(resolver: Resolver, domain: str) -> DmarcRecord | None:
    texts = resolver.txt(f"_dmarc.{domain}")
    records = [t for t in texts if t[:8].upper() == b"V=DMARC1" and t[8:9] in (b"", b";", b" ", b"\t")]
    if len(records) != 1:
        return None  # none, or several: "as if none were published" (RFC 7489 6.6.3)
    return parse_record(records[0].decode("ascii", "replace"))


def evaluate(
    resolver: Resolver,
    from_domain: str,
    spf_result: str,
    spf_domain: str,
    dkim_results: Sequence[tuple[str, str]],
    sample: Callable[[], float] = random.random,
) -> DmarcOutcome:
    """The DMARC result for a message whose From domain is ``from_domain``.

    ``dkim_results`` holds (signing domain d=, result) per signature; ``sample`` decides the
    pct= sampling (a number in [0, 1)).
    """
    org = organizational_domain(from_domain)
    try:
        record = _lookup(resolver, from_domain)
        found_at = from_domain
        if record is None and org != from_domain:
            record, found_at = _lookup(resolver, org), org
    except DnsTemporaryError as exc:
        return DmarcOutcome("temperror", reason=str(exc))
    except DmarcSyntaxError as exc:
        return DmarcOutcome("permerror", reason=str(exc))
    if record is None:
        return DmarcOutcome("none", reason="no DMARC record")
    policy = record.p if found_at == from_domain else record.sp
    spf_aligned = aligned(spf_domain, from_domain, record.aspf)
    dkim_aligned = [result for domain, result in dkim_results if aligned(domain, from_domain, record.adkim)]
    if (spf_aligned and spf_result == "pass") or "pass" in dkim_aligned:
        return DmarcOutcome("pass", policy, "none")
    if (spf_aligned and spf_result == "temperror") or "temperror" in dkim_aligned:
        return DmarcOutcome("temperror", policy, "none", "an aligned check could not complete (DNS)")
    disposition = policy
    if record.pct < 100 and sample() * 100 >= record.pct:
        disposition = _WEAKER[policy]  # RFC 7489 6.6.4: outside the sample, the next weaker policy
    return DmarcOutcome("fail", policy, disposition, "no aligned SPF or DKIM pass")


def strictest(outcomes: Sequence[tuple[str, DmarcOutcome]]) -> tuple[str, DmarcOutcome]:
    """The (author domain, outcome) that decides for a message with several author domains.

    A failure outweighs everything (among failures, the strictest disposition, then policy);
    then temperror (retry), permerror, none; the message passes only when every author passes.
    """
    if not outcomes:
        raise ValueError("no author domain")
    return max(outcomes, key=lambda item: (_RESULT_WEIGHT.get(item[1].result, 2),
                                           _POLICIES.index(item[1].disposition)
                                           if item[1].disposition in _POLICIES else 0,
                                           _POLICIES.index(item[1].policy) if item[1].policy in _POLICIES else 0))
