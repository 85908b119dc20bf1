"""What the MQTT and AMQP connectors share: the connection settings and their checks, the TLS
context (on both ways a client library wraps it), and the reconnect loop with its backoff."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import trustme
from pydantic import ValidationError

from connectors.amqp.config import AmqpConfig
from connectors.broker_common.config import BrokerConfig, BrokerTls
from connectors.broker_common.connection import BrokerConnector, describe, tls_context
from connectors.mqtt.config import MqttConfig
from gateway.config.yamlsrc import FromEnv
from gateway.contract import ConnectorConfig, ConnectorContext, TransientError
from gateway.http import HttpHub

# --- the settings ----------------------------------------------------------------------------

KINDS: list[tuple[type[BrokerConfig], str]] = [(MqttConfig, "MqttTls"), (AmqpConfig, "AmqpTls")]


@pytest.mark.parametrize(("cls", "tls_model"), KINDS)
def test_both_kinds_have_the_same_settings_and_checks(cls: type[BrokerConfig], tls_model: str) -> None:
    cfg = cls.model_validate({"username": "gw", "password": FromEnv("pw"),
                              "tls": {"ca_file": "ca.pem", "server_name": "broker.test"}})
    assert (cfg.connect_timeout, cfg.reconnect_min, cfg.reconnect_max) == (10.0, 0.5, 30.0)
    assert cfg.password is not None and cfg.password.get_secret_value() == "pw"
    assert cfg.tls is not None and type(cfg.tls).__name__ == tls_model and cfg.tls.server_name == "broker.test"
    assert cls.model_validate({"reconnect_min": "1s", "reconnect_max": "1s"}).reconnect_max == 1.0
    for bad, why in [({"password": FromEnv("pw")}, "password needs username"),
                     ({"password": "inline", "username": "gw"}, "secrets are never written inline"),
                     ({"reconnect_min": 0}, "reconnect_min must be > 0 and at most reconnect_max"),
                     ({"reconnect_min": "5s", "reconnect_max": "1s"}, "reconnect_min must be > 0 and at most"),
                     ({"tls": {"ca_file": "ca.pem", "verify": False}}, "Extra inputs are not permitted"),
                     ({"tls": "on"}, f"valid dictionary or instance of {tls_model}")]:
        with pytest.raises(ValidationError, match=why):
            cls.model_validate(bad)


# --- TLS -------------------------------------------------------------------------------------


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("broker.test")
        client = self.ca.issue_cert("gateway")
        self.ca_file, self.cert_file, self.key_file = str(tmp / "ca.pem"), str(tmp / "cert.pem"), str(tmp / "key.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        client.cert_chain_pems[0].write_to_path(self.cert_file)
        client.private_key_pem.write_to_path(self.key_file)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


class TlsServer:
    """A TLS server on 127.0.0.1 with a certificate for broker.test; says ``ok`` and hangs up."""

    def __init__(self, pki: Pki, *, client_cert: bool) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        pki.server.configure_cert(self.ctx)
        if client_cert:
            pki.ca.configure_trust(self.ctx)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                conn.close()


@pytest.fixture(params=[False, True], ids=["server-auth", "mutual"])
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[TlsServer]:
    s = TlsServer(pki, client_cert=request.param)
    yield s
    s.sock.close()


def paho_way(ctx: ssl.SSLContext, port: int) -> bytes:
    """As paho connects: it wraps a socket, naming the host of the URL."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as tls:
        tls.do_handshake()
        return tls.recv(2)


async def asyncio_way(ctx: ssl.SSLContext, port: int) -> bytes:
    """As aio-pika connects: asyncio wraps a BIO, naming the host of the URL."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        return await reader.readexactly(2)
    finally:
        writer.close()


def connect_both_ways(ctx: ssl.SSLContext, port: int) -> list[bytes | str]:
    out: list[bytes | str] = []
    for way in (lambda: paho_way(ctx, port), lambda: asyncio.run(asyncio_way(ctx, port))):
        try:
            out.append(way())
        except ssl.SSLCertVerificationError as exc:
            out.append(exc.verify_message)
    return out


def test_tls_checks_the_broker_against_server_name_and_presents_our_certificate(pki: Pki, server: TlsServer) -> None:
    tls = BrokerTls(ca_file=pki.ca_file, cert_file=pki.cert_file, key_file=pki.key_file, server_name="broker.test")
    ctx = tls_context(tls)
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_REQUIRED and ctx.check_hostname
    assert connect_both_ways(ctx, server.port) == [b"ok", b"ok"]


def test_tls_without_server_name_checks_the_host_of_the_url(pki: Pki, server: TlsServer) -> None:
    mismatch = "IP address mismatch, certificate is not valid for '127.0.0.1'."
    assert connect_both_ways(tls_context(BrokerTls(ca_file=pki.ca_file)), server.port) == [mismatch, mismatch]
    wrong = tls_context(BrokerTls(ca_file=pki.ca_file, server_name="other.test"))
    other = "Hostname mismatch, certificate is not valid for 'other.test'."
    assert connect_both_ways(wrong, server.port) == [other, other]


def test_tls_without_a_ca_file_trusts_the_system_cas_only(server: TlsServer) -> None:
    refused = connect_both_ways(tls_context(None), server.port)
    assert len(refused) == 2 and all(isinstance(why, str) and "certificate" in why for why in refused), refused


def test_describe_gives_the_short_reason() -> None:
    assert describe(ConnectionRefusedError(111, "Connection refused")) == "Connection refused"
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(RuntimeError("channel closed")) == "RuntimeError: channel closed"
    # aiormq's wrapping of a certificate failure
    wrapped = RuntimeError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert describe(wrapped) == "TLS: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"


# --- the reconnect loop ----------------------------------------------------------------------


class FakeConfig(BrokerConfig):
    type: Literal["fake"] = "fake"
    url: str = "fake://broker.test:1"


class FakeBroker(BrokerConnector):
    """Refuses ``failures`` connects, then connects; :meth:`drop` ends the connection."""

    kind = "fake"
    cfg: FakeConfig

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext, failures: int) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, FakeConfig)
        self.cfg = config
        self.failures = failures
        self.attempts = 0
        self.released = 0

    async def _connect_once(self) -> None:
        self.attempts += 1
        self._lost.clear()
        if self.failures:
            self.failures -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        self._connected = True
        self._error = ""
        self._up.set()

    async def _close_connection(self) -> None:
        self.released += 1

    def _where(self) -> str:
        return "broker.test:1"

    async def close(self) -> None:
        self._closing = True
        await self._stop_runner()

    def drop(self, failures: int) -> None:
        """End the connection from our side, as AMQP does when its consumer channel fails."""
        self.failures = failures
        self._error = "consumer channel closed"
        self._lost.set()

    def lose(self) -> None:
        """The library reports a lost connection: its callback marks it down, then wakes the loop."""
        self._error = "connection lost: broker went away"
        self._connected = False
        self._up.clear()
        self._lost.set()


def fake(tmp_path: Path, failures: int, **config: Any) -> FakeBroker:
    ctx = ConnectorContext("bus", logging.getLogger("test.broker"), HttpHub(logging.getLogger("h")), str(tmp_path))
    return FakeBroker(FakeConfig.model_validate(config), ctx, failures)


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, Any]]:
    fields: list[dict[str, Any]] = [getattr(r, "fields", {}) for r in caplog.records]
    return [(r.getMessage(), f.get("retry_in", f.get("error"))) for r, f in zip(caplog.records, fields, strict=True)]


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def test_backoff_doubles_up_to_reconnect_max_and_starts_again_after_a_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = fake(tmp_path, failures=4, reconnect_min=0.01, reconnect_max=0.04)
    with caplog.at_level(logging.INFO, logger="test.broker"):
        await broker.open()
        assert broker.attempts == 5 and broker._connected
        assert logged(caplog) == [("fake.connect_failed", 0.01), ("fake.connect_failed", 0.02),
                                  ("fake.connect_failed", 0.04), ("fake.connect_failed", 0.04)]
        caplog.clear()
        broker.drop(failures=1)
        await asyncio.wait_for(until(lambda: broker.attempts == 7 and broker._up.is_set()), timeout=5)
        # the wait after the loss was reconnect_min, so the failure after it waits twice that
        assert logged(caplog) == [("fake.disconnected", "consumer channel closed"), ("fake.connect_failed", 0.02)]
        assert broker.released == 6  # after every failure and after the lost connection
        await broker.close()
        assert broker._runner is None


async def test_open_gives_up_after_connect_timeout_while_the_loop_keeps_trying(tmp_path: Path) -> None:
    broker = fake(tmp_path, failures=1000, connect_timeout=0.1, reconnect_min=0.05, reconnect_max=0.05)
    with pytest.raises(TransientError, match=r"^FAKE broker broker.test:1: connect failed: Connection refused$"):
        await broker.open()
    tried = broker.attempts
    await asyncio.sleep(0.2)
    assert broker.attempts > tried
    await broker.close()
    tried = broker.attempts
    await asyncio.sleep(0.1)
    assert broker.attempts == tried



async def test_a_connection_the_broker_drops_is_logged_and_a_close_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = fake(tmp_path, failures=0, reconnect_min=0.01, reconnect_max=0.02)
    with caplog.at_level(logging.INFO, logger="test.broker"):
        await broker.open()
        broker.lose()
        await asyncio.wait_for(until(lambda: broker.attempts == 2 and broker._up.is_set()), timeout=5)
        assert logged(caplog) == [("fake.disconnected", "connection lost: broker went away")]
        caplog.clear()
        await broker.close()
        assert logged(caplog) == []
