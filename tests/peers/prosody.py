"""A real Prosody (XMPP) for the tests: unprivileged, loopback only, STARTTLS required.

``start_prosody()`` installs the Debian package when it is missing (as root; otherwise the test
fails naming the install step), writes a config into a fresh directory, issues a certificate
for ``localhost`` from a throwaway CA (``ca_file`` is what clients trust), registers the users
and starts ``prosody -F`` as ``nobody`` on a free port. ``stop()`` kills exactly that PID.

Modules: roster, saslauth, tls, disco, ping, posix, offline and — unless ``smacks=False`` —
``smacks`` (XEP-0198, shipped with Prosody 0.12); a MUC component on ``conference.localhost``.

Run by hand: ``.venv/bin/python -m tests.peers.prosody`` prints the port and waits for Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import slixmpp
import trustme

from tests.ports import free_port

DOMAIN = "localhost"
MUC_DOMAIN = "conference.localhost"
#: Users every Prosody of the tests has (user → password).
USERS = {"gateway": "gw-secret", "alice": "alice-secret", "bob": "bob-secret"}
_INSTALL = "apt-get install -y --no-install-recommends prosody (scripts/peers.sh does it)"


def _as_run_user(cmd: list[str]) -> list[str]:
    """Root drops to nobody (Prosody refuses to run as root); anyone else runs as themselves."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *cmd]
    return cmd


def ensure_installed() -> None:
    if shutil.which("prosody") and shutil.which("prosodyctl"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail(f"Prosody is not installed: run {_INSTALL}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prosody"], check=True,
                       env=env, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.fail(f"installing Prosody failed ({exc}); run {_INSTALL}")


@dataclass
class Prosody:
    run_dir: Path
    port: int
    ca_file: Path
    smacks: bool
    proc: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))

    @property
    def config_file(self) -> Path:
        return self.run_dir / "prosody.cfg.lua"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "prosody.log"

    def jid(self, user: str) -> str:
        return f"{user}@{DOMAIN}"

    def register(self, user: str, password: str) -> None:
        subprocess.run(_as_run_user(["prosodyctl", "--config", str(self.config_file), "register", user, DOMAIN,
                                     password]), check=True, capture_output=True, timeout=30)
        self.users[user] = password

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def launch(self, timeout: float = 15.0) -> None:
        """Start ``prosody -F`` and wait until it listens."""
        self.proc = subprocess.Popen(_as_run_user(["prosody", "--config", str(self.config_file), "-F"]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prosody exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > end:
                    raise RuntimeError(f"prosody did not listen within {timeout}s: {self.log_text()[-2000:]}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """Stop the process (by its PID), keeping its data; ``launch()`` starts it again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _config(run: Path, port: int, smacks: bool) -> str:
    modules = ["roster", "saslauth", "tls", "disco", "ping", "posix", "offline"]
    if smacks:
        modules.append("smacks")
    mods = "; ".join(f'"{m}"' for m in modules)
    return f"""
pidfile = "{run}/prosody.pid"
certificates = "{run}"
data_path = "{run}/data"
log = {{ {{ levels = {{ min = "info" }}, to = "file", filename = "{run}/prosody.log" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
component_ports = {{ }}
http_ports = {{ }}
https_ports = {{ }}
modules_enabled = {{ {mods} }}
modules_disabled = {{ "s2s" }}
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
authentication = "internal_hashed"
storage = "internal"
use_dns_resolver = false
ssl = {{ key = "{run}/localhost.key"; certificate = "{run}/localhost.crt"; }}
VirtualHost "{DOMAIN}"
Component "{MUC_DOMAIN}" "muc"
  restrict_room_creation = false
  muc_room_locking = false
"""


def start_prosody(*, smacks: bool = True, timeout: float = 15.0) -> Prosody:
    ensure_installed()
    run = Path(tempfile.mkdtemp(prefix="gw-prosody-"))
    run.chmod(0o755)
    (run / "data").mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert(DOMAIN, MUC_DOMAIN, "127.0.0.1")
    cert.private_key_pem.write_to_path(str(run / "localhost.key"))
    cert.cert_chain_pems[0].write_to_path(str(run / "localhost.crt"))
    ca.cert_pem.write_to_path(str(run / "ca.crt"))
    port = free_port()
    server = Prosody(run, port, run / "ca.crt", smacks)
    server.config_file.write_text(_config(run, port, smacks))
    if os.geteuid() == 0:
        for path in [run, *run.rglob("*")]:
            os.chown(path, 65534, 65534)
    try:
        for user, password in USERS.items():
            server.register(user, password)
        server.launch(timeout)
    except BaseException:
        server.stop()
        raise
    return server


class XmppUser:
    """A real XMPP client (slixmpp) for the tests: ``async with XmppUser(server, "alice") as alice``.

    Collects every message it receives; ``answer(id)`` says how the gateway answered a message
    sent with :meth:`send_chat`: ``ack`` (a XEP-0184 receipt), ``temporary`` (error type
    ``wait``) or ``permanent`` (error ``modify``/``cancel``/``auth``)."""

    def __init__(self, server: Prosody, user: str, *, rooms: tuple[str, ...] = ()) -> None:
        self.jid = server.jid(user)
        self.server = server
        self.rooms = rooms
        self.client = slixmpp.ClientXMPP(self.jid, server.users[user])
        self.client.enable_direct_tls = False
        self.client.ssl_context.load_verify_locations(str(server.ca_file))
        self.client.register_plugin("xep_0184", {"auto_ack": True, "auto_request": False})
        self.client.register_plugin("xep_0045")
        self.messages: list[Any] = []
        self.answers: dict[str, tuple[str, str]] = {}
        self.texts: dict[str, str] = {}
        self._ready = asyncio.Event()
        self.client.add_event_handler("session_start", self._started)
        self.client.add_event_handler("message", self._message)
        self.client.add_event_handler("groupchat_message", self._message)
        self.client.add_event_handler("receipt_received", self._receipt)
        self.client.add_event_handler("message_error", self._error)

    async def _started(self, _: Any) -> None:
        self.client.send_presence()
        for room in self.rooms:
            await self.client.plugin["xep_0045"].join_muc_wait(slixmpp.JID(room), self.jid.split("@")[0],
                                                               maxstanzas=0, timeout=10)
        self._ready.set()

    def _message(self, msg: Any) -> None:
        if msg["type"] != "error" and msg["body"]:
            self.messages.append(msg)

    def _receipt(self, msg: Any) -> None:
        self.answers[msg["receipt"]] = ("ack", "")

    def _error(self, msg: Any) -> None:
        kind = "temporary" if msg["error"]["type"] == "wait" else "permanent"
        self.answers[msg["id"]] = (kind, msg["error"]["condition"])
        self.texts[msg["id"]] = msg["error"]["text"]

    async def __aenter__(self) -> XmppUser:
        self.client.connect("127.0.0.1", self.server.port)
        await asyncio.wait_for(self._ready.wait(), timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.client.disconnect()
        await asyncio.sleep(0)
        if self.client.transport is not None:
            self.client.abort()
        runner = getattr(self.client, "_run_out_filters", None)
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    def send_chat(self, to: str, body: str, *, mtype: str = "chat", receipt: bool = True) -> str:
        msg = self.client.make_message(mto=to, mbody=body, mtype=mtype)  # type: ignore[arg-type]
        if receipt:
            msg["request_receipt"] = True
        msg.send()
        return str(msg["id"])

    async def answer(self, stanza_id: str, timeout: float = 10.0) -> tuple[str, str]:
        end = asyncio.get_running_loop().time() + timeout
        while stanza_id not in self.answers:
            if asyncio.get_running_loop().time() > end:
                raise AssertionError(f"no receipt or error for message {stanza_id} within {timeout}s")
            await asyncio.sleep(0.02)
        return self.answers[stanza_id]

    async def wait_message(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        end = asyncio.get_running_loop().time() + timeout
        while True:
            for msg in self.messages:
                if predicate(msg):
                    return msg
            if asyncio.get_running_loop().time() > end:
                bodies = [str(m["body"])[:80] for m in self.messages]
                raise AssertionError(f"{self.jid} got no matching message within {timeout}s; got {bodies}")
            await asyncio.sleep(0.02)

    def bodies(self) -> list[str]:
        return [str(m["body"]) for m in self.messages]


@pytest.fixture(scope="session")
def prosody() -> Iterator[Prosody]:
    server = start_prosody()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally below stops the server
    p = start_prosody()
    print(f"prosody on 127.0.0.1:{p.port}, CA {p.ca_file}, users {p.users}, log {p.log_file}")
    try:
        while p.proc is not None and p.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        p.stop()
