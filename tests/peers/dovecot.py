"""A real Dovecot (IMAP + POP3) for the tests: unprivileged, loopback only, Maildir.

``start_dovecot()`` installs the Debian packages when they are missing (as root; otherwise the
test fails naming the install step), writes a config into a fresh directory, issues a
certificate for ``localhost``/``127.0.0.1`` from a throwaway CA (``ca_file`` is what clients
trust) and starts ``dovecot -F`` as ``nobody`` on free ports: IMAP with STARTTLS, IMAPS, POP3
with STLS, POP3S. Plain-text login is allowed on the non-TLS ports (so the tests can show the
gateway refuses it unless told otherwise); ``auth_failure_delay = 0`` keeps negative tests fast.
``add_user()`` gives each test a mailbox of its own. ``stop()`` kills exactly that PID.

Run by hand: ``.venv/bin/python -m tests.peers.dovecot`` prints the ports and waits for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import trustme

from tests.ports import free_port

_PACKAGES = ["dovecot-imapd", "dovecot-pop3d"]
_INSTALL = "apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d (scripts/peers.sh does it)"
_UID = _GID = 65534  # nobody:nogroup


#: Accounts written into the passwd-file before Dovecot starts (see Dovecot.add_user).
POOL = 80


def _new_user() -> tuple[str, str]:
    return f"u{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex[:12]}"


def ensure_installed() -> None:
    if shutil.which("dovecot") and Path("/usr/lib/dovecot/imap").exists() and Path("/usr/lib/dovecot/pop3").exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"Dovecot is not installed: run {_INSTALL}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *_PACKAGES], check=True,
                       env=env, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.fail(f"installing Dovecot failed ({exc}); run {_INSTALL}")


@dataclass
class Mailbox:
    """One test user's account on the server."""

    server: Dovecot
    user: str
    password: str

    @property
    def maildir(self) -> Path:
        return self.server.run_dir / "home" / self.user / "Maildir"

    def token(self) -> str:
        """A fresh OAuth2 bearer token for this user, which the server accepts with XOAUTH2 until
        ``revoke``d (Dovecot asks the test's token introspection endpoint on every login)."""
        token = secrets.token_urlsafe(24)
        self.server.issuer.tokens[token] = self.user
        return token

    def revoke(self, token: str) -> None:
        self.server.issuer.tokens.pop(token, None)

    def imap(self) -> imaplib.IMAP4_SSL:
        """A logged-in stdlib client (implicit TLS) for seeding and checking from the test."""
        client = imaplib.IMAP4_SSL("127.0.0.1", self.server.imaps_port, ssl_context=self.server.client_ssl(),
                                   timeout=10)
        client.login(self.user, self.password)
        return client

    def append(self, raw: bytes, folder: str = "INBOX", flags: str = "") -> int:
        """APPEND a message over IMAP; returns its UID."""
        with self.imap() as c:
            c.create(folder)  # NO when it exists: fine
            typ, data = c.append(folder, flags or None, None, raw)
            assert typ == "OK", data
            code = data[0].decode() if data and data[0] else ""
            # [APPENDUID <uidvalidity> <uid>] (RFC 4315), which Dovecot always sends
            return int(code.split("APPENDUID", 1)[1].split("]", 1)[0].split()[1])

    def deliver_file(self, raw: bytes) -> None:
        """Drop a message into Maildir/new as a local delivery agent would."""
        new = self.maildir / "new"
        new.mkdir(parents=True, exist_ok=True)
        tmp = self.maildir / "tmp"
        tmp.mkdir(exist_ok=True)
        name = f"{time.time():.6f}.{uuid.uuid4().hex}.gwtest"
        (tmp / name).write_bytes(raw)
        if os.geteuid() == 0:
            for path in (self.maildir, new, tmp, tmp / name):
                os.chown(path, _UID, _GID)
        os.rename(tmp / name, new / name)

    def flags(self, folder: str = "INBOX") -> dict[int, str]:
        """UID → flags of every message in ``folder``."""
        with self.imap() as c:
            typ, _ = c.select(folder)
            assert typ == "OK"
            typ, data = c.uid("FETCH", "1:*", "(FLAGS)")
            out: dict[int, str] = {}
            for item in data:
                if not item:
                    continue
                text = item.decode() if isinstance(item, bytes) else item[0].decode()
                uid = int(text.split("UID ", 1)[1].split()[0].rstrip(")"))
                out[uid] = text.split("FLAGS (", 1)[1].split(")", 1)[0]
            return out

    def count(self, folder: str = "INBOX") -> int:
        with self.imap() as c:
            typ, data = c.select(folder)
            return int(data[0]) if typ == "OK" else -1


class TokenIssuer:
    """The OAuth2 side of XOAUTH2: an RFC 7662 token introspection endpoint on 127.0.0.1 that
    Dovecot's oauth2 passdb asks whether a bearer token is active and whose it is."""

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}  # token → user
        self.asked = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                token = (form.get("token") or [""])[0]
                issuer.asked += 1
                user = issuer.tokens.get(token)
                body = json.dumps({"active": "true", "username": user} if user else {"active": "false"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/introspect"
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True, name="oauth2-introspection")
        self._thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@dataclass
class Dovecot:
    run_dir: Path
    imap_port: int
    imaps_port: int
    pop3_port: int
    pop3s_port: int
    ca_file: Path
    issuer: TokenIssuer = field(default_factory=TokenIssuer)
    proc: subprocess.Popen[bytes] | None = None
    pool: list[tuple[str, str]] = field(default_factory=list)

    @property
    def log_file(self) -> Path:
        return self.run_dir / "dovecot.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def client_ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def add_user(self) -> Mailbox:
        """A fresh account. Taken from the pool written before the start: Dovecot re-reads its
        passwd-file at most once a second, so a user added later needs that long to log in."""
        if self.pool:
            user, password = self.pool.pop()
            return Mailbox(self, user, password)
        user, password = _new_user()
        with (self.run_dir / "users").open("a") as fh:
            fh.write(f"{user}:{{PLAIN}}{password}\n")
        time.sleep(1.1)
        return Mailbox(self, user, password)

    def launch(self, timeout: float = 15.0) -> None:
        cmd = ["/usr/sbin/dovecot", "-F", "-c", str(self.run_dir / "dovecot.conf")]
        if os.geteuid() == 0:
            cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
        # Its own process group: kill() takes the login and mail processes down with the master.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        end = time.monotonic() + timeout
        for port in (self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dovecot exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > end:
                        raise RuntimeError(f"dovecot did not listen on {port} within {timeout}s: "
                                           f"{self.log_text()[-2000:]}") from None
                    time.sleep(0.05)

    def kill(self) -> None:
        """Stop the server — the process group we started, by its id — keeping the mail, as a
        crash would (open sessions drop at once); ``launch()`` starts it again."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        self.issuer.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _config(d: Dovecot) -> str:
    run = d.run_dir
    return f"""
base_dir = {run}/run
state_dir = {run}/state
log_path = {run}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = yes
ssl_cert = <{run}/server.crt
ssl_key = <{run}/server.key
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
auth_failure_delay = 0
default_login_user = nobody
default_internal_user = nobody
default_internal_group = nogroup
first_valid_uid = 0
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {run}/users
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {run}/oauth2.conf.ext
}}
userdb {{
  driver = static
  args = uid={_UID} gid={_GID} home={run}/home/%u
}}
mail_location = maildir:~/Maildir
pop3_uidl_format = %08Xu%08Xv
service anvil {{
  chroot =
  # No growing delay for an IP after failed logins: the negative tests would slow the rest down.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    port = {d.imap_port}
  }}
  inet_listener imaps {{
    port = {d.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {d.pop3_port}
  }}
  inet_listener pop3s {{
    port = {d.pop3s_port}
    ssl = yes
  }}
}}
"""


def start_dovecot() -> Dovecot:
    ensure_installed()
    run = Path(tempfile.mkdtemp(prefix="gw-dovecot-"))
    run.chmod(0o755)
    for sub in ("run", "state", "home"):
        (run / sub).mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(run / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(run / "server.crt"))
    ca.cert_pem.write_to_path(str(run / "ca.crt"))
    server = Dovecot(run, free_port(), free_port(), free_port(), free_port(), run / "ca.crt")
    server.pool = [_new_user() for _ in range(POOL)]
    (run / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in server.pool))
    (run / "dovecot.conf").write_text(_config(server))
    (run / "oauth2.conf.ext").write_text(
        f"introspection_mode = post\nintrospection_url = {server.issuer.url}\n"
        "username_attribute = username\nactive_attribute = active\nactive_value = true\n")
    if os.geteuid() == 0:
        for path in [run, *run.rglob("*")]:
            os.chown(path, _UID, _GID)
    try:
        server.launch()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    server = start_dovecot()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally below stops the server
    d = start_dovecot()
    box = d.add_user()
    print(f"dovecot: imap {d.imap_port} (STARTTLS), imaps {d.imaps_port}, pop3 {d.pop3_port} (STLS), "
          f"pop3s {d.pop3s_port}; CA {d.ca_file}; user {box.user} / {box.password}; log {d.log_file}")
    try:
        while d.proc is not None and d.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        d.stop()
