"""Test helpers for connectors.mailauth: a stub DNS server, DKIM keys, S/MIME certificates, GnuPG homes.

The stub DNS server is real DNS over UDP on 127.0.0.1 (dnspython builds the answers), so the
checks run through the same resolver code as in production; it can also answer SERVFAIL or
stay silent for chosen names, to make temperrors.
"""

from __future__ import annotations

import base64
import datetime
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class StubDns:
    """An authoritative-looking DNS server on 127.0.0.1 answering from ``records``."""

    def __init__(self, port: int = 0) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", port))
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stub-dns", daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower().rstrip("."), rdtype.upper()), []).extend(values)

    def txt(self, name: str, text: str) -> None:
        """A TXT record; long texts are split into 255-byte character-strings."""
        chunks = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
        self.add(name, "TXT", " ".join('"' + c.replace('"', '\\"') + '"' for c in chunks))

    def start(self) -> StubDns:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self._answer(wire)
            if answer is not None:
                self._sock.sendto(answer, peer)

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN,
                                                            question.rdtype, values))
        elif not any(n == name for n, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        limit = query.payload if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()


@contextmanager
def stub_dns() -> Iterator[StubDns]:
    server = StubDns().start()
    try:
        yield server
    finally:
        server.stop()


# --- keys and certificates ------------------------------------------------------------------


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, fmt: str = "pkcs8") -> str:
    form = serialization.PrivateFormat.PKCS8 if fmt == "pkcs8" else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode()


def ed25519_seed(key: ed25519.Ed25519PrivateKey) -> str:
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def dkim_txt(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> str:
    """The selector's TXT record for a private key (built here, independently of the code under test)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


@dataclass
class Cert:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> str:
        return pem(self.key)


def make_ca() -> Cert:
    key = rsa_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailauth test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Cert(cert, key)


def make_mail_cert(ca: Cert, address: str, *, expired: bool = False) -> Cert:
    key = rsa_key()
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired \
        else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
            .issuer_name(ca.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(ca.key, hashes.SHA256()))
    return Cert(cert, key)


# --- GnuPG ----------------------------------------------------------------------------------


class GpgHome:
    """A scratch GnuPG home (short path: the agent socket lives there) with helpers."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="gpg", dir="/tmp")
        os.chmod(self.path, 0o700)

    def run(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["gpg", "--homedir", self.path, "--batch", "--yes", "--pinentry-mode", "loopback",
                               *args], input=input, capture_output=True, timeout=60, check=check)

    def generate(self, address: str, passphrase: str = "") -> str:
        """A new ed25519/cv25519 key for ``address``; returns its fingerprint."""
        self.run("--passphrase", passphrase, "--quick-generate-key", f"Test <{address}>", "future-default",
                 "default", "1d")
        out = self.run("--with-colons", "--list-secret-keys", f"<{address}>").stdout.decode()
        return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))

    def export(self, fingerprint: str, secret: bool = False, passphrase: str = "") -> str:
        if secret:
            return self.run("--passphrase", passphrase, "--armor", "--export-secret-keys", fingerprint).stdout.decode()
        return self.run("--armor", "--export", fingerprint).stdout.decode()

    def import_(self, armored: str) -> None:
        self.run("--import", input=armored.encode())

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", self.path, "--kill", "gpg-agent"], capture_output=True,
                       timeout=10, check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def short_home() -> str:
    """An empty directory path for a GnuPG home that does not exist yet."""
    return os.path.join(tempfile.mkdtemp(prefix="gph", dir="/tmp"), "home")


# --- messages -------------------------------------------------------------------------------


def message(sender: str = "Alice <alice@example.test>", to: str = "ops@gw.test", subject: str = "Boiler 7",
            text: str = "Temperature 93 C at site north.\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.datetime.now(datetime.UTC))
    msg["Message-ID"] = make_msgid(domain="example.test")
    msg.set_content(text)
    return msg


def wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
