"""DNS for the checks: one dnspython resolver per connector, and the hook that makes pyspf use it.

Every lookup either answers (possibly with nothing: NXDOMAIN and NODATA are empty answers) or
raises :class:`DnsTemporaryError` (timeout, SERVFAIL, REFUSED, no server reachable). The
checks turn the latter into ``temperror``, so a DNS failure never becomes a permanent
rejection. Lookups block; callers run them on a worker thread.

pyspf looks names up through its module-level ``spf.DNSLookup``. We replace it once with a
dispatcher that uses the resolver set in a context variable for the current check and falls
back to pyspf's own lookup otherwise, so several connectors (and tests) with different
resolvers can check concurrently.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf  # type: ignore[import-untyped]

#: Cached answers per resolver (dnspython honours the TTLs).
CACHE_ENTRIES = 4096


class DnsTemporaryError(Exception):
    """The lookup could not be answered now (retrying later may help)."""


class Resolver:
    """A blocking dnspython resolver with our error mapping and a TTL cache."""

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None, timeout: float):
        if nameservers:
            self._r = dns.resolver.Resolver(configure=False)
            self._r.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
        else:
            try:
                self._r = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ValueError("no DNS resolver configured on this host: set auth_check.resolver") from exc
        self._r.timeout = timeout
        self._r.lifetime = timeout
        # A 2048-bit DKIM key does not fit the 512 bytes of plain DNS over UDP.
        self._r.use_edns(0, 0, 1232)
        self._r.cache = dns.resolver.LRUCache(CACHE_ENTRIES)

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``rdtype`` at ``name`` (empty when there are none)."""
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return []  # not a valid DNS name: nothing can be published there
        try:
            answer = self._r.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN):
            return []
        except dns.exception.Timeout as exc:
            raise DnsTemporaryError(f"DNS timeout looking up {name} {rdtype}") from exc
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(f"DNS servers failed for {name} {rdtype} (SERVFAIL or REFUSED)") from exc
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(f"DNS error for {name} {rdtype}: {type(exc).__name__}") from exc
        return list(answer.rrset) if answer.rrset is not None else []

    def txt(self, name: str) -> list[bytes]:
        """TXT records at ``name``, each with its character-strings joined."""
        return [b"".join(r.strings) for r in self.query(name, "TXT")]

    def spf_lookup(self, name: str, qtype: str) -> list[tuple[tuple[str, str], Any]]:
        """pyspf's ``DNSLookup`` answer shape: ``[((name, type), value), …]``."""
        try:
            records = self.query(name, qtype)
        except DnsTemporaryError as exc:
            raise spf.TempError(str(exc)) from exc
        out: list[tuple[tuple[str, str], Any]] = []
        for r in records:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), r.address))
            elif qtype == "MX":
                out.append(((name, qtype), (r.preference, r.exchange.to_text(omit_final_dot=True))))
            elif qtype == "PTR":
                out.append(((name, qtype), r.target.to_text(omit_final_dot=True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), list(r.strings)))
        return out


_spf_resolver: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("mailauth_spf_resolver",
                                                                                 default=None)
_pyspf_lookup = spf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> Any:
    resolver = _spf_resolver.get()
    if resolver is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return resolver.spf_lookup(name, qtype)


if getattr(spf.DNSLookup, "__name__", "") != "_dispatch":
    spf.DNSLookup = _dispatch


@contextmanager
def spf_resolver(resolver: Resolver) -> Iterator[None]:
    """pyspf queries made inside this block (on this thread/context) go to ``resolver``."""
    token = _spf_resolver.set(resolver)
    try:
        yield
    finally:
        _spf_resolver.reset(token)
