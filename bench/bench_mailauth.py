"""Per-message cost of mail authentication: verifying inbound, sealing outbound.

    .venv/bin/python -m bench.bench_mailauth

Inbound: ``Verifier.verify`` (SPF + DKIM + DMARC through a stub DNS server on 127.0.0.1, its
answers cached after the first message), one at a time and 16 at once, beside the baseline of a
bare ``dkim.verify`` with the key in a dict (the cryptography alone). Outbound: ``Sealer.seal``
for each kind of sealing, beside the bare library call it wraps (dkimpy, cryptography's PKCS#7
builder, one gpg run). Numbers are medians in milliseconds per message on this machine.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import dkim
import gnupg
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connectors.mailauth import AuthCheck, Sealer, SealSettings, Verifier
from gateway.config.yamlsrc import FromEnv
from tests.mailauth_support import (
    GpgHome,
    dkim_txt,
    make_ca,
    make_mail_cert,
    message,
    pem,
    rsa_key,
    short_home,
    stub_dns,
    wire,
)

ROUNDS = 200


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:8.2f} ms"


async def timed(fn: Callable[[], Awaitable[object]], rounds: int = ROUNDS) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def timed_sync(fn: Callable[[], object], rounds: int = ROUNDS) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def inbound() -> None:
    key = rsa_key()
    raw = wire(message(text="Temperature 93 C at site north.\n" * 40))
    raw = dkim.sign(raw, b"sel", b"example.test", pem(key, "pkcs1").encode()) + raw
    txt = dkim_txt(key).encode()
    with stub_dns() as dns:
        dns.txt("sel._domainkey.example.test", dkim_txt(key))
        dns.txt("example.test", "v=spf1 ip4:192.0.2.0/24 include:_spf.example.test -all")
        dns.txt("_spf.example.test", "v=spf1 ip4:127.0.0.1 -all")
        dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        verifier = Verifier(AuthCheck(resolver=dns.address, timeout=2, authserv_id="mx.bench"))

        async def one() -> object:
            return await verifier.verify(raw, "127.0.0.1", "mail.example.test", "alice@example.test")

        first = await one()
        assert (first.spf, first.dkim, first.dmarc) == ("pass", "pass", "pass"), first  # type: ignore[attr-defined]
        base = timed_sync(lambda: dkim.verify(raw, dnsfunc=lambda name, timeout=5: txt))
        seq = await timed(one)
        t0 = time.perf_counter()
        batches = 20
        for _ in range(batches):
            await asyncio.gather(*(one() for _ in range(16)))
        per_msg = (time.perf_counter() - t0) / (batches * 16)
    print("inbound (SPF + DKIM rsa-2048 + DMARC, warm DNS cache, 1.3 KB message)")
    print(f"  baseline  dkim.verify, key from a dict        {ms(base)}")
    print(f"  Verifier.verify, one at a time                {ms(seq)}")
    print(f"  Verifier.verify, 16 at once (per message)     {per_msg * 1000:8.2f} ms")


async def outbound(tmp: Path) -> None:
    rsa = rsa_key()
    ca = make_ca()
    gw, bob = make_mail_cert(ca, "gw@example.test"), make_mail_cert(ca, "bob@x.test")
    (tmp / "gw.pem").write_bytes(gw.cert_pem)
    (tmp / "bob.pem").write_bytes(bob.cert_pem)
    msg = message(to="bob@x.test", text="Temperature 93 C at site north.\n" * 40)
    raw = wire(msg)
    maker, bob_home = GpgHome(), GpgHome()
    homes: list[str] = []
    try:
        fpr = maker.generate("gw@example.test")
        bob_fpr = bob_home.generate("bob@x.test")
        keys = maker.export(fpr, secret=True) + bob_home.export(bob_fpr)
        smime = {"cert": str(tmp / "gw.pem"), "key": FromEnv(gw.key_pem), "recipients": str(tmp / "bob.pem")}
        homes.extend([short_home(), short_home()])
        cases = {
            "DKIM rsa-sha256": {"dkim": {"domain": "example.test", "selector": "s", "key": FromEnv(pem(rsa))}},
            "S/MIME sign": {"smime": smime},
            "S/MIME sign + encrypt": {"smime": {**smime, "encrypt": True}},
            "PGP sign": {"pgp": {"home": homes[0], "keys": FromEnv(keys), "sign_key": fpr}},
            "PGP sign + encrypt": {"pgp": {"home": homes[1], "keys": FromEnv(keys), "sign_key": fpr,
                                           "encrypt": True}},
        }
        gpg = gnupg.GPG(gnupghome=maker.path)
        signer = pkcs7.PKCS7SignatureBuilder().set_data(raw).add_signer(gw.cert, gw.key, hashes.SHA256())
        baselines = {
            "DKIM rsa-sha256": lambda: dkim.sign(raw, b"s", b"example.test", pem(rsa, "pkcs1").encode()),
            "S/MIME sign": lambda: signer.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature]),
            "PGP sign": lambda: gpg.sign(raw, keyid=fpr, detach=True),
        }
        print("outbound (1.3 KB text message)")
        for name, cfg in cases.items():
            sealer = Sealer(SealSettings.model_validate(cfg))
            try:
                await sealer.seal(msg)  # opens (PGP: imports keys, starts gpg-agent)
                rounds = 20 if name.startswith("PGP") else ROUNDS
                samples = await timed(lambda s=sealer: s.seal(msg), rounds)  # type: ignore[misc]
            finally:
                await sealer.close()
            if name in baselines:
                base = timed_sync(baselines[name], 20 if name.startswith("PGP") else ROUNDS)
                print(f"  baseline  {name:<34}{ms(base)}")
            print(f"  Sealer    {name:<34}{ms(samples)}")
    finally:
        maker.close()
        bob_home.close()
        for home in homes:
            shutil.rmtree(Path(home).parent, ignore_errors=True)


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mailauth-"))
    try:
        asyncio.run(inbound())
        asyncio.run(outbound(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
