"""Outbound sealing: DKIM signatures checked with dkimpy, S/MIME with the openssl binary, PGP/MIME
with the gpg binary. Keys and certificates are made here; nothing leaves the machine."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from pydantic import ValidationError

from connectors.mailauth import Sealer, SealOptions, SealSettings, public_record, seal_message
from connectors.mailauth.config import DkimSigning
from connectors.mailauth.verify import Verifier
from gateway.config.yamlsrc import FromEnv
from gateway.contract import ConnectorConfig, PermanentError
from tests.mailauth_support import (
    Cert,
    GpgHome,
    dkim_txt,
    ed25519_seed,
    make_ca,
    make_mail_cert,
    message,
    pem,
    rsa_key,
    short_home,
    stub_dns,
    wire,
)

TEXT = "Temperature 93 °C at site north — over the limit.\n"


def secret(text: str) -> FromEnv:
    return FromEnv(text)  # what the loader makes of "${VAR}"


def settings(**kw: Any) -> SealSettings:
    return SealSettings.model_validate(kw)


def assert_crlf(raw: bytes) -> None:
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF on the wire"
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR on the wire"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def mime_parts(raw: bytes) -> list[bytes]:
    """The exact bytes of each part of a top-level multipart message."""
    msg = BytesParser(policy=compat32).parsebytes(raw)
    mark = msg.get_boundary()
    assert mark
    body = raw.split(b"\r\n\r\n", 1)[1]
    chunks = body.split(b"--" + mark.encode())
    assert chunks[-1] == b"--\r\n"
    return [c[2:-2] for c in chunks[1:-1]]


def openssl(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], input=input, capture_output=True, timeout=60, check=False)


def small_rsa_pem() -> str:
    """A 512-bit RSA key (cryptography refuses to make one; openssl still does)."""
    done = openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:512")
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


# --- DKIM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa() -> Any:
    return rsa_key()


def dnsfunc_for(records: dict[str, str]) -> Any:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode().rstrip("."))
        return value.encode() if value else None
    return dnsfunc


async def test_dkim_rsa_and_ed25519_signatures_verify_with_dkimpy(rsa: Any) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    cfg = settings(dkim=[
        {"domain": "example.test", "selector": "rsa", "key": secret(pem(rsa))},
        {"domain": "example.test", "selector": "ed", "key": secret(ed25519_seed(ed))},
    ])
    raw = await seal_message(message(text=TEXT), cfg)
    assert_crlf(raw)
    dnsfunc = dnsfunc_for({"rsa._domainkey.example.test": dkim_txt(rsa),
                           "ed._domainkey.example.test": dkim_txt(ed)})
    verifier = dkim.DKIM(raw)
    assert verifier.verify(idx=0, dnsfunc=dnsfunc)  # the last signer's (ed25519) is on top
    assert verifier.signature_fields[b"a"] == b"ed25519-sha256"
    assert verifier.verify(idx=1, dnsfunc=dnsfunc)
    assert verifier.signature_fields[b"a"] == b"rsa-sha256"
    assert verifier.signature_fields[b"c"] == b"relaxed/relaxed"
    signed_headers = verifier.signature_fields[b"h"].replace(b" ", b"").split(b":")
    assert signed_headers.count(b"from") == 2  # oversigned: a second From breaks it
    assert b"bcc" not in signed_headers
    assert not dkim.verify(raw.replace(b"north", b"south"), dnsfunc=dnsfunc)
    assert not dkim.DKIM(b"From: x@example.test\r\n" + raw).verify(idx=1, dnsfunc=dnsfunc)


async def test_dkim_signature_passes_our_own_verifier_and_dmarc(rsa: Any) -> None:
    from connectors.mailauth import AuthCheck

    raw = await seal_message(message(), settings(dkim={"domain": "example.test", "selector": "s1",
                                                        "key": secret(pem(rsa, "pkcs1"))}))
    with stub_dns() as dns:
        dns.txt("s1._domainkey.example.test", public_record(pem(rsa)))
        dns.txt("_dmarc.example.test", "v=DMARC1; p=reject")
        results = await Verifier(AuthCheck(resolver=dns.address, timeout=1, authserv_id="mx")).verify(
            raw, "192.0.2.1", "h", "bounce@elsewhere.test")
    assert (results.dkim, results.dmarc) == ("pass", "pass")


def test_dkim_config_errors_never_show_the_key(rsa: Any) -> None:
    with pytest.raises(ValidationError) as err:
        DkimSigning.model_validate({"domain": "example.test", "selector": "s", "key": secret("MIIEvgIBADANBgkq")})
    # The loader reports errors()["msg"] (gateway.routing.router.pydantic_issues), never the input.
    msg = err.value.errors()[0]["msg"]
    assert "neither a PEM private key nor a base64 Ed25519 seed" in msg
    assert "MIIEvgIBADANBgkq" not in msg
    with pytest.raises(ValidationError, match="secrets are never written inline"):
        DkimSigning.model_validate({"domain": "example.test", "selector": "s", "key": pem(rsa)})
    with pytest.raises(ValidationError, match="at least 1024 bits"):
        DkimSigning.model_validate({"domain": "example.test", "selector": "s", "key": secret(small_rsa_pem())})
    with pytest.raises(ValidationError, match="'bcc' must not be signed"):
        DkimSigning.model_validate({"domain": "example.test", "selector": "s", "key": secret(pem(rsa)),
                                    "headers": ["from", "bcc"]})
    with pytest.raises(ValidationError, match="'from' must be signed"):
        DkimSigning.model_validate({"domain": "example.test", "selector": "s", "key": secret(pem(rsa)),
                                    "headers": ["subject"]})


async def test_dkim_refuses_a_message_without_one_from(rsa: Any) -> None:
    cfg = settings(dkim={"domain": "example.test", "selector": "s", "key": secret(pem(rsa))})
    with pytest.raises(PermanentError, match="0 From headers"):
        await seal_message(b"To: a@b.test\r\nSubject: x\r\n\r\nhi\r\n", cfg)


def test_seal_settings_mix_into_a_connector_config() -> None:
    class MailConfig(ConnectorConfig, SealSettings):
        type: str = "mail"

    cfg = MailConfig.model_validate({"type": "mail", "pgp": {"home": "/tmp/x", "sign_key": "ABCDEF0123456789"}})
    assert cfg.pgp is not None and cfg.smime is None
    with pytest.raises(ValidationError, match="use smime or pgp on one connector, not both"):
        MailConfig.model_validate({"type": "mail", "pgp": {"home": "/x", "sign_key": "ABCDEF0123456789"},
                                   "smime": {"sign": False, "encrypt": True, "recipients": "/x"}})
    with pytest.raises(ValidationError, match="extra"):
        MailConfig.model_validate({"type": "mail", "dkim_key": "x"})


# --- S/MIME ---------------------------------------------------------------------------------


class Pki:
    def __init__(self, root: Path):
        self.root = root
        self.ca = make_ca()
        self.gw = make_mail_cert(self.ca, "gw@example.test")
        self.bob = make_mail_cert(self.ca, "bob@x.test")
        self.old = make_mail_cert(self.ca, "old@x.test", expired=True)
        (root / "ca.pem").write_bytes(self.ca.cert_pem)
        (root / "gw.pem").write_bytes(self.gw.cert_pem + self.ca.cert_pem)
        certs = root / "recipients"
        certs.mkdir()
        (certs / "bob.pem").write_bytes(self.bob.cert_pem)
        (certs / "old.crt").write_bytes(self.old.cert_pem)
        self.write_key("bob", self.bob)

    def write_key(self, name: str, cert: Cert) -> Path:
        (self.root / f"{name}.crt").write_bytes(cert.cert_pem)
        path = self.root / f"{name}.key"
        path.write_text(cert.key_pem)
        return path

    def smime(self, **kw: Any) -> dict[str, Any]:
        return {"cert": str(self.root / "gw.pem"), "key": secret(self.gw.key_pem),
                "recipients": str(self.root / "recipients"), **kw}

    def verify(self, path: Path, tool: str = "smime") -> subprocess.CompletedProcess[bytes]:
        return openssl(tool, "-verify", "-in", str(path), "-CAfile", str(self.root / "ca.pem"))

    def decrypt(self, path: Path) -> subprocess.CompletedProcess[bytes]:
        return openssl("smime", "-decrypt", "-in", str(path), "-recip", str(self.root / "bob.crt"),
                       "-inkey", str(self.root / "bob.key"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def test_smime_signature_verifies_with_openssl(pki: Pki, tmp_path: Path) -> None:
    msg = message(to="bob@x.test", text=TEXT)  # UTF-8 text: 8bit in, quoted-printable inside the signature
    raw = await seal_message(msg, settings(smime=pki.smime()))
    assert_crlf(raw)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: Boiler 7" in head and b"MIME-Version: 1.0" in head
    assert b'multipart/signed; protocol="application/pkcs7-signature"; micalg="sha-256"' in head
    assert max(raw) < 128
    path = tmp_path / "signed.eml"
    path.write_bytes(raw)
    for tool in ("smime", "cms"):
        done = pki.verify(path, tool)
        assert done.returncode == 0, done.stderr.decode()
        assert b"Verification successful" in done.stderr
        content = BytesParser(policy=compat32).parsebytes(done.stdout).get_payload(decode=True)
        assert content.decode("utf-8").replace("\r\n", "\n") == TEXT
    # one changed byte in the signed part: openssl says no
    tampered = tmp_path / "tampered.eml"
    tampered.write_bytes(raw.replace(b"north", b"south"))
    assert pki.verify(tampered).returncode != 0


async def test_smime_signature_over_a_multipart_message_with_8bit_parts(pki: Pki, tmp_path: Path) -> None:
    msg = message(to="bob@x.test", text=TEXT)
    msg.add_alternative("<p>Température 93 °C</p>\n", subtype="html")
    msg.add_attachment(bytes(range(256)) * 4, maintype="application", subtype="octet-stream",
                       filename="dump.bin")
    assert b"Content-Transfer-Encoding: 8bit" in wire(msg)
    raw = await seal_message(msg, settings(smime=pki.smime()))
    assert_crlf(raw)
    assert max(raw) < 128
    path = tmp_path / "multi.eml"
    path.write_bytes(raw)
    done = pki.verify(path)
    assert done.returncode == 0, done.stderr.decode()
    inner = BytesParser(policy=compat32).parsebytes(done.stdout)
    parts = {p.get_content_type(): p.get_payload(decode=True) for p in inner.walk() if not p.is_multipart()}
    assert parts["text/html"].decode("utf-8").replace("\r\n", "\n") == "<p>Température 93 °C</p>\n"
    assert parts["application/octet-stream"] == bytes(range(256)) * 4
    assert parts["text/plain"].decode("utf-8").replace("\r\n", "\n") == TEXT


async def test_smime_encrypt_decrypts_with_openssl_and_sign_then_encrypt(pki: Pki, tmp_path: Path) -> None:
    raw = await seal_message(message(to="bob@x.test"), settings(smime=pki.smime(sign=False, encrypt=True)))
    assert_crlf(raw)
    assert b"application/pkcs7-mime; smime-type=enveloped-data" in raw
    assert b"93 C" not in raw
    path = tmp_path / "enc.eml"
    path.write_bytes(raw)
    done = pki.decrypt(path)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.startswith(b"Content-Type: text/plain")
    assert b"Temperature 93 C at site north." in done.stdout

    raw = await seal_message(message(to="bob@x.test"), settings(smime=pki.smime(encrypt=True)))
    path.write_bytes(raw)
    inner = pki.decrypt(path)
    assert inner.returncode == 0, inner.stderr.decode()
    signed = tmp_path / "inner.eml"
    signed.write_bytes(inner.stdout)
    done = pki.verify(signed)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Temperature 93 C" in done.stdout


async def test_smime_missing_or_expired_certificate_fails_or_sends_signed_only(
        pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = settings(smime=pki.smime(encrypt=True))
    with pytest.raises(PermanentError, match=r"S/MIME: no usable certificate for carol@x.test, old@x.test; "
                                             r"not sent \(missing_key: fail\)") as err:
        await seal_message(message(to="bob@x.test, carol@x.test, old@x.test"), cfg)
    assert err.value.detail == {"missing_keys": ["carol@x.test", "old@x.test"]}
    with caplog.at_level(logging.WARNING, logger="gateway.mailauth"):
        raw = await seal_message(message(to="carol@x.test"), cfg, options=SealOptions(missing_key="plain"))
    assert b"multipart/signed" in raw and b"pkcs7-mime" not in raw
    assert any(r.getMessage() == "mailauth.sent_unencrypted" for r in caplog.records)
    path = tmp_path / "plain.eml"
    path.write_bytes(raw)
    assert pki.verify(path).returncode == 0


async def test_smime_route_options_and_misconfiguration(pki: Pki, rsa: Any) -> None:
    cfg = settings(smime=pki.smime())
    plain = await seal_message(message(), cfg, options=SealOptions(sign=False))
    assert b"multipart/signed" not in plain
    with pytest.raises(PermanentError, match="asks to sign but the connector has no smime or pgp"):
        await seal_message(message(), settings(), options=SealOptions(sign=True))
    with pytest.raises(PermanentError, match="does not belong to the first certificate"):
        await seal_message(message(), settings(smime=pki.smime(key=secret(pem(rsa)))))
    with pytest.raises(ValidationError, match=r"smime\.sign needs 'cert'"):
        settings(smime={"sign": True})
    with pytest.raises(ValidationError, match="not a readable PEM private key"):
        settings(smime=pki.smime(key=secret("garbage")))
    with pytest.raises(PermanentError, match="needs recipients"):
        await seal_message(b"From: gw@example.test\r\nSubject: x\r\n\r\nhi\r\n",
                           settings(smime=pki.smime(encrypt=True)))


async def test_smime_and_dkim_together_the_dkim_signature_covers_the_smime_message(pki: Pki, rsa: Any,
                                                                                  tmp_path: Path) -> None:
    raw = await seal_message(message(to="bob@x.test"), settings(
        smime=pki.smime(), dkim={"domain": "example.test", "selector": "s", "key": secret(pem(rsa))}))
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=dnsfunc_for({"s._domainkey.example.test": dkim_txt(rsa)}))
    path = tmp_path / "both.eml"
    path.write_bytes(raw)
    assert pki.verify(path).returncode == 0


# --- PGP/MIME -------------------------------------------------------------------------------


class Keys:
    """The gateway's key (exported, imported by the Sealer into its own home) and bob's."""

    def __init__(self) -> None:
        self.maker = GpgHome()
        self.bob = GpgHome()
        self.gw_fpr = self.maker.generate("gw@example.test", passphrase="s3cret pass")
        self.bob_fpr = self.bob.generate("bob@x.test")
        self.gw_secret = self.maker.export(self.gw_fpr, secret=True, passphrase="s3cret pass")
        self.bob.import_(self.maker.export(self.gw_fpr))
        self.bob_public = self.bob.export(self.bob_fpr)

        self.homes: list[str] = []

    def home(self) -> str:
        """A fresh GnuPG home path for a Sealer (removed at the end)."""
        self.homes.append(short_home())
        return self.homes[-1]

    def pgp(self, **kw: Any) -> dict[str, Any]:
        return {"home": self.home(), "keys": secret(self.gw_secret + self.bob_public), "sign_key": self.gw_fpr,
                "passphrase": secret("s3cret pass"), **kw}

    def close(self) -> None:
        self.maker.close()
        self.bob.close()
        for home in self.homes:
            shutil.rmtree(os.path.dirname(home), ignore_errors=True)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    made = Keys()
    yield made
    made.close()


@pytest.fixture
async def sealers() -> Any:
    opened: list[Sealer] = []

    def make(cfg: SealSettings) -> Sealer:
        opened.append(Sealer(cfg))
        return opened[-1]

    yield make
    for sealer in opened:
        await sealer.close()


def gpg_status(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode("utf-8", "replace")


async def test_pgp_signature_verifies_with_gpg(keys: Keys, sealers: Any, tmp_path: Path) -> None:
    sealer = sealers(settings(pgp=keys.pgp()))
    raw = await sealer.seal(message(to="bob@x.test", text=TEXT))
    assert_crlf(raw)
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert b'multipart/signed; micalg="pgp-sha256";\r\n\tprotocol="application/pgp-signature"' in head
    signed, signature = mime_parts(raw)
    assert signed.startswith(b"Content-Type: text/plain")
    assert signature.startswith(b'Content-Type: application/pgp-signature; name="signature.asc"')
    (tmp_path / "data").write_bytes(signed)
    (tmp_path / "sig.asc").write_bytes(signature.split(b"\r\n\r\n", 1)[1])
    done = keys.bob.run("--status-fd", "2", "--verify", str(tmp_path / "sig.asc"), str(tmp_path / "data"),
                        check=False)
    assert done.returncode == 0, gpg_status(done)
    assert f"VALIDSIG {keys.gw_fpr}" in gpg_status(done)
    (tmp_path / "data").write_bytes(signed.replace(b"north", b"south"))
    bad = keys.bob.run("--status-fd", "2", "--verify", str(tmp_path / "sig.asc"), str(tmp_path / "data"),
                       check=False)
    assert bad.returncode != 0 and "BADSIG" in gpg_status(bad)


async def test_pgp_sign_and_encrypt_decrypts_and_verifies_with_gpg(keys: Keys, sealers: Any) -> None:
    sealer = sealers(settings(pgp=keys.pgp(encrypt=True)))
    raw = await sealer.seal(message(to="bob@x.test"))
    assert_crlf(raw)
    assert b'multipart/encrypted; protocol="application/pgp-encrypted"' in raw
    assert b"93 C" not in raw
    version, encrypted = mime_parts(raw)
    assert version.endswith(b"\r\n\r\nVersion: 1\r\n")
    done = keys.bob.run("--status-fd", "2", "--decrypt", input=encrypted.split(b"\r\n\r\n", 1)[1], check=False)
    assert done.returncode == 0, gpg_status(done)
    assert "DECRYPTION_OKAY" in gpg_status(done)
    assert f"VALIDSIG {keys.gw_fpr}" in gpg_status(done)
    assert done.stdout.startswith(b"Content-Type: text/plain")
    assert b"Temperature 93 C at site north." in done.stdout


async def test_pgp_recipient_without_key_fails_or_goes_signed_only(keys: Keys, sealers: Any) -> None:
    sealer = sealers(settings(pgp=keys.pgp(encrypt=True)))
    with pytest.raises(PermanentError, match=r"PGP: no usable public key for carol@x.test; not sent"):
        await sealer.seal(message(to="bob@x.test, carol@x.test"))
    # as a route's rendered options may arrive: a plain dict
    raw = await sealer.seal(message(to="bob@x.test, carol@x.test"), options={"missing_key": "plain"})
    assert b"multipart/signed" in raw and b"multipart/encrypted" not in raw
    with pytest.raises(PermanentError, match="seal options: "):
        await sealer.seal(message(to="bob@x.test"), options={"missing_key": "maybe"})
    raw = await sealer.seal(message(), recipients=["bob@x.test"], options=SealOptions(sign=False))
    _, encrypted = mime_parts(raw)
    done = keys.bob.run("--status-fd", "2", "--decrypt", input=encrypted.split(b"\r\n\r\n", 1)[1], check=False)
    assert done.returncode == 0 and "VALIDSIG" not in gpg_status(done)


async def test_pgp_wrong_passphrase_is_a_permanent_error_never_an_unsigned_send(keys: Keys, sealers: Any) -> None:
    sealer = sealers(settings(pgp=keys.pgp(passphrase=secret("wrong"))))
    with pytest.raises(ValueError, match="pgp: cannot sign with"):
        await sealer.open()
    with pytest.raises(PermanentError, match="PGP is not usable: pgp: cannot sign with"):
        await sealer.seal(message())
    missing = sealers(settings(pgp={"home": keys.home(), "sign_key": "nobody@example.test"}))
    with pytest.raises(PermanentError, match="matches 0 secret keys"):
        await missing.seal(message())



async def test_pgp_home_keeps_its_keys_for_the_next_start(keys: Keys, sealers: Any) -> None:
    first = keys.pgp()
    await sealers(settings(pgp=first)).seal(message())  # imports the keys into the home
    again = sealers(settings(pgp={"home": first["home"], "sign_key": keys.gw_fpr,
                                  "passphrase": secret("s3cret pass")}))
    raw = await again.seal(message())
    assert b'micalg="pgp-sha256"' in raw
