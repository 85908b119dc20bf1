"""AMQP over TLS (``amqps://``) against a private RabbitMQ node with a TLS listener: the
gateway verifies the broker's certificate against the configured CA, and one signed by another
CA is refused (the connector stays unready, saying why)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest
import trustme

from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_broker_faults import RabbitNode
from tests.integration.test_mqtt_amqp import drain_queue, gateway_yaml, unique

pytestmark = pytest.mark.integration


class TlsNode:
    def __init__(self, node: RabbitNode, tls_port: int, ca_file: Path):
        self.node, self.tls_port, self.ca_file = node, tls_port, ca_file


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    tmp = tmp_path_factory.mktemp("rabbit-tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server.private_key_pem.write_to_path(str(tmp / "server.key"))
    (tmp / "server.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    tls_port = free_port()
    node = RabbitNode(tmp, f"listeners.ssl.1 = 127.0.0.1:{tls_port}\n"
                           f"ssl_options.cacertfile = {tmp / 'ca.pem'}\n"
                           f"ssl_options.certfile = {tmp / 'server.pem'}\n"
                           f"ssl_options.keyfile = {tmp / 'server.key'}\n"
                           "ssl_options.verify = verify_none\n"
                           "ssl_options.fail_if_no_peer_cert = false\n")
    node.start()
    try:
        yield TlsNode(node, tls_port, tmp / "ca.pem")
    finally:
        node.stop()


async def test_rest_to_amqps_is_confirmed_by_a_verified_broker(tmp_path: Path, tls_node: TlsNode,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_PW", "guest")
    port = free_port()
    queue = unique("gw.tls")
    conn = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{tls_node.node.port}/")
    async with conn:
        ch = await conn.channel()
        await ch.declare_queue(queue, durable=False, auto_delete=False)
        yaml = gateway_yaml(f"""
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  bus: {{type: amqp, url: "amqps://localhost:{tls_node.tls_port}/", username: guest, password: "${{AMQP_PW}}",
        tls: {{ca_file: "{tls_node.ca_file}"}}}}
""", f"""
  - name: in
    from: api
    mode: direct
    to: [{{connector: bus, routing_key: {queue}}}]
""")
        async with running_gateway(tmp_path, yaml), httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{port}/in", json={"n": 1})
            assert r.status_code == 202, r.text  # answered after the broker's confirm, over TLS
            got = await drain_queue(ch, queue, 1)
    assert json.loads(got[0].body) == {"n": 1}


async def test_a_broker_certificate_from_another_ca_is_refused(tmp_path: Path, tls_node: TlsNode,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMQP_PW", "guest")
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    yaml = gateway_yaml(f"""
  bus: {{type: amqp, url: "amqps://localhost:{tls_node.tls_port}/", username: guest, password: "${{AMQP_PW}}",
        tls: {{ca_file: "{tmp_path / 'other-ca.pem'}"}}, connect_timeout: 1, reconnect_min: 0.2,
        queue: {{name: {unique("gw.never")}}}}}
  out: {{type: file, path: "{tmp_path / 'o.jsonl'}"}}
""", """
  - name: r
    from: bus
    to: [{connector: out}]
""")
    async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
        async def refused() -> bool:
            ready, detail = rt.readiness()
            return not ready and "TLS: [SSL: CERTIFICATE_VERIFY_FAILED]" in detail["connectors"]["bus"]["detail"]

        await wait_for(refused, 15, what="the connector unready with a TLS error")
        await asyncio.sleep(0.5)
        assert not rt.readiness()[0]  # and it stays so: no fallback to an unverified connection
