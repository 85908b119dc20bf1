"""Renewal without restart, as Kubernetes does it: a ConfigMap edit of a template alone and a
cert-manager renewal of a TLS Secret, both by the kubelet's swap of the mount's ``..data``
symlink, reach the next message and the next connection of a running gateway.

The mount is reproduced in a temp directory: ``dir/..<timestamp>/<file>``, ``dir/..data ->
..<timestamp>``, ``dir/<file> -> ..data/<file>``; an update writes a new timestamped directory,
points a ``..data_tmp`` symlink at it, renames that over ``..data`` and removes the old directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import shutil
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509

from gateway.admin import hash_token, mount_admin
from gateway.config.loader import load_config
from gateway.registry import Registry
from gateway.reload import watch
from gateway.runtime import Runtime, RuntimeAdmin
from tests.gwtest import jsonl, wait_for
from tests.ports import free_port

pytestmark = pytest.mark.integration

TOKEN = "renewal-editor-token"
_stamps = itertools.count(1)


class Mount:
    """A directory mounted from a ConfigMap or Secret, updated the way the kubelet does it."""

    def __init__(self, path: Path, files: dict[str, bytes]):
        self.path = path
        path.mkdir(parents=True)
        self.publish(files)

    def publish(self, files: dict[str, bytes]) -> None:
        old = os.readlink(self.path / "..data") if (self.path / "..data").is_symlink() else None
        stamp = self.path / f"..2026_01_01_00_00_{next(_stamps):02d}.000000001"
        stamp.mkdir()
        for name, content in files.items():
            (stamp / name).write_bytes(content)
        (self.path / "..data_tmp").symlink_to(stamp.name)
        os.replace(self.path / "..data_tmp", self.path / "..data")
        for name in files:
            if not (self.path / name).is_symlink():
                (self.path / name).symlink_to(f"..data/{name}")
        if old is not None:
            shutil.rmtree(self.path / old)


def serial_of_pem(cert: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def serial_of_der(der: bytes | None) -> int:
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def pair(cert: trustme.LeafCert, key_of: trustme.LeafCert | None = None) -> dict[str, bytes]:
    return {"tls.crt": cert.cert_chain_pems[0].bytes(), "tls.key": (key_of or cert).private_key_pem.bytes()}


@asynccontextmanager
async def gateway_on(config_path: Path, *, watched: bool = False) -> AsyncIterator[Runtime]:
    """A gateway run on ``config_path`` (its templates resolve beside it), with the file watcher."""
    registry = Registry()
    rt = Runtime(load_config(str(config_path), registry), registry=registry, config_path=str(config_path))
    mount_admin(RuntimeAdmin(rt), rt.http)
    await rt.start()
    watcher = asyncio.create_task(watch(rt.reloader, str(config_path), debounce_ms=50, poll_seconds=0.5)) \
        if watched else None
    try:
        await wait_for(lambda: rt.readiness()[0], timeout=15, what="the gateway ready")
        yield rt
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await rt.stop()


def head(tmp_path: Path, admin: int, admin_http: str = "") -> str:
    return f"""\
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens: [{{name: ops, sha256: "{hash_token(TOKEN)}", role: editor}}]
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  drain: 2s
{admin_http}"""


async def until(probe: Callable[[], object], expected: object, what: str, timeout: float = 15.0) -> None:
    """Probe (in a thread: a blocking client) until it answers ``expected``."""
    seen: list[object] = []

    async def answered() -> bool:
        seen.append(await asyncio.to_thread(probe))
        return seen[-1] == expected

    try:
        await wait_for(answered, timeout=timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer {seen[-1:]}, expected {expected}") from None


# --- a body template edited alone ------------------------------------------------------------------

async def test_a_template_swapped_alone_is_a_new_version_and_renders_the_next_message(tmp_path: Path) -> None:
    api, admin = free_port(), free_port()
    routes = head(tmp_path, admin) + f"""\
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  out: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - name: events
    from: api
    match: {{subject: "/events/**"}}
    to:
      - connector: out
        body: {{file: body.j2}}
"""
    files = {"routes.yaml": routes.encode(), "body.j2": b"one {{ data.n }} {% include 'footer.j2' %}",
             "footer.j2": b"-- first footer"}
    mount = Mount(tmp_path / "config", files)
    async with gateway_on(mount.path / "routes.yaml", watched=True) as rt, \
            httpx.AsyncClient(timeout=10) as client:
        auth = {"Authorization": f"Bearer {TOKEN}"}

        async def version() -> str:
            answer = (await client.get(f"http://127.0.0.1:{admin}/api/config", headers=auth)).json()["version"]
            info = rt.metrics.registry.get_sample_value("gateway_config_info", {"version": answer})
            assert info == 1.0, "gateway_config_info shows the version /api/config does"
            return str(answer)

        async def body_of_next(n: int) -> str:
            r = await client.post(f"http://127.0.0.1:{api}/events/x", json={"n": n})
            assert r.status_code == 202, r.text
            await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == n, what=f"message {n} written")
            return str(jsonl(tmp_path / "out.jsonl")[-1]["body"])

        first = await version()
        assert await body_of_next(1) == "one 1 -- first footer"

        # The template alone: routes.yaml is the same text in the new timestamped directory.
        mount.publish({**files, "body.j2": b"two {{ data.n }} {% include 'footer.j2' %}"})
        await wait_for(lambda: rt.reloader.status.outcome == "applied" and rt.config.version != first,
                       timeout=15, what="the template swap applied")
        second = await version()
        assert second != first
        assert await body_of_next(2) == "two 2 -- first footer"

        # What the template includes, alone.
        mount.publish({**files, "body.j2": b"two {{ data.n }} {% include 'footer.j2' %}",
                       "footer.j2": b"-- second footer"})
        await wait_for(lambda: rt.config.version not in (first, second), timeout=15, what="the include swap applied")
        assert await body_of_next(3) == "two 3 -- second footer"
        third = await version()

        # Asked for without a change: nothing to do.
        r = await client.post(f"http://127.0.0.1:{admin}/api/reload", headers=auth)
        assert r.status_code == 200 and r.json()["outcome"] == "unchanged" and r.json()["version"] == third


async def test_reload_api_applies_a_template_edited_alone(tmp_path: Path) -> None:
    """No watcher: ``POST /api/reload`` after a template edit applies it (it answered "unchanged")."""
    api, admin = free_port(), free_port()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "body.j2").write_text("before {{ data.n }}")
    (tmp_path / "routes.yaml").write_text(head(tmp_path, admin) + f"""\
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  out: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - name: events
    from: api
    to: [{{connector: out, body: {{file: templates/body.j2}}}}]
""")
    async with gateway_on(tmp_path / "routes.yaml") as rt, httpx.AsyncClient(timeout=10) as client:
        before = rt.config.version
        (tmp_path / "templates" / "body.j2").write_text("after {{ data.n }}")
        r = await client.post(f"http://127.0.0.1:{admin}/api/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "applied" and r.json()["previous"] == before
        assert (await client.post(f"http://127.0.0.1:{api}/events/x", json={"n": 7})).status_code == 202
        await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == 1, what="the message written")
        assert jsonl(tmp_path / "out.jsonl")[0]["body"] == "after 7"


# --- TLS certificates renewed in place -------------------------------------------------------------

def smtp_serial(port: int, client: ssl.SSLContext, *, implicit: bool) -> int:
    """The serial of the certificate a new SMTP connection is served (STARTTLS or implicit TLS)."""
    if implicit:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=client, timeout=10)
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        smtp.starttls(context=client)
    try:
        sock = smtp.sock
        assert isinstance(sock, ssl.SSLSocket)
        return serial_of_der(sock.getpeercert(binary_form=True))
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            smtp.quit()


def https_serial(port: int, client: ssl.SSLContext) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return serial_of_der(tls.getpeercert(binary_form=True))


async def test_smtp_serves_a_renewed_certificate_to_the_next_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    first, second, third = (ca.issue_cert("127.0.0.1") for _ in range(3))
    secret = Mount(tmp_path / "tls", pair(first))
    starttls, implicit, admin = free_port(), free_port(), free_port()
    tls = f'{{cert: "{secret.path / "tls.crt"}", key: "{secret.path / "tls.key"}"}}'
    (tmp_path / "routes.yaml").write_text(head(tmp_path, admin) + f"""\
connectors:
  mx: {{type: smtp, listen: "127.0.0.1:{starttls}", recipients: [example.com], tls: {tls}}}
  mxs: {{type: smtp, listen: "127.0.0.1:{implicit}", recipients: [example.com], tls: {tls}, implicit_tls: true}}
  out: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - {{name: mail, from: [mx, mxs], to: [{{connector: out}}]}}
""")
    async with gateway_on(tmp_path / "routes.yaml"):
        for port, is_implicit in ((starttls, False), (implicit, True)):
            assert await asyncio.to_thread(smtp_serial, port, client, implicit=is_implicit) == serial_of_pem(first)

        secret.publish(pair(second))
        for port, is_implicit in ((starttls, False), (implicit, True)):
            await until(functools.partial(smtp_serial, port, client, implicit=is_implicit),
                        serial_of_pem(second), f"the renewed certificate on {'SMTPS' if is_implicit else 'STARTTLS'}")

        # Half a renewal (the certificate written, its key not yet): the pair in place is served, and
        # the refusal logged once per listener, however many connections come meanwhile.
        with caplog.at_level(logging.WARNING):
            secret.publish(pair(third, key_of=second))
            for _ in range(4):
                await asyncio.sleep(0.6)
                assert await asyncio.to_thread(smtp_serial, starttls, client, implicit=False) == serial_of_pem(second)
                assert await asyncio.to_thread(smtp_serial, implicit, client, implicit=True) == serial_of_pem(second)
        refusals = [r for r in caplog.records if r.getMessage() == "tls.reload_failed"]
        assert len(refusals) == 2, [r.__dict__.get("fields") for r in refusals]

        secret.publish(pair(third))
        await until(lambda: smtp_serial(starttls, client, implicit=False), serial_of_pem(third), "the completed pair")


async def test_https_listeners_serve_a_renewed_certificate(tmp_path: Path) -> None:
    """TLS per listen address in ``gateway.http``: the REST data plane and the admin API over HTTPS."""
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    secret = Mount(tmp_path / "tls", pair(first))
    api, admin = free_port(), free_port()
    tls = f'tls: {{cert: "{secret.path / "tls.crt"}", key: "{secret.path / "tls.key"}"}}'
    http = f'  http:\n    "127.0.0.1:{api}": {{{tls}}}\n    "127.0.0.1:{admin}": {{{tls}}}\n'
    (tmp_path / "routes.yaml").write_text(head(tmp_path, admin, http) + f"""\
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  out: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - {{name: events, from: api, to: [{{connector: out}}]}}
""")
    async with gateway_on(tmp_path / "routes.yaml"), httpx.AsyncClient(verify=client, timeout=10) as http_client:
        r = await http_client.post(f"https://127.0.0.1:{api}/events/1", json={"n": 1})
        assert r.status_code == 202, r.text
        assert (await http_client.get(f"https://127.0.0.1:{admin}/healthz")).status_code == 200
        for port in (api, admin):
            assert await asyncio.to_thread(https_serial, port, client) == serial_of_pem(first)

        secret.publish(pair(second))
        for port in (api, admin):
            await until(functools.partial(https_serial, port, client), serial_of_pem(second),
                        f"the renewed certificate on {port}")
        async with httpx.AsyncClient(verify=client, timeout=10) as fresh:
            assert (await fresh.post(f"https://127.0.0.1:{api}/events/2", json={"n": 2})).status_code == 202
