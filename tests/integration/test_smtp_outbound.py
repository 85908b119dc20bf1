"""SMTP outbound through a real in-process gateway to a real relay (aiosmtpd Controller).

REST (or SMTP) in, the smtp connector out: the relay's 4xx is retried and the message arrives
once; its 5xx dead-letters with the relay's reply; a templated header that would inject a line
never reaches the relay; STARTTLS, SMTPS, AUTH and connection reuse work against the real thing.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from connectors.mail_common import parse_message
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_smtp_peers import Relay, RelayHandler, make_certs, swaks

pytestmark = pytest.mark.integration

RETRY_FAST = "on_failure: {retry: {attempts: 40, initial: 0.05s, max: 0.2s}}"


def gateway_yaml(rest_port: int, relay: dict[str, Any], *, target: str = "", policy: str = RETRY_FAST,
                 extra: str = "") -> str:
    smtp = {"type": "smtp", "starttls": "off", "sender": "Gateway <gw@example.com>", "timeout": "5s", **relay}
    target = target or """
        to: ["ops@example.com"]
        cc: "Audit <audit@example.com>"
        subject: "Site {{ data.site }}: {{ data.title }}"
        text: "Temperature {{ data.temperature }} °C"
        attachments: [{filename: reading.json}]"""
    return f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest_port}", auth: {{type: none}}, endpoints: [{{path: "/alerts/**"}}]}}
  ops: {json.dumps(smtp)}
{extra}
routes:
  - name: alerts-to-ops
    from: api
    to:
      - connector: ops{target}
    {policy}
"""


async def post(port: int, payload: dict[str, Any]) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.post(f"http://127.0.0.1:{port}/alerts/boiler", json=payload)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


ALERT = {"site": "7", "title": "boiler hot", "temperature": 93.5}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


async def test_4xx_then_2xx_arrives_once(tmp_path: Path) -> None:
    rest = free_port()
    with Relay(RelayHandler(data_replies=["451 4.3.0 Try again later"])) as relay:
        async with running_gateway(tmp_path, gateway_yaml(rest, {"url": f"smtp://127.0.0.1:{relay.port}"})) as rt:
            env_id = await post(rest, ALERT)
            await wait_for(lambda: len(relay.handler.messages) == 1, what="the retried message")
            await asyncio.sleep(0.5)  # room for a wrong second delivery to show up
            assert len(relay.handler.messages) == 1 and await rt.spool.dead_letters() == []
    msg = relay.handler.messages[0]
    # both attempts carried the same Message-ID, so a receiver could deduplicate a retry
    first, second = (parse_message(a)["message_id"] for a in relay.handler.attempts)
    assert first == second
    assert msg.mail_from == "gw@example.com"
    assert msg.rcpt_tos == ["ops@example.com", "audit@example.com"]
    view = parse_message(msg.original_content)
    assert view["subject"] == "Site 7: boiler hot"
    assert view["headers"]["from"] == "Gateway <gw@example.com>"
    assert view["to"] == ["ops@example.com"] and view["cc"] == ["audit@example.com"]
    assert view["text"] == "Temperature 93.5 °C\n"
    body = json.dumps(ALERT, separators=(",", ":")).encode()
    assert view["attachments"] == [{"filename": "reading.json", "content_type": "application/json",
                                    "size": len(body), "disposition": "attachment"}]
    assert view["message_id"].startswith(f"{env_id}.") and view["message_id"].endswith("@example.com")
    assert view["headers"]["x-gateway-envelope-id"] == env_id
    assert view["headers"]["auto-submitted"] == "auto-generated"


TWO_TEMPLATED_RECIPIENTS = """
        to: ["{{ data.to }}", "{{ data.also | default('') }}"]"""


async def test_5xx_goes_to_the_dead_letters_with_the_relay_reply(tmp_path: Path) -> None:
    rest = free_port()
    handler = RelayHandler(data_replies=["554 5.7.1 Message rejected as spam"],
                           rcpt_replies={"gone@example.com": "550 5.1.1 No such user",
                                         "busy@example.com": "450 4.2.1 Mailbox busy"})
    with Relay(handler) as relay:
        async with running_gateway(tmp_path, gateway_yaml(rest, {"url": f"smtp://127.0.0.1:{relay.port}"},
                                                          target=TWO_TEMPLATED_RECIPIENTS)) as rt:
            spam = await post(rest, {"to": "ops@example.com"})
            await wait_for(rt.spool.dead_letters, what="the first dead letter")
            gone = await post(rest, {"to": "gone@example.com"})
            partial = await post(rest, {"to": "ops@example.com", "also": "gone@example.com"})
            await wait_for(lambda: _count(rt, 3), what="three dead letters")
            busy = await post(rest, {"to": "busy@example.com"})
            await wait_for(lambda: handler.rcpts_seen.count("busy@example.com") >= 3, what="a 450 to be retried")
            dead = {d.envelope_id: d for d in await rt.spool.dead_letters()}
    assert dead[spam].reason == "permanent" and "554 5.7.1 Message rejected as spam" in dead[spam].last_error
    assert "550 5.1.1 No such user" in dead[gone].last_error and "every recipient" in dead[gone].last_error
    # the relay took it for ops@ but refused gone@: recorded, and the others have it
    assert "gone@example.com" in dead[partial].last_error and "the others have it" in dead[partial].last_error
    assert [m.rcpt_tos for m in handler.messages] == [["ops@example.com"]]
    assert busy not in dead  # 4xx is never permanent


async def _count(rt: Any, n: int) -> bool:
    return len(await rt.spool.dead_letters()) == n


async def test_header_injection_through_a_template_is_refused(tmp_path: Path) -> None:
    rest = free_port()
    with Relay() as relay:
        async with running_gateway(tmp_path, gateway_yaml(rest, {"url": f"smtp://127.0.0.1:{relay.port}"})) as rt:
            env_id = await post(rest, {**ALERT, "title": "hot\r\nBcc: victim@attacker.test"})
            await wait_for(rt.spool.dead_letters, what="the dead letter")
            dead = await rt.spool.dead_letters()
    assert [(d.envelope_id, d.reason) for d in dead] == [(env_id, "template")]  # refused as rendered
    assert "header injection refused" in dead[0].last_error
    assert relay.handler.messages == [] and relay.handler.ehlo_count == 0  # never even connected


async def test_starttls_auth_and_connection_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_PASSWORD", "relay-s3cret")
    rest = free_port()
    certs = make_certs(tmp_path / "tls")
    relay_cfg = {"url": "smtp://localhost:{port}", "starttls": "required", "username": "gw",
                 "password": "${RELAY_PASSWORD}", "ca_file": certs.ca, "keepalive": "30s"}
    with Relay(tls=certs.server_context(), users={"gw": "relay-s3cret"}) as relay:
        relay_cfg["url"] = f"smtp://localhost:{relay.port}"
        async with running_gateway(tmp_path, gateway_yaml(rest, relay_cfg)) as rt:
            for n in range(3):
                await post(rest, {**ALERT, "title": f"alert {n}"})
                await wait_for(lambda n=n: len(relay.handler.messages) == n + 1, what=f"message {n}")
            health = rt.readiness()[1]["connectors"]["ops"]
    assert health["up"] is True
    assert [parse_message(m.original_content)["subject"] for m in relay.handler.messages] == [
        "Site 7: alert 0", "Site 7: alert 1", "Site 7: alert 2"]
    assert all(s.authenticated and s.ssl is not None for s in relay.handler.sessions)
    # one connection for all three: EHLO once in clear, once after STARTTLS
    assert relay.handler.ehlo_count == 2


async def test_a_relay_password_renewed_in_its_file_is_used_at_the_next_connection(tmp_path: Path) -> None:
    """The relay password given as {file: …} is read again for every new connection: after the
    relay's password and the file both change, the next message logs in with the new one."""
    rest = free_port()
    certs = make_certs(tmp_path / "tls")
    secret = tmp_path / "relay-password"
    secret.write_text("first-s3cret\n")
    users = {"gw": "first-s3cret"}
    relay_cfg = {"starttls": "required", "username": "gw", "password": {"file": str(secret)},
                 "ca_file": certs.ca, "keepalive": "0s"}  # a new connection for every message
    with Relay(tls=certs.server_context(), users=users) as relay:
        relay_cfg["url"] = f"smtp://localhost:{relay.port}"
        async with running_gateway(tmp_path, gateway_yaml(rest, relay_cfg)) as rt:
            await post(rest, {**ALERT, "title": "before"})
            await wait_for(lambda: len(relay.handler.messages) == 1, what="the first message")
            users["gw"] = "renewed-s3cret"  # the relay's side changes first, as a rotation does
            secret.write_text("renewed-s3cret\n")
            await post(rest, {**ALERT, "title": "after"})
            await wait_for(lambda: len(relay.handler.messages) == 2, what="the message after the renewal")
            assert await rt.spool.count_dead_letters() == 0
    assert [parse_message(m.original_content)["subject"] for m in relay.handler.messages] == [
        "Site 7: before", "Site 7: after"]
    assert all(s.authenticated for s in relay.handler.sessions)


async def test_smtps_relay_and_certificate_verification(tmp_path: Path) -> None:
    rest = free_port()
    certs = make_certs(tmp_path / "tls")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with Relay(tls=certs.server_context(), implicit_tls=True) as relay:
        good = {"url": f"smtps://localhost:{relay.port}", "starttls": None, "ca_file": certs.ca}
        (tmp_path / "good").mkdir()
        (tmp_path / "bad").mkdir()
        async with running_gateway(tmp_path / "good", gateway_yaml(rest, good)):
            await post(rest, ALERT)
            # the relay speaks nothing but TLS on this port
            await wait_for(lambda: len(relay.handler.messages) == 1, what="the message over SMTPS")
        # a relay whose certificate we cannot verify never gets the message
        bad = {**good, "ca_file": str(other_ca)}
        policy = "on_failure: {retry: {attempts: 2, initial: 0.05s, max: 0.1s}}"
        async with running_gateway(tmp_path / "bad", gateway_yaml(rest, bad, policy=policy), wait_ready=False) as rt:
            env_id = await post(rest, ALERT)
            await wait_for(rt.spool.dead_letters, what="the dead letter")
            dead = await rt.spool.dead_letters()
            assert rt.readiness()[1]["connectors"]["ops"]["up"] is False
    assert [(d.envelope_id, d.reason) for d in dead] == [(env_id, "attempts")]
    assert "CERTIFICATE_VERIFY_FAILED" in dead[0].last_error
    assert len(relay.handler.messages) == 1


async def test_relay_down_then_up(tmp_path: Path) -> None:
    rest = free_port()
    handler = RelayHandler()
    relay = Relay(handler)
    async with running_gateway(tmp_path, gateway_yaml(rest, {"url": f"smtp://127.0.0.1:{relay.port}"}),
                               wait_ready=False) as rt:
        await post(rest, ALERT)
        await wait_for(lambda: not rt.readiness()[1]["connectors"]["ops"]["up"], what="the connector to be down")
        assert "cannot connect" in rt.readiness()[1]["connectors"]["ops"]["detail"]
        with relay:
            await wait_for(lambda: len(handler.messages) == 1, timeout=15, what="delivery after recovery")
            await wait_for(lambda: rt.readiness()[1]["connectors"]["ops"]["up"], what="the connector to be up")
        assert await rt.spool.dead_letters() == []


async def test_inbound_mail_is_relayed_unchanged(tmp_path: Path) -> None:
    smtp_in = free_port()
    inbound = {"type": "smtp", "listen": f"127.0.0.1:{smtp_in}", "recipients": ["example.com"]}
    with Relay() as relay:
        yaml = f"""
connectors:
  mail-in: {json.dumps(inbound)}
  ops: {json.dumps({"type": "smtp", "url": f"smtp://127.0.0.1:{relay.port}", "starttls": "off"})}
routes:
  - name: relay-everything
    from: mail-in
    to: [{{connector: ops}}]
    {RETRY_FAST}
"""
        async with running_gateway(tmp_path, yaml):
            rc, out = await swaks("--server", f"127.0.0.1:{smtp_in}", "--from", "sensor@plant.test",
                                  "--to", "ops@example.com", "--header", "Subject: pass me on",
                                  "--header", f"Traceparent: {TRACEPARENT}", "--body", "as is")
            assert rc == 0, out
            await wait_for(lambda: len(relay.handler.messages) == 1, what="the relayed message")
    msg = relay.handler.messages[0]
    assert msg.mail_from == "sensor@plant.test" and msg.rcpt_tos == ["ops@example.com"]
    sent = out.split("<-  354 ", 1)[1].split(" -> .\n", 1)[0]
    sent_lines = [line[4:] for line in sent.splitlines()[1:]]  # swaks prints " -> " before each line
    # unchanged but for the trace context of the gateway's hop on top (same trace, the sender's
    # own Traceparent kept below it)
    ours, *relayed = msg.original_content.decode().split("\r\n")
    assert ours.startswith(f"Traceparent: {TRACEPARENT[:36]}")
    assert relayed[: len(sent_lines)] == sent_lines
    assert parse_message(msg.original_content)["subject"] == "pass me on"
