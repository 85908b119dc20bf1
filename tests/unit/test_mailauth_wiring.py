"""How the mail connectors carry mailauth: the config rules, OutboundSealing's contract (never
sent weaker; a sealer that cannot work is temporary and shows in health), the Return-Path of
fetched mail. The end-to-end runs are in tests/integration/test_mailauth_*.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from connectors.imap.config import ImapTarget
from connectors.imap.mapping import authenticate, return_path
from connectors.mailauth import OutboundSealing, SealSettings
from connectors.maildir import MaildirConfig, MaildirTarget
from connectors.pop3 import Pop3Config
from connectors.smtp import SmtpConnector
from connectors.smtp.config import SmtpConfig, SmtpTarget
from gateway.config.yamlsrc import FromEnv
from gateway.contract import PermanentError, TransientError
from tests.contract import make_connector
from tests.mailauth_support import make_ca, make_mail_cert, message, pem, rsa_key, wire

DKIM_KEY = pem(rsa_key())


def dkim() -> dict[str, Any]:
    return {"domain": "gw.test", "selector": "gw", "key": FromEnv(DKIM_KEY)}


@pytest.fixture(scope="module")
def smime_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("smime")
    ca = make_ca()
    gw = make_mail_cert(ca, "gw@gw.test")
    (root / "gw.pem").write_bytes(gw.cert_pem + ca.cert_pem)
    return {"cert": str(root / "gw.pem"), "key": FromEnv(gw.key_pem)}


# --- config ---------------------------------------------------------------------------------


def test_smtp_takes_auth_check_inbound_and_sealing_outbound() -> None:
    cfg = SmtpConfig.model_validate({"type": "smtp", "listen": "127.0.0.1:2525", "recipients": ["gw.test"],
                                     "url": "smtp://relay:25", "starttls": "off", "auth_check": {"policy": "reject"},
                                     "dkim": dkim()})
    assert cfg.auth_check is not None and cfg.auth_check.policy == "reject" and cfg.dkim is not None
    with pytest.raises(ValidationError, match="auth_check checks mail this connector receives: it needs 'listen'"):
        SmtpConfig.model_validate({"type": "smtp", "url": "smtp://relay:25", "auth_check": {}})
    with pytest.raises(ValidationError, match="they need 'url'"):
        SmtpConfig.model_validate({"type": "smtp", "listen": "127.0.0.1:2525", "recipients": ["gw.test"],
                                   "dkim": dkim()})
    with pytest.raises(ValidationError, match="use smime or pgp on one connector, not both"):
        SmtpConfig.model_validate({"type": "smtp", "url": "smtp://relay:25",
                                   "smime": {"sign": False, "encrypt": True, "recipients": "/x"},
                                   "pgp": {"home": "/x", "sign_key": "ABCDEF0123"}})


def test_targets_take_seal_options_and_check_them() -> None:
    for target in (SmtpTarget, MaildirTarget, ImapTarget):
        opts = target.model_validate({"to": ["a@b.test"], "seal": {"encrypt": True, "missing_key": "plain"}})
        assert opts.seal is not None and opts.seal.encrypt is True  # type: ignore[attr-defined]
        with pytest.raises(ValidationError, match="missing_key"):
            target.model_validate({"seal": {"missing_key": "maybe"}})


def test_maildir_seals_and_pop3_checks_but_not_the_other_way_round() -> None:
    assert MaildirConfig.model_validate({"type": "maildir", "path": "/x", "dkim": dkim()}).dkim is not None
    with pytest.raises(ValidationError, match="auth_check"):
        MaildirConfig.model_validate({"type": "maildir", "path": "/x", "auth_check": {}})
    pop3 = {"type": "pop3", "host": "h", "username": "u", "password": FromEnv("p")}
    assert Pop3Config.model_validate({**pop3, "auth_check": {"policy": "tag"}}).auth_check is not None
    with pytest.raises(ValidationError, match="dkim"):
        Pop3Config.model_validate({**pop3, "dkim": dkim()})


# --- OutboundSealing ------------------------------------------------------------------------


async def test_without_sealing_the_bytes_pass_unless_the_route_asks_for_more() -> None:
    sealing = OutboundSealing(SealSettings(), log=logging.getLogger("t"), connector="c")
    data = wire(message())
    assert await sealing.seal(data, recipients=[], options=None, envelope_id="e") is data
    assert await sealing.seal(data, recipients=[], options={"sign": False}, envelope_id="e") is data
    for ask in ({"sign": True}, {"encrypt": True}):
        with pytest.raises(PermanentError, match="the connector has no smime or pgp settings; not sent"):
            await sealing.seal(data, recipients=["a@b.test"], options=ask, envelope_id="e")


async def test_a_sealer_that_cannot_work_is_temporary_and_never_sends_unsigned(
        smime_files: dict[str, Any], tmp_path: Path) -> None:
    cert = tmp_path / "gw.pem"
    settings = SealSettings.model_validate({"smime": {**smime_files, "cert": str(cert)}, "dkim": dkim()})
    sealing = OutboundSealing(settings, log=logging.getLogger("t"), connector="c")
    with pytest.raises(TransientError, match="sealing is not usable: cannot read certificates from"):
        await sealing.open()
    assert sealing.error.startswith("sealing is not usable: cannot read certificates")
    with pytest.raises(TransientError):
        await sealing.seal(wire(message()), recipients=[], options=None, envelope_id="e")
    cert.write_bytes(Path(smime_files["cert"]).read_bytes())
    sealed = await sealing.seal(wire(message()), recipients=[], options=None, envelope_id="e")
    assert sealing.error == ""
    assert sealed.startswith(b"DKIM-Signature:") and b"multipart/signed" in sealed
    await sealing.close()
    await sealing.close()  # idempotent


async def test_smtp_keeps_listening_while_its_sealer_is_down(smime_files: dict[str, Any], tmp_path: Path) -> None:
    raw = {"listen": "127.0.0.1:2525", "recipients": ["gw.test"], "url": "smtp://127.0.0.1:9", "starttls": "off",
           "smime": {**smime_files, "cert": str(tmp_path / "missing.pem")}}
    both = make_connector("smtp", raw, tmp_path)
    assert isinstance(both, SmtpConnector)
    await both.open()  # does not raise: the inbound side must still come up
    health = both.health()
    assert not health.up and "sealing is not usable" in health.detail
    await both.close()
    out_only = make_connector("smtp", {k: v for k, v in raw.items() if k not in ("listen", "recipients")}, tmp_path)
    with pytest.raises(TransientError, match="sealing is not usable"):
        await out_only.open()
    await out_only.close()


# --- fetched mail ---------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "expected"), [
    (b"Return-Path: <bounce@example.test>\r\n", "bounce@example.test"),
    (b"Return-path: <>\r\n", ""),
    (b"X-Other: 1\r\n", ""),
    (b"Return-Path: <first@example.test>\r\nReturn-Path: <second@example.test>\r\n", "first@example.test"),
])
def test_return_path_of_fetched_mail(head: bytes, expected: str) -> None:
    assert return_path(head + wire(message())) == expected


async def test_without_a_verifier_fetched_mail_is_untouched() -> None:
    raw = wire(message())
    assert await authenticate(None, raw, connector="c") == (raw, None)
