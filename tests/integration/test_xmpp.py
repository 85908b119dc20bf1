"""The XMPP connector against a real Prosody (STARTTLS required, stream management on), with
real slixmpp clients as the people on the other end, and through a real gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import trustme
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

import tests.contract
from connectors.xmpp import XmppConnector
from gateway.contract import Connector, Outcome, PermanentError, Target, TransientError
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.registry import Registry
from tests.contract import InboundContract, OutboundContract, make_connector
from tests.gwtest import free_port, running_gateway, wait_for, write_config
from tests.peers.gateway_process import GatewayProcess
from tests.peers.prosody import MUC_DOMAIN, Prosody, XmppUser, prosody, start_prosody

pytestmark = pytest.mark.integration
__all__ = ["prosody"]  # the session fixture, imported so pytest finds it

KINDS = {"xmpp": XmppConnector}


def registry() -> Registry:
    return Registry(dict(KINDS))


@pytest.fixture(autouse=True)
def _our_kinds_in_the_contract_suite(monkeypatch: pytest.MonkeyPatch) -> None:
    # Until pyproject.toml registers the xmpp entry point, the shared suite's Registry() needs it.
    monkeypatch.setattr(tests.contract, "Registry", registry)


def secret_file(tmp_path: Path, value: str) -> dict[str, str]:
    path = tmp_path / f"secret-{uuid.uuid4().hex[:6]}"
    path.write_text(value)
    return {"file": str(path)}


def xmpp_config(server: Prosody, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"jid": "gateway@localhost", "password": secret_file(tmp_path, server.users["gateway"]),
            "host": "127.0.0.1", "port": server.port, "ca_file": str(server.ca_file), "connect_timeout": 5,
            "ack_timeout": 5, **extra}


def connector(server: Prosody, tmp_path: Path, **extra: Any) -> XmppConnector:
    c = make_connector("xmpp", xmpp_config(server, tmp_path, **extra), tmp_path, name="chat")
    assert isinstance(c, XmppConnector)
    return c


def target(to: str, **options: Any) -> Target:
    return Target(route="test", connector="chat", options=XmppConnector.Options.model_validate({"to": to, **options}))


def text_env(body: bytes) -> Envelope:
    return Envelope(source="test", protocol="test", subject="t", body=body, content_type="text/plain")


# --- the shared contract ---------------------------------------------------------------------


class TestXmppOutboundContract(OutboundContract):
    kind = "xmpp"

    @pytest.fixture(autouse=True)
    async def _alice(self, prosody: Prosody) -> AsyncIterator[None]:
        self.server = prosody
        async with XmppUser(prosody, "alice") as alice:
            self.alice = alice
            yield

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return xmpp_config(self.server, tmp_path)

    def options(self) -> dict[str, Any]:
        return {"to": "alice@localhost"}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        return {**self.config(tmp_path), "port": free_port(), "connect_timeout": 1}

    async def received(self, tmp_path: Path) -> list[bytes]:
        return [b.encode() for b in self.alice.bodies()]


class TestXmppInboundContract(InboundContract):
    kind = "xmpp"

    @pytest.fixture(autouse=True)
    def _server(self, prosody: Prosody) -> None:
        self.server = prosody

    def config(self, tmp_path: Path) -> dict[str, Any]:
        return xmpp_config(self.server, tmp_path)

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        async with XmppUser(self.server, "alice") as alice:
            kind, _ = await alice.answer(alice.send_chat("gateway@localhost", body.decode()))
            return kind


# --- through a real gateway ------------------------------------------------------------------


def _mqtt_publish(topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gw-xmpp-test-{uuid.uuid4().hex[:8]}")
    try:
        client.connect("127.0.0.1", 1883)
    except OSError as exc:
        pytest.fail(f"Mosquitto is not listening on 127.0.0.1:1883 ({exc}): run scripts/peers.sh "
                    "(apt-get install -y mosquitto)")
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


async def test_an_mqtt_alert_reaches_a_prosody_user(tmp_path: Path, prosody: Prosody) -> None:
    root = f"plant-{uuid.uuid4().hex[:8]}"
    pw = tmp_path / "xmpp.pw"
    pw.write_text(prosody.users["gateway"])
    yaml = f"""
connectors:
  plant: {{type: mqtt, url: "mqtt://127.0.0.1:1883", subscribe: ["{root}/+/boiler/alert"], qos: 1,
           client_id: "{root}", clean_start: true}}
  chat: {{type: xmpp, jid: "gateway@localhost", password: {{file: "{pw}"}}, host: 127.0.0.1,
          port: {prosody.port}, ca_file: "{prosody.ca_file}"}}
routes:
  - name: boiler-to-chat
    from: plant
    match: {{subject: "{root}/+/boiler/alert", when: "data.temperature > 90"}}
    to:
      - connector: chat
        to: "{{{{ data.operator }}}}@localhost"
        body: "Boiler {{{{ data.site }}}} at {{{{ data.temperature }}}} °C"
"""
    async with XmppUser(prosody, "alice") as alice, running_gateway(tmp_path, yaml, registry=registry()):
        _mqtt_publish(f"{root}/7/boiler/alert", json.dumps({"site": "north", "temperature": 80,
                                                            "operator": "alice"}).encode())
        _mqtt_publish(f"{root}/7/boiler/alert", json.dumps({"site": "north", "temperature": 97,
                                                            "operator": "alice"}).encode())
        msg = await alice.wait_message(lambda m: "Boiler north" in str(m["body"]))
        assert str(msg["body"]) == "Boiler north at 97 °C"
        assert msg["from"].bare == "gateway@localhost" and msg["type"] == "chat"
        await asyncio.sleep(0.3)
        assert alice.bodies() == ["Boiler north at 97 °C"]  # the 80 °C one did not match


async def test_chat_to_the_gateway_reaches_the_file_sink_routed_by_sender(tmp_path: Path, prosody: Prosody) -> None:
    out = tmp_path / "chat.jsonl"
    pw = tmp_path / "xmpp.pw"
    pw.write_text(prosody.users["gateway"])
    yaml = f"""
connectors:
  chat: {{type: xmpp, jid: "gateway@localhost", password: {{file: "{pw}"}}, host: 127.0.0.1,
          port: {prosody.port}, ca_file: "{prosody.ca_file}"}}
  sink: {{type: file, path: "{out}"}}
routes:
  - name: alice-only
    from: chat
    match: {{subject: "*@localhost", when: 'attributes["xmpp.from"] == "alice@localhost"'}}
    to: [{{connector: sink}}]
"""
    async with running_gateway(tmp_path, yaml, registry=registry()), \
            XmppUser(prosody, "alice") as alice, XmppUser(prosody, "bob") as bob:
        assert await alice.answer(alice.send_chat("gateway@localhost", "disk 91% on db-1")) == ("ack", "")
        kind, condition = await bob.answer(bob.send_chat("gateway@localhost", "from bob"))
        assert (kind, condition) == ("permanent", "not-acceptable")  # no route: rejected, answered
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 1
    rec = lines[0]
    assert rec["body"] == "disk 91% on db-1" and rec["subject"] == "alice@localhost"
    assert rec["protocol"] == "xmpp" and rec["source"] == "chat"
    assert rec["attributes"]["xmpp.from"] == "alice@localhost"
    assert rec["attributes"]["xmpp.from_full"].startswith("alice@localhost/")
    assert rec["attributes"]["xmpp.type"] == "chat"


async def test_a_chat_in_flight_when_the_gateway_is_killed_is_delivered_after_restart(
        tmp_path: Path, prosody: Prosody) -> None:
    """SIGKILL of a gateway process while a chat message waits for its outcome (a direct route
    to a REST service that does not answer): the message was never acknowledged to Prosody, so
    Prosody stores it offline and the restarted gateway gets it again."""
    hang = asyncio.Event()
    got: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(await request.read())
        await hang.wait()  # the first request waits until the gateway that sent it is dead
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    rest_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", rest_port).start()
    user = f"gw{uuid.uuid4().hex[:6]}"  # a JID of its own: no offline mail left from other tests
    prosody.register(user, "pw-" + user)
    pw = tmp_path / "xmpp.pw"
    pw.write_text("pw-" + user)
    admin = free_port()
    yaml = f"""
connectors:
  chat: {{type: xmpp, jid: "{user}@localhost", password: {{file: "{pw}"}}, host: 127.0.0.1,
          port: {prosody.port}, ca_file: "{prosody.ca_file}"}}
  backend: {{type: rest, base_url: "http://127.0.0.1:{rest_port}", timeout: 60s}}
routes:
  - name: chat-to-backend
    from: chat
    mode: direct
    timeout: 60s
    to: [{{connector: backend, path: /inbox}}]
"""
    config = write_config(tmp_path, yaml, admin_port=admin)
    gw = GatewayProcess(config, admin, {"xmpp": "connectors.xmpp:XmppConnector"}, tmp_path / "gw.log")
    try:
        await asyncio.to_thread(gw.start)
        async with XmppUser(prosody, "alice") as alice:
            sent = alice.send_chat(f"{user}@localhost", "kill me softly")
            await wait_for(lambda: len(got) == 1, what="the first delivery attempt")
            gw.kill()
            hang.set()
            await asyncio.to_thread(gw.start)
            await wait_for(lambda: len(got) == 2, timeout=15, what="the delivery after restart")
            assert got == [b"kill me softly", b"kill me softly"]
            assert (await alice.answer(sent))[0] == "ack"
            await asyncio.sleep(0.5)
            assert len(got) == 2
    finally:
        gw.kill()
        await runner.cleanup()


# --- the connector alone: failure paths ------------------------------------------------------


async def test_wrong_password_is_reported_and_retried_not_crashed(tmp_path: Path, prosody: Prosody) -> None:
    c = make_connector("xmpp", {**xmpp_config(prosody, tmp_path), "password": secret_file(tmp_path, "nope"),
                                "connect_timeout": 1}, tmp_path)
    try:
        with pytest.raises(TransientError, match="authentication failed"):
            await c.open()
        assert not c.health().up and "authentication" in c.health().detail
        with pytest.raises(TransientError):
            await c.send(text_env(b"x"), target("alice@localhost"))
    finally:
        await c.close()


async def test_an_untrusted_certificate_stops_the_login(tmp_path: Path, prosody: Prosody) -> None:
    cfg = {**xmpp_config(prosody, tmp_path), "connect_timeout": 1}
    del cfg["ca_file"]
    c = make_connector("xmpp", cfg, tmp_path)
    before = prosody.log_text().count("Authenticated as gateway@localhost")
    try:
        with pytest.raises(TransientError, match="TLS"):
            await c.open()
        assert "certificate" in c.health().detail.lower()
    finally:
        await c.close()
    assert prosody.log_text().count("Authenticated as gateway@localhost") == before


async def test_outbound_refusals_are_permanent(tmp_path: Path, prosody: Prosody) -> None:
    c = connector(prosody, tmp_path, max_body=100, rooms=[f"ops@{MUC_DOMAIN}"])
    await c.open()
    try:
        for env, tgt, why in [
            (Envelope(source="t", protocol="t", subject="s", body=b"\xff\xfe"), target("alice@localhost"), "UTF-8"),
            (text_env(b"x" * 101), target("alice@localhost"), "max_body"),
            (text_env(b"bell \x07"), target("alice@localhost"), "control characters"),
            (text_env(b"hi"), target("not a jid@@localhost"), "not a valid JID"),
            (text_env(b"hi"), target(f"other@{MUC_DOMAIN}", type="groupchat"), "not in this connector's rooms"),
        ]:
            with pytest.raises(PermanentError, match=why):
                await c.send(env, tgt)
    finally:
        await c.close()


async def test_a_bounce_after_the_ack_is_logged_with_the_envelope_id(
        tmp_path: Path, prosody: Prosody, caplog: pytest.LogCaptureFixture) -> None:
    c = connector(prosody, tmp_path)
    await c.open()
    try:
        env = text_env(b"to nobody")
        with caplog.at_level(logging.WARNING):
            await c.send(env, target("nobody-here@localhost"))  # the server accepted the stanza
            await wait_for(lambda: any(r.getMessage() == "xmpp.bounced" for r in caplog.records),
                           what="the bounce")
        bounce = next(r for r in caplog.records if r.getMessage() == "xmpp.bounced")
        assert bounce.fields["envelope_id"] == env.id  # type: ignore[attr-defined]
        assert bounce.fields["condition"] == "service-unavailable"  # type: ignore[attr-defined]
    finally:
        await c.close()


async def test_an_oversized_chat_is_refused_as_not_acceptable(tmp_path: Path, prosody: Prosody) -> None:
    c = connector(prosody, tmp_path, max_body=100)
    seen: list[Envelope] = []

    async def deliver(env: Envelope) -> Outcome:
        seen.append(env)
        return Outcome.accepted(env.id)

    await c.open()
    await c.listen(deliver)
    try:
        async with XmppUser(prosody, "alice") as alice:
            big = alice.send_chat("gateway@localhost", "y" * 1000)
            assert await alice.answer(big) == ("permanent", "not-acceptable")
            assert "over 100 bytes" in alice.texts[big]
            assert await alice.answer(alice.send_chat("gateway@localhost", "small")) == ("ack", "")
        assert [e.body for e in seen] == [b"small"]
    finally:
        await c.stop_listening(1)
        await c.close()


async def test_chats_while_not_listening_are_kept_not_lost(tmp_path: Path, prosody: Prosody) -> None:
    """Before listen(): held and handed over when listening starts. After stop_listening(): the
    gateway is unavailable, so the server stores chats offline for the next start."""
    user = f"gw{uuid.uuid4().hex[:6]}"
    prosody.register(user, "pw-" + user)
    cfg = {**xmpp_config(prosody, tmp_path), "jid": f"{user}@localhost",
           "password": secret_file(tmp_path, "pw-" + user)}
    seen: list[Envelope] = []

    async def deliver(env: Envelope) -> Outcome:
        seen.append(env)
        return Outcome.accepted(env.id)

    first = make_connector("xmpp", cfg, tmp_path / "a")
    assert isinstance(first, XmppConnector)
    async with XmppUser(prosody, "alice") as alice:
        await first.open()
        assert first._client is not None
        alice.send_chat(str(first._client.boundjid), "before listen")
        await asyncio.sleep(0.3)
        assert not seen
        await first.listen(deliver)
        await wait_for(lambda: len(seen) == 1, what="the parked message")
        await first.stop_listening(1)
        await asyncio.sleep(0.2)
        alice.send_chat(f"{user}@localhost", "while stopped")
        await asyncio.sleep(0.3)
        await first.close()
        assert [e.body for e in seen] == [b"before listen"]
        second = make_connector("xmpp", cfg, tmp_path / "b")
        await second.open()
        await second.listen(deliver)
        try:
            await wait_for(lambda: len(seen) == 2, what="the offline message")
        finally:
            await second.stop_listening(1)
            await second.close()
    assert seen[1].body == b"while stopped" and seen[1].attributes["xmpp.delayed"]


async def test_rooms_in_and_out(tmp_path: Path, prosody: Prosody) -> None:
    room = f"ops-{uuid.uuid4().hex[:6]}@{MUC_DOMAIN}"
    async with XmppUser(prosody, "bob", rooms=(room,)) as bob:
        c = connector(prosody, tmp_path, rooms=[room], nick="gw")
        seen: list[Envelope] = []

        async def deliver(env: Envelope) -> Outcome:
            seen.append(env)
            return Outcome.accepted(env.id)

        await c.open()
        await c.listen(deliver)
        try:
            await wait_for(lambda: room in c._joined, what="the gateway in the room")
            await c.send(text_env(b"deploy finished"), target(room, type="groupchat"))
            await bob.wait_message(lambda m: str(m["body"]) == "deploy finished" and m["type"] == "groupchat")
            bob.send_chat(room, "thanks gw", mtype="groupchat", receipt=False)
            await wait_for(lambda: len(seen) >= 1, what="the room message")
            await asyncio.sleep(0.3)
            assert [e.body for e in seen] == [b"thanks gw"]  # not our own echo
            env = seen[0]
            assert env.subject == room and env.reply_to == room
            assert env.attributes["xmpp.room"] == room and env.attributes["xmpp.nick"] == "bob"
            assert env.attributes["xmpp.type"] == "groupchat"
        finally:
            await c.stop_listening(1)
            await c.close()


@pytest.fixture
def private_prosody(request: pytest.FixtureRequest) -> Iterator[Prosody]:
    server = start_prosody(smacks=getattr(request, "param", True))
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("private_prosody", [False], indirect=True)
async def test_without_stream_management_a_ping_confirms_the_send(tmp_path: Path, private_prosody: Prosody) -> None:
    c = connector(private_prosody, tmp_path)
    await c.open()
    try:
        assert c._client is not None and not c._client.plugin["xep_0198"].enabled_out
        async with XmppUser(private_prosody, "alice") as alice:
            await c.send(text_env(b"confirmed by ping"), target("alice@localhost"))
            await alice.wait_message(lambda m: str(m["body"]) == "confirmed by ping")
    finally:
        await c.close()


async def test_reconnects_after_the_server_restarts(tmp_path: Path, private_prosody: Prosody) -> None:
    c = connector(private_prosody, tmp_path)
    await c.open()
    try:
        private_prosody.kill()
        await wait_for(lambda: not c.health().up, what="the connector noticing")
        with pytest.raises(TransientError):
            await c.send(text_env(b"while down"), target("alice@localhost"))
        private_prosody.launch()
        await asyncio.wait_for(c.open(), timeout=15)
        async with XmppUser(private_prosody, "alice") as alice:
            await c.send(text_env(b"after restart"), target("alice@localhost"))
            await alice.wait_message(lambda m: str(m["body"]) == "after restart")
    finally:
        await c.close()


# --- a hostile server ------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "condition"), [
    (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;'>]>", "restricted-xml"),
    (b"<message><body>" + b"A" * 300_000, "policy-violation"),
    (b"<message>" + b"<a>" * 100, "policy-violation"),
    (b"<message><body>&undefined;</body></message>", "not-well-formed"),
], ids=["dtd-entities", "huge-stanza", "deep-nesting", "undefined-entity"])
async def test_hostile_xml_from_the_server_ends_the_stream_cleanly(
        tmp_path: Path, payload: bytes, condition: str, caplog: pytest.LogCaptureFixture) -> None:
    """A fake server speaking direct TLS sends hostile XML after its stream header."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        header = (b"<?xml version='1.0'?>" if payload.startswith(b"<?xml") else b"")
        opening = (b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                   b"id='x' from='localhost' version='1.0'>")
        writer.write(payload if header else opening + payload)
        await writer.drain()
        try:
            received.append(await asyncio.wait_for(reader.read(65536), timeout=5))
        except (TimeoutError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    pw = tmp_path / "pw"
    pw.write_text("x")
    c = make_connector("xmpp", {"jid": "gateway@localhost", "password": {"file": str(pw)}, "host": "127.0.0.1",
                                "port": port, "tls": "direct", "ca_file": str(ca_file), "connect_timeout": 1,
                                "max_stanza": 256 * 1024}, tmp_path)
    try:
        with caplog.at_level(logging.ERROR):
            with pytest.raises(TransientError, match="refused the server's stream"):
                await c.open()
        assert not c.health().up
        hostile = [r for r in caplog.records if r.getMessage() == "xmpp.hostile_input"]
        assert hostile and hostile[0].fields["condition"] == condition  # type: ignore[attr-defined]
        await wait_for(lambda: bool(received), what="the stream error")
        assert condition.encode() in received[0]
        assert b"AAAA" not in b"".join(r.getMessage().encode() for r in caplog.records)  # no echo of the data
    finally:
        await c.close()
        server.close()
        await server.wait_closed()
