"""Outbound mail privacy and transport, through a real in-process gateway to real relays (aiosmtpd).

* An encrypted message never names a Bcc recipient to anyone else: each Bcc recipient gets a
  copy of their own. Checked on what arrived with ``openssl cms -cmsout -print`` (S/MIME
  recipient serial numbers) and ``gpg --list-packets`` (OpenPGP key ids).
* 8-bit mail goes with ``BODY=8BITMIME`` to a relay that offers it, and 7-bit (with a DKIM
  signature that still verifies, checked with dkimpy) to one that does not.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import dkim
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.smtp.relay import mail_options
from gateway.contract import PermanentError, TransientError
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_mailauth_outbound import dnsfunc_for, post, secret_file
from tests.integration.test_smtp_peers import Relay, RelayHandler
from tests.mailauth_support import Cert, GpgHome, dkim_txt, make_ca, make_mail_cert, pem, rsa_key, short_home

pytestmark = pytest.mark.integration

RETRY_FAST = "on_failure: {retry: {attempts: 400, initial: 0.05s, max: 0.3s}}"
TO, BCC = "bob@x.test", ["carol@x.test", "dave@x.test"]
PEOPLE = [TO, *BCC]


@dataclass
class SevenBitRelayHandler(RelayHandler):
    """A relay from before RFC 6152: it announces neither 8BITMIME nor SMTPUTF8."""

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [r for r in responses if "8BITMIME" not in r and "SMTPUTF8" not in r]


class People:
    """S/MIME certificates and GnuPG keys for bob, carol and dave."""

    def __init__(self, root: Path) -> None:
        ca = make_ca()
        self.certs: dict[str, Cert] = {a: make_mail_cert(ca, a) for a in PEOPLE}
        (root / "certs").mkdir()
        for address, cert in self.certs.items():
            (root / "certs" / f"{address}.pem").write_bytes(cert.cert_pem)
        self.certs_dir = str(root / "certs")
        self.home = GpgHome()
        fingerprints = [self.home.generate(a) for a in PEOPLE]
        self.public_keys = "".join(self.home.export(f) for f in fingerprints)
        #: address → the key ids (primary and subkeys) gpg may name in an encrypted message
        self.key_ids: dict[str, set[str]] = {}
        for address in PEOPLE:
            out = self.home.run("--with-colons", "--list-keys", f"<{address}>").stdout.decode()
            self.key_ids[address] = {line.split(":")[4] for line in out.splitlines()
                                     if line.startswith(("pub:", "sub:"))}

    def close(self) -> None:
        self.home.close()


@pytest.fixture
def pgp_home() -> Iterator[str]:
    home = short_home()
    yield home
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> Iterator[People]:
    made = People(tmp_path_factory.mktemp("people"))
    yield made
    made.close()


def smime_serials(message: bytes, tmp_path: Path) -> set[int]:
    """The serial numbers of the certificates an S/MIME message is encrypted for (openssl's view)."""
    p7m = tmp_path / "copy.p7m"
    p7m.write_bytes(base64.b64decode(BytesParser(policy=compat32).parsebytes(message).get_payload()))
    done = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(p7m)],
                          capture_output=True, timeout=60, check=True)
    return {int(v, 16) for v in re.findall(r"serialNumber: (?:0x)?([0-9A-Fa-f]+)", done.stdout.decode())}


def pgp_key_ids(message: bytes, home: GpgHome) -> set[str]:
    """The key ids an OpenPGP/MIME message is encrypted to (gpg --list-packets)."""
    armored = BytesParser(policy=compat32).parsebytes(message).get_payload()[1].get_payload()
    done = home.run("--list-only", "--list-packets", input=armored.encode(), check=False)
    return set(re.findall(r"keyid ([0-9A-F]{16})", (done.stdout + done.stderr).decode()))


async def test_each_bcc_recipient_gets_an_encrypted_copy_of_their_own(tmp_path: Path, people: People,
                                                                      pgp_home: str) -> None:
    rest = free_port()
    with Relay() as smime_relay, Relay() as pgp_relay:
        smime = {"type": "smtp", "url": f"smtp://127.0.0.1:{smime_relay.port}", "starttls": "off",
                 "timeout": "5s", "sender": "gw@example.test",
                 "smime": {"sign": False, "encrypt": True, "recipients": people.certs_dir}}
        pgp = {"type": "smtp", "url": f"smtp://127.0.0.1:{pgp_relay.port}", "starttls": "off", "timeout": "5s",
               "sender": "gw@example.test",
               "pgp": {"home": pgp_home, "sign": False, "encrypt": True,
                       "keys": {"file": secret_file(tmp_path, "keys.asc", people.public_keys)}}}
        target = f'to: ["{TO}"], bcc: {json.dumps(BCC)}, subject: "Payroll", text: "Total 93"'
        yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest}", auth: {{type: none}}}}
  smime: {json.dumps(smime)}
  pgp: {json.dumps(pgp)}
routes:
  - name: payroll
    from: api
    to:
      - {{connector: smime, {target}}}
      - {{connector: pgp, {target}}}
    {RETRY_FAST}
"""
        async with running_gateway(tmp_path, yaml):
            await post(rest, "/payroll", {})
            await wait_for(lambda: len(smime_relay.handler.messages) == 3 and len(pgp_relay.handler.messages) == 3,
                           timeout=30, what="three copies at each relay")
    serial = {a: c.cert.serial_number for a, c in people.certs.items()}
    smime_copies = {tuple(m.rcpt_tos): bytes(m.original_content or b"") for m in smime_relay.handler.messages}
    assert sorted(smime_copies) == [(a,) for a in sorted(PEOPLE)]
    for (address,), data in smime_copies.items():
        assert smime_serials(data, tmp_path) == {serial[address]}, address
    pgp_copies = {tuple(m.rcpt_tos): bytes(m.original_content or b"") for m in pgp_relay.handler.messages}
    assert sorted(pgp_copies) == [(a,) for a in sorted(PEOPLE)]
    for (address,), data in pgp_copies.items():
        named = pgp_key_ids(data, people.home)
        assert named and named <= people.key_ids[address], (address, named)
    # bob's copy is the one the To header promises; carol's and dave's name nobody else.
    for data in (*smime_copies.values(), *pgp_copies.values()):
        head = data.split(b"\r\n\r\n", 1)[0]
        assert b"To: bob@x.test" in head and b"carol" not in head and b"dave" not in head


async def test_8bit_mail_declares_8bitmime_or_is_made_7bit_before_dkim(tmp_path: Path) -> None:
    key = rsa_key()
    rest = free_port()
    with Relay() as modern, Relay(SevenBitRelayHandler()) as old:
        def smtp(port: int) -> dict[str, object]:
            return {"type": "smtp", "url": f"smtp://127.0.0.1:{port}", "starttls": "off", "timeout": "5s",
                    "sender": "Gateway <alerts@gw.test>",
                    "dkim": {"domain": "gw.test", "selector": "gw",
                             "key": {"file": secret_file(tmp_path, "dkim.pem", pem(key))}}}
        target = 'to: ["ops@example.com"], subject: "Kessel", text: "Temperatur 93 °C, Größe über Grenzwert"'
        yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest}", auth: {{type: none}}}}
  modern: {json.dumps(smtp(modern.port))}
  old: {json.dumps(smtp(old.port))}
routes:
  - name: alerts
    from: api
    to:
      - {{connector: modern, {target}}}
      - {{connector: old, {target}}}
    {RETRY_FAST}
"""
        async with running_gateway(tmp_path, yaml) as rt:
            await post(rest, "/alerts", {})
            await wait_for(lambda: len(modern.handler.messages) == 1 and len(old.handler.messages) == 1,
                           what="one message at each relay")
            assert await rt.spool.dead_letters() == []
    dnsfunc = dnsfunc_for({"gw._domainkey.gw.test": dkim_txt(key)})
    eight, seven = modern.handler.messages[0], old.handler.messages[0]
    eight_data, seven_data = bytes(eight.original_content or b""), bytes(seven.original_content or b"")

    assert "BODY=8BITMIME" in eight.mail_options
    assert not eight_data.isascii()
    assert dkim.verify(eight_data, dnsfunc=dnsfunc)

    assert not any(o.startswith("BODY=") for o in seven.mail_options)
    assert seven_data.isascii()
    assert dkim.verify(seven_data, dnsfunc=dnsfunc)
    for data in (eight_data, seven_data):
        text = BytesParser(policy=compat32).parsebytes(data).get_payload(decode=True).decode("utf-8")
        assert text.strip() == "Temperatur 93 °C, Größe über Grenzwert"


def test_mail_options_follow_what_the_message_needs_and_the_relay_offers() -> None:
    both = {"8bitmime": "", "smtputf8": "", "size": "1000"}
    ascii_mail = b"Subject: x\r\n\r\nhi\r\n"
    assert mail_options("a@x.test", ["b@y.test"], ascii_mail, {}) == []
    eight_bit_body = "Subject: x\r\n\r\n93 °C\r\n".encode()
    assert mail_options("a@x.test", ["b@y.test"], eight_bit_body, both) == ["BODY=8BITMIME"]
    utf8_header = "Subject: Größe\r\n\r\nhi\r\n".encode()
    assert mail_options("a@x.test", ["b@y.test"], utf8_header, both) == ["BODY=8BITMIME", "SMTPUTF8"]
    assert mail_options("jörg@x.test", ["b@y.test"], ascii_mail, both) == ["SMTPUTF8"]
    with pytest.raises(PermanentError, match="SMTPUTF8"):
        mail_options("a@x.test", ["b@y.test"], utf8_header, {"8bitmime": ""})
    with pytest.raises(TransientError, match="8BITMIME"):
        mail_options("a@x.test", ["b@y.test"], eight_bit_body, {"smtputf8": ""})
