"""SMTP inbound AUTH: exactly the mechanisms we implement are offered, and every other name is
refused with ``504 5.5.4``, logged and counted as a failed attempt (three end the session).

Real sockets and STARTTLS against a real in-process gateway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.gwtest import free_port, running_gateway
from tests.integration.test_smtp_inbound import PASSWORD, gateway_yaml, plain_auth, users_file
from tests.integration.test_smtp_peers import RawSmtp, make_certs

pytestmark = pytest.mark.integration

#: Names a client might try: attributes of the session and of aiosmtpd, SASL names we do not
#: implement, and junk.
BOGUS = ["user", "USER", "data", "failures", "CRAM-MD5", "XOAUTH2", "NTLM", "ANONYMOUS", "x" * 30]


async def test_ehlo_offers_exactly_login_and_plain_and_bogus_names_get_504(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    port = free_port()
    certs = make_certs(tmp_path / "tls")
    yaml = gateway_yaml(tmp_path, port, tls={"cert": certs.cert, "key": certs.key},
                        users={"file": users_file(tmp_path)})
    async with running_gateway(tmp_path, yaml):
        replies: dict[str, str] = {}
        for name in BOGUS:
            raw = await RawSmtp.open(port)
            await raw.starttls(certs.client_context())
            ehlo = await raw.cmd("EHLO client.test")
            auth_lines = [line for line in ehlo.splitlines() if line[4:].startswith("AUTH")]
            assert auth_lines == ["250-AUTH LOGIN PLAIN"], ehlo
            replies[name] = await raw.cmd(f"AUTH {name}")
            await raw.close()
        assert {n: r.splitlines()[0] for n, r in replies.items()} == {
            n: "504 5.5.4 Unrecognized authentication type" for n in BOGUS}
        failed = [r for r in caplog.records if r.getMessage() == "smtp.auth_failed"]
        assert [r.fields["mechanism"] for r in failed] == [n.upper()[:20] for n in BOGUS]  # type: ignore[attr-defined]
        assert "smtp.internal_error" not in caplog.text

        # Unknown mechanisms count with wrong passwords: the third failure ends the session.
        raw = await RawSmtp.open(port)
        await raw.starttls(certs.client_context())
        await raw.cmd("EHLO client.test")
        assert (await raw.cmd("AUTH user")).startswith("504 5.5.4")
        assert (await raw.cmd(plain_auth("alice", "nope"))).startswith("535 5.7.8")
        assert (await raw.cmd("AUTH CRAM-MD5")).startswith("421 4.7.0")
        assert await raw.closed()

        # The real mechanisms, in any case, still work.
        raw = await RawSmtp.open(port)
        await raw.starttls(certs.client_context())
        await raw.cmd("EHLO client.test")
        assert (await raw.cmd(plain_auth("alice", PASSWORD).replace("PLAIN", "plain"))).startswith("235")
        await raw.close()


async def test_without_users_no_auth_is_offered_and_every_mechanism_is_504(tmp_path: Path) -> None:
    port = free_port()
    certs = make_certs(tmp_path / "tls")
    yaml = gateway_yaml(tmp_path, port, tls={"cert": certs.cert, "key": certs.key})
    async with running_gateway(tmp_path, yaml):
        raw = await RawSmtp.open(port)
        await raw.starttls(certs.client_context())
        ehlo = await raw.cmd("EHLO client.test")
        assert "AUTH" not in ehlo
        for name in ("PLAIN", "LOGIN"):
            assert (await raw.cmd(f"AUTH {name}")).startswith("504 5.5.4"), name
        assert (await raw.cmd("AUTH user")).startswith("421 4.7.0")
        assert await raw.closed()
