"""Sealing outgoing mail, end to end through a real in-process gateway: the ``smtp`` connector
signs with DKIM what it hands to a real relay (aiosmtpd), the ``maildir`` connector stores
S/MIME-signed and PGP-encrypted messages. What arrives is checked with independent tools: dkimpy,
the ``openssl`` binary, the ``gpg`` binary.
"""

from __future__ import annotations

import json
import mailbox
import os
import shutil
import subprocess
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import dkim
import httpx
import pytest

from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_smtp_peers import Relay, swaks
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

pytestmark = pytest.mark.integration

RETRY_FAST = "on_failure: {retry: {attempts: 400, initial: 0.05s, max: 0.3s}}"


async def post(port: int, path: str, payload: dict[str, Any]) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"http://127.0.0.1:{port}{path}", json=payload)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def dnsfunc_for(records: dict[str, str]) -> Any:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value else None
    return dnsfunc


def stored(path: Path) -> list[bytes]:
    if not path.exists():
        return []
    box = mailbox.Maildir(str(path), factory=None, create=False)
    return [(path / "new" / key).read_bytes() for key in box.keys()]


async def test_smtp_outbound_signs_built_and_forwarded_mail_with_dkim(tmp_path: Path) -> None:
    gw_key, sender_key = rsa_key(), rsa_key()
    rest, mx = free_port(), free_port()
    with stub_dns() as dns, Relay() as relay:
        dns.txt("sel._domainkey.example.test", dkim_txt(sender_key))
        dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        ops = {"type": "smtp", "url": f"smtp://127.0.0.1:{relay.port}", "starttls": "off", "timeout": "5s",
               "sender": "Gateway <alerts@gw.test>",
               "dkim": {"domain": "gw.test", "selector": "gw", "key": {"file": secret_file(tmp_path, "dkim.pem",
                                                                                            pem(gw_key))}}}
        inbound = {"type": "smtp", "listen": f"127.0.0.1:{mx}", "recipients": ["gw.test"],
                   "auth_check": {"policy": "tag", "resolver": dns.address, "timeout": "0.5s",
                                  "authserv_id": "mx.gw.test"}}
        yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest}", auth: {{type: none}}}}
  mx: {json.dumps(inbound)}
  ops: {json.dumps(ops)}
routes:
  - name: alerts
    from: api
    match: {{subject: "/alerts/*"}}
    to: [{{connector: ops, to: ["ops@example.com"], subject: "Boiler {{{{ data.site }}}}", text: "93 °C"}}]
    {RETRY_FAST}
  - name: must-be-signed
    from: api
    match: {{subject: "/signed/*"}}
    to: [{{connector: ops, to: ["ops@example.com"], subject: "x", seal: {{sign: true}}}}]
  - name: pass-on
    from: mx
    to: [{{connector: ops, to: ["oncall@example.com"]}}]
    {RETRY_FAST}
"""
        async with running_gateway(tmp_path, yaml) as rt:
            await post(rest, "/alerts/boiler", {"site": "north"})
            refused = await post(rest, "/signed/boiler", {"site": "north"})
            original = wire(message(to="ops@gw.test"))
            original = dkim.sign(original, b"sel", b"example.test", pem(sender_key, "pkcs1").encode()) + original
            (tmp_path / "in.eml").write_bytes(original)
            rc, out = await swaks("--server", f"127.0.0.1:{mx}", "--from", "alice@example.test", "--to",
                                  "ops@gw.test", "--data", f"@{tmp_path / 'in.eml'}")
            assert rc == 0, out
            await wait_for(lambda: len(relay.handler.messages) == 2, what="two messages at the relay")
            await wait_for(rt.spool.dead_letters, what="the dead letter")
            dead = await rt.spool.dead_letters()
    assert [d.envelope_id for d in dead] == [refused]
    assert "asks to sign but the connector has no smime or pgp settings" in dead[0].last_error
    by_rcpt = {m.rcpt_tos[0]: bytes(m.original_content or b"") for m in relay.handler.messages}
    dnsfunc = dnsfunc_for({"gw._domainkey.gw.test": dkim_txt(gw_key),
                           "sel._domainkey.example.test": dkim_txt(sender_key)})
    built = by_rcpt["ops@example.com"]
    assert built.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=gw.test;")
    assert dkim.verify(built, dnsfunc=dnsfunc)
    assert b"Subject: Boiler north" in built
    assert not dkim.verify(built.replace(b"Boiler north", b"Boiler south"), dnsfunc=dnsfunc)
    # Passed on unchanged but for our Authentication-Results and our signature on top; the
    # sender's own signature still verifies.
    forwarded = by_rcpt["oncall@example.com"]
    assert forwarded.endswith(original + b"\r\n")  # swaks ends DATA with one more CRLF
    checker = dkim.DKIM(forwarded)
    assert checker.verify(idx=0, dnsfunc=dnsfunc) and checker.signature_fields[b"d"] == b"gw.test"
    assert checker.verify(idx=1, dnsfunc=dnsfunc) and checker.signature_fields[b"d"] == b"example.test"
    assert b"Authentication-Results: mx.gw.test;\r\n\tspf=none" in forwarded


# --- Maildir: S/MIME and PGP -------------------------------------------------------------------


class Keys:
    """An S/MIME CA with the gateway's and bob's certificates; GnuPG keys for the gateway and bob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        ca = make_ca()
        self.gw = make_mail_cert(ca, "gw@example.test")
        bob = make_mail_cert(ca, "bob@x.test")
        (root / "ca.pem").write_bytes(ca.cert_pem)
        (root / "gw.pem").write_bytes(self.gw.cert_pem + ca.cert_pem)
        (root / "bob.pem").write_bytes(bob.cert_pem)
        (root / "bob.key").write_text(bob.key_pem)
        self.maker, self.bob = GpgHome(), GpgHome()
        self.gw_fpr = self.maker.generate("gw@example.test", passphrase="pgp pass")
        bob_fpr = self.bob.generate("bob@x.test")
        self.bob.import_(self.maker.export(self.gw_fpr))
        self.pgp_keys = self.maker.export(self.gw_fpr, secret=True, passphrase="pgp pass") + self.bob.export(bob_fpr)

    def openssl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["openssl", *args], capture_output=True, timeout=60, check=False)

    def close(self) -> None:
        self.maker.close()
        self.bob.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    made = Keys(tmp_path_factory.mktemp("keys"))
    yield made
    made.close()


@pytest.fixture
def pgp_home() -> Iterator[str]:
    home = short_home()
    yield home
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)


def maildir_yaml(tmp_path: Path, rest: int, keys: Keys, *, cert: str, home: str) -> str:
    signed = {"type": "maildir", "path": str(tmp_path / "signed"), "sender": "Gateway <gw@example.test>",
              "smime": {"cert": cert, "key": {"file": secret_file(tmp_path, "gw.key", keys.gw.key_pem)}}}
    sealed = {"type": "maildir", "path": str(tmp_path / "sealed"), "sender": "Gateway <gw@example.test>",
              "pgp": {"home": home, "keys": {"file": secret_file(tmp_path, "keys.asc", keys.pgp_keys)},
                      "sign_key": keys.gw_fpr, "passphrase": {"file": secret_file(tmp_path, "pp", "pgp pass")},
                      "encrypt": True}}
    yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest}", auth: {{type: none}}}}
  signed: {json.dumps(signed)}
  sealed: {json.dumps(sealed)}
routes:
  - name: payroll
    from: api
    to:
      - {{connector: signed, to: ["bob@x.test"], subject: "Payroll {{{{ data.run }}}}", text: "Total 93 °C"}}
      - {{connector: sealed, to: ["bob@x.test"], subject: "Payroll {{{{ data.run }}}}", text: "Total 93 °C"}}
    {RETRY_FAST}
"""
    return yaml


async def test_maildir_stores_smime_signed_and_pgp_encrypted_mail(tmp_path: Path, keys: Keys,
                                                                   pgp_home: str) -> None:
    rest = free_port()
    yaml = maildir_yaml(tmp_path, rest, keys, cert=str(keys.root / "gw.pem"), home=pgp_home)
    async with running_gateway(tmp_path, yaml):
        await post(rest, "/payroll", {"run": "2025-06"})
        await wait_for(lambda: len(stored(tmp_path / "signed")) == 1 and len(stored(tmp_path / "sealed")) == 1,
                       what="one message in each Maildir")
    (signed,), (sealed,) = stored(tmp_path / "signed"), stored(tmp_path / "sealed")
    assert b"\r\n" not in signed and b"\r\n" not in sealed  # Maildir files keep local line endings

    assert b'multipart/signed; protocol="application/pkcs7-signature"; micalg="sha-256"' in signed
    (tmp_path / "signed.eml").write_bytes(signed)
    done = keys.openssl("smime", "-verify", "-in", str(tmp_path / "signed.eml"), "-CAfile",
                        str(keys.root / "ca.pem"))
    assert done.returncode == 0 and b"Verification successful" in done.stderr, done.stderr.decode()
    content = BytesParser(policy=compat32).parsebytes(done.stdout).get_payload(decode=True)
    assert content.decode("utf-8").strip() == "Total 93 °C"
    tampered = tmp_path / "tampered.eml"
    tampered.write_bytes(signed.replace(b"Total", b"T0tal"))
    assert keys.openssl("smime", "-verify", "-in", str(tampered), "-CAfile", str(keys.root / "ca.pem")).returncode

    head = sealed.split(b"\n\n", 1)[0]
    assert b"Subject: Payroll 2025-06" in head and b"multipart/encrypted" in head
    assert b"Total" not in sealed and "93 °C".encode() not in sealed
    encrypted = BytesParser(policy=compat32).parsebytes(sealed).get_payload()[1].get_payload()
    done = keys.bob.run("--status-fd", "2", "--decrypt", input=encrypted.encode(), check=False)
    status = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0 and "DECRYPTION_OKAY" in status and f"VALIDSIG {keys.gw_fpr}" in status, status
    assert b"Total 93" in done.stdout


async def test_a_sealer_that_cannot_work_keeps_mail_waiting_never_unsigned(tmp_path: Path, keys: Keys,
                                                                           pgp_home: str) -> None:
    """The S/MIME certificate is missing when the gateway starts: the connector is down with the
    reason, the message waits in the spool; once the file is there it leaves signed."""
    rest = free_port()
    cert = tmp_path / "later" / "gw.pem"
    yaml = maildir_yaml(tmp_path, rest, keys, cert=str(cert), home=pgp_home)
    async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
        def signed_down() -> bool:
            detail = rt.readiness()[1]["connectors"]["signed"]
            return not detail["up"] and "sealing is not usable: cannot read certificates" in detail["detail"]
        await wait_for(signed_down, what="the signed maildir reported down")
        await post(rest, "/payroll", {"run": "late"})
        await wait_for(lambda: len(stored(tmp_path / "sealed")) == 1, what="the PGP copy")
        assert stored(tmp_path / "signed") == []
        cert.parent.mkdir()
        cert.write_bytes((keys.root / "gw.pem").read_bytes())
        await wait_for(lambda: len(stored(tmp_path / "signed")) == 1,
                       timeout=20, what="the signed copy after the fix")
        await wait_for(lambda: rt.readiness()[1]["connectors"]["signed"]["up"], what="the connector up again")
        assert await rt.spool.dead_letters() == []
    assert b"multipart/signed" in stored(tmp_path / "signed")[0]
