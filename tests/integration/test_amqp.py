"""The AMQP connector against the machine's RabbitMQ, through a real in-process gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest

from connectors.amqp import AmqpTarget
from gateway.contract import PermanentError, Target, TransientError
from gateway.envelope import Envelope
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_mqtt_amqp import RestPeer, amqp_channel, drain_queue, gateway_yaml, unique

pytestmark = pytest.mark.integration


async def _dlx(ch: aio_pika.abc.AbstractChannel) -> tuple[str, str]:
    """An exchange + queue that collect dead letters."""
    dlx, dlq = unique("gw.dlx"), unique("gw.dlq")
    ex = await ch.declare_exchange(dlx, aio_pika.ExchangeType.FANOUT, auto_delete=True)
    q = await ch.declare_queue(dlq, auto_delete=True)
    await q.bind(ex)
    return dlx, dlq


async def test_amqp_to_rest_acks_after_delivery_and_carries_headers(tmp_path: Path) -> None:
    queue = unique("gw.in")
    async with RestPeer() as peer, amqp_channel() as ch:
        yaml = gateway_yaml(f"""
  bus: {{type: amqp, queue: {{name: {queue}, queue_type: classic, durable: false}}, prefetch: 10}}
  api: {{type: rest, base_url: "{peer.url}"}}
""", """
  - name: to-api
    from: bus
    mode: direct
    to: [{connector: api, path: "/orders/{{ data.n }}"}]
""")
        async with running_gateway(tmp_path, yaml):
            for n in range(5):
                await ch.default_exchange.publish(
                    aio_pika.Message(json.dumps({"n": n}).encode(), content_type="application/json",
                                     headers={"x-tenant": "t1"}, message_id=f"m-{n}"),
                    routing_key=queue)
            await wait_for(lambda: len(peer.seen) >= 5, 10, what="5 requests")
            await asyncio.sleep(0.3)
            declared = await ch.declare_queue(queue, passive=True)
            assert declared.declaration_result.message_count == 0  # all acknowledged
    assert sorted(s.path for s in peer.seen) == [f"/orders/{n}" for n in range(5)]
    assert all(s.headers["x-tenant"] == "t1" for s in peer.seen)
    assert sorted(s.headers["idempotency-key"] for s in peer.seen) == [f"m-{n}" for n in range(5)]


async def test_rest_to_amqp_confirmed_unroutable_and_missing_exchange_fail(tmp_path: Path) -> None:
    port = free_port()
    exchange, queue = unique("gw.ex"), unique("gw.q")
    async with amqp_channel() as ch:
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        q = await ch.declare_queue(queue, auto_delete=True)
        await q.bind(ex, routing_key="orders.#")
        yaml = gateway_yaml(f"""
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}, endpoints: [{{path: "/**"}}]}}
  bus: {{type: amqp}}
""", f"""
  - name: good
    from: api
    match: {{subject: "/good"}}
    mode: direct
    to: [{{connector: bus, exchange: {exchange}, routing_key: "orders.{{{{ data.id }}}}", priority: 3,
          expiration: 60, message_type: order, headers: {{x-source: api}}}}]
  - name: unroutable
    from: api
    match: {{subject: "/nowhere"}}
    mode: direct
    to: [{{connector: bus, exchange: {exchange}, routing_key: "nobody.listens"}}]
  - name: missing-exchange
    from: api
    match: {{subject: "/missing"}}
    mode: direct
    to: [{{connector: bus, exchange: {unique("gw.none")}, routing_key: "x"}}]
  - name: spooled-unroutable
    from: api
    match: {{subject: "/spooled"}}
    to: [{{connector: bus, exchange: {exchange}, routing_key: "nobody.listens"}}]
    on_failure: {{retry: {{attempts: 1}}}}
""")
        async with running_gateway(tmp_path, yaml) as rt, httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{port}"
            r = await http.post(f"{base}/good", json={"id": 1}, headers={"x-trace": "t-1"})
            assert r.status_code == 202, r.text
            envelope_id = r.json()["id"]
            r = await http.post(f"{base}/nowhere", json={"id": 2})
            # the caller may retry; why (the exchange, the broker's words) is in the log line
            assert r.status_code == 503 and r.json()["id"] == r.headers["x-envelope-id"], r.text
            r = await http.post(f"{base}/missing", json={"id": 3})
            assert r.status_code == 503 and "retry-after" in r.headers, r.text
            r = await http.post(f"{base}/good", json={"id": 4})  # the channel survived both
            assert r.status_code == 202, r.text
            r = await http.post(f"{base}/spooled", json={"id": 5})
            assert r.status_code == 202
            await wait_for(rt.spool.dead_letters, 10, what="a dead letter")
            [dead] = await rt.spool.dead_letters()
            got = await drain_queue(ch, queue, 2)
    assert "unroutable" in dead.last_error and dead.route == "spooled-unroutable"
    first = got[0]
    assert first.routing_key == "orders.1" and json.loads(first.body) == {"id": 1}
    assert first.message_id == envelope_id
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.priority == 3 and first.type == "order" and first.expiration == 60
    assert first.headers["x-trace"] == "t-1" and first.headers["x-source"] == "api"
    assert first.content_type == "application/json"
    assert first.app_id == "gateway"


async def test_rpc_through_rest(tmp_path: Path) -> None:
    port = free_port()
    queue = unique("gw.rpc")
    async with amqp_channel() as ch:
        q = await ch.declare_queue(queue, auto_delete=True)

        async def responder(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with msg.process():
                req = json.loads(msg.body)
                if req.get("missing"):
                    body, headers = b'{"error": "no such order"}', {"x-http-status": 404}
                elif req.get("silent"):
                    return
                else:
                    body, headers = json.dumps({"total": req["a"] + req["b"]}).encode(), {}
                await ch.default_exchange.publish(
                    aio_pika.Message(body, content_type="application/json", headers=headers,
                                     correlation_id=msg.correlation_id), routing_key=msg.reply_to or "")

        await q.consume(responder)
        yaml = gateway_yaml(f"""
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  bus: {{type: amqp}}
""", f"""
  - name: rpc
    from: api
    timeout: 1s
    to: [{{connector: bus, routing_key: {queue}, reply: true}}]
""")
        async with running_gateway(tmp_path, yaml), httpx.AsyncClient(timeout=10) as http:
            url = f"http://127.0.0.1:{port}/sum"
            replies = await asyncio.gather(*(http.post(url, json={"a": i, "b": 1}) for i in range(10)))
            assert [r.status_code for r in replies] == [200] * 10
            assert [r.json()["total"] for r in replies] == [i + 1 for i in range(10)]
            assert replies[0].headers["content-type"] == "application/json"
            r = await http.post(url, json={"missing": True})
            assert r.status_code == 404, r.text
            r = await http.post(url, json={"silent": True})
            assert r.status_code == 504, r.text


async def test_inbound_retry_requeues_then_poison_goes_to_dead_letter_exchange(tmp_path: Path) -> None:
    queue = unique("gw.in")

    def respond(seen: Any, n: int) -> tuple[int, bytes]:
        body = json.loads(seen.body)
        if body.get("poison"):
            return 503, b"{}"
        return (503, b"{}") if body["n"] == 0 and sum(1 for s in peer.seen if s.body == seen.body) <= 2 \
            else (200, b"{}")

    async with RestPeer(respond) as peer, amqp_channel() as ch:
        dlx, dlq = await _dlx(ch)
        yaml = gateway_yaml(f"""
  bus: {{type: amqp, queue: {{name: {queue}, queue_type: classic, durable: false, dead_letter_exchange: {dlx},
        arguments: {{x-expires: 60000}}}}, delivery_limit: 3, max_retry_delay: 0.1}}
  api: {{type: rest, base_url: "{peer.url}"}}
""", """
  - name: to-api
    from: bus
    mode: direct
    to: [{connector: api, path: /in}]
""")
        async with running_gateway(tmp_path, yaml):
            for body in ({"poison": True}, {"n": 0}, {"n": 1}):
                await ch.default_exchange.publish(aio_pika.Message(json.dumps(body).encode(),
                                                                   content_type="application/json"),
                                                  routing_key=queue)
            [dead] = await drain_queue(ch, dlq, 1, timeout=15)
            await wait_for(lambda: sum(1 for s in peer.seen if b'"n"' in s.body and b"503" not in s.body) >= 4,
                           10, what="n=0 three times and n=1 once")
    assert json.loads(dead.body) == {"poison": True}
    assert dead.headers["x-death"][0]["reason"] == "rejected"
    poison_calls = [s for s in peer.seen if b"poison" in s.body]
    assert len(poison_calls) == 3  # delivery_limit
    n0 = [s for s in peer.seen if s.body == b'{"n": 0}']
    assert len(n0) == 3  # two 503s then delivered
    assert [s for s in peer.seen if s.body == b'{"n": 1}']  # flowed while the poison message retried


async def test_rejected_and_oversized_go_to_dead_letter_exchange(tmp_path: Path) -> None:
    queue = unique("gw.in")
    out = tmp_path / "out.jsonl"
    async with amqp_channel() as ch:
        dlx, dlq = await _dlx(ch)
        yaml = gateway_yaml(f"""
  bus: {{type: amqp, queue: {{name: {queue}, queue_type: classic, durable: false, dead_letter_exchange: {dlx},
        arguments: {{x-expires: 60000}}}}, max_body: 100}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: only-orders
    from: bus
    match: {when: 'headers["kind"] == "order"'}
    to: [{connector: out}]
""")
        async with running_gateway(tmp_path, yaml):
            await ch.default_exchange.publish(aio_pika.Message(b"x" * 101, headers={"kind": "order"}),
                                              routing_key=queue)
            await ch.default_exchange.publish(aio_pika.Message(b"not an order", headers={"kind": "other"}),
                                              routing_key=queue)
            await ch.default_exchange.publish(aio_pika.Message(b"an order", headers={"kind": "order"}),
                                              routing_key=queue)
            dead = await drain_queue(ch, dlq, 2, timeout=10)
            await wait_for(out.exists, 5, what="the order")
    assert sorted(m.body for m in dead) == [b"not an order", b"x" * 101]
    assert b"an order" in out.read_bytes()


async def test_unreachable_broker_is_unready_not_fatal(tmp_path: Path) -> None:
    yaml = gateway_yaml(f"""
  bus: {{type: amqp, url: "amqp://127.0.0.1:{free_port()}/", connect_timeout: 0.5, reconnect_min: 0.1,
        queue: {{name: never}}}}
  out: {{type: file, path: "{tmp_path / 'o.jsonl'}"}}
""", """
  - name: r
    from: bus
    to: [{connector: out}]
""")
    async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
        await asyncio.sleep(1.5)
        ready, detail = rt.readiness()
        assert not ready
        assert not detail["connectors"]["bus"]["up"]
        assert "connect failed" in detail["connectors"]["bus"]["detail"]
        assert detail["connectors"]["out"]["up"]


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stderr or done.stdout} (run the tests as root)"
    return done.stdout


async def test_the_configured_user_logs_in_and_a_corrected_password_file_is_used_next(tmp_path: Path) -> None:
    """A broker user of our own (not guest, which RabbitMQ allows on loopback only): a wrong
    password from the file is refused; once the file is corrected (a renewed Kubernetes Secret,
    say) the next connection attempt logs in as that user — no reload, no restart."""
    user, password = unique("gw-user"), f"pw-{uuid.uuid4().hex}"
    await asyncio.to_thread(_rabbitmqctl, "add_user", user, password)
    try:
        await asyncio.to_thread(_rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
        secret = tmp_path / "amqp-password"
        secret.write_text("wrong-password\n")
        queue = unique("gw.pwfile")
        out = tmp_path / "o.jsonl"
        yaml = gateway_yaml(f"""
  bus: {{type: amqp, url: "amqp://127.0.0.1:5672/", username: {user}, password: {{file: "{secret}"}},
        connect_timeout: 2, reconnect_min: 0.2, reconnect_max: 1, queue: {{name: {queue}}}}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: bus
    to: [{connector: out}]
""")
        async with running_gateway(tmp_path, yaml, wait_ready=False) as rt:
            def detail() -> str:
                return str(rt.readiness()[1]["connectors"]["bus"]["detail"])

            await wait_for(lambda: "ACCESS_REFUSED" in detail(), what="the wrong password refused")
            assert "wrong-password" not in detail()
            secret.write_text(password + "\n")
            await wait_for(lambda: rt.readiness()[0], what="connected with the corrected password file")
            connections = await asyncio.to_thread(_rabbitmqctl, "list_connections", "user", "client_properties")
            assert any(line.startswith(user) and "gateway-bus" in line for line in connections.splitlines()), \
                connections
            async with amqp_channel() as ch:
                await ch.default_exchange.publish(aio_pika.Message(b'{"n": 1}', content_type="application/json"),
                                                  routing_key=queue)
            await wait_for(lambda: out.exists() and out.read_text().count("\n") == 1, what="the message")
        async with amqp_channel() as ch:
            await ch.queue_delete(queue)
    finally:
        await asyncio.to_thread(_rabbitmqctl, "delete_user", user)


async def test_stop_listening_then_listen_again_keeps_acknowledging(tmp_path: Path) -> None:
    queue = unique("gw.in")
    out = tmp_path / "out.jsonl"
    yaml = gateway_yaml(f"""
  bus: {{type: amqp, queue: {{name: {queue}, queue_type: classic, durable: false}}}}
  out: {{type: file, path: "{out}"}}
""", """
  - name: r
    from: bus
    to: [{connector: out}]
""")
    async with amqp_channel() as ch, running_gateway(tmp_path, yaml) as rt:
        conn = rt.slots["bus"].connector
        deliver = conn._deliver

        async def send(n: int) -> None:
            for i in range(n):
                await ch.default_exchange.publish(aio_pika.Message(b"m%d" % i), routing_key=queue)

        await send(20)
        await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 20, 10, what="20 lines")
        await conn.stop_listening(2)
        await send(5)  # waits in the queue while nobody consumes
        await asyncio.sleep(0.3)
        assert len(out.read_text().splitlines()) == 20
        await conn.listen(deliver)
        await send(5)
        await wait_for(lambda: len(out.read_text().splitlines()) >= 30, 10, what="30 lines")
        await asyncio.sleep(0.3)
        assert conn.health().up
        declared = await ch.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 0
    assert len(out.read_text().splitlines()) == 30


async def test_a_batch_is_published_at_once_and_each_publish_answers_for_itself(tmp_path: Path) -> None:
    """``send_batch`` (spooled jobs due together): every publish of the batch is confirmed or
    refused on its own; an unroutable one fails alone, the others are in the queue."""
    exchange, queue = unique("gw.ex"), unique("gw.q")
    async with amqp_channel() as ch:
        ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, auto_delete=True)
        q = await ch.declare_queue(queue, auto_delete=True)
        await q.bind(ex, routing_key="orders.good")
        yaml = gateway_yaml("""
  bus: {type: amqp}
""", "  []")
        async with running_gateway(tmp_path, yaml) as rt:
            conn = rt.slots["bus"].connector
            assert type(conn).batches
            items = [(Envelope(source="t", protocol="test", subject="s", body=json.dumps({"n": n}).encode(),
                               content_type="application/json"),
                      Target(route="r", connector="bus", options=AmqpTarget(
                          exchange=exchange, routing_key="orders.bad" if n in (3, 7) else "orders.good")))
                     for n in range(10)]
            answers = await conn.send_batch(items)
            got = await drain_queue(ch, queue, 8)
    assert [a is None for a in answers] == [n not in (3, 7) for n in range(10)]
    assert all(isinstance(answers[n], TransientError | PermanentError) and "unroutable" in str(answers[n])
               for n in (3, 7))
    assert sorted(json.loads(m.body)["n"] for m in got) == [0, 1, 2, 4, 5, 6, 8, 9]


async def test_a_publish_the_broker_never_confirms_fails_at_its_deadline(tmp_path: Path) -> None:
    """RabbitMQ takes the publish but no confirm comes back (a half-open connection): the send
    fails as a retry at the target's timeout, it never waits for ever or counts as delivered."""
    from tests.faultproxy import FaultProxy

    queue = unique("gw.q")
    async with amqp_channel() as ch, FaultProxy("127.0.0.1", 5672) as proxy:
        await ch.declare_queue(queue, auto_delete=True)
        yaml = gateway_yaml(f"""
  bus: {{type: amqp, url: "amqp://{proxy.address}/", heartbeat: 60}}
""", "  []")
        async with running_gateway(tmp_path, yaml) as rt:
            conn = rt.slots["bus"].connector
            target = Target(route="r", connector="bus", timeout=1.0,
                            options=AmqpTarget(routing_key=queue))
            env = Envelope(source="t", protocol="test", subject="s", body=b"{}", content_type="application/json")
            assert await conn.send(env, target) is None  # confirmed through the proxy
            proxy.blackhole = True
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TransientError, match=r"no publisher confirm within 0\.95s"):
                await conn.send(env.evolve(id="second"), target)
            waited = loop.time() - started
            proxy.heal()
            proxy.cut()  # the half-open connection is dropped; the connector reconnects
    assert 0.9 <= waited < 2.0, waited


async def test_publishes_that_arrive_together_go_to_the_broker_in_one_write(tmp_path: Path) -> None:
    """50 sends started in one loop turn (an MQTT read's worth of messages) are queued for the
    connection's writer as one frame, not 50 — each still answered by its own confirm — and
    all 50 are in the queue."""
    queue = unique("gw.q")
    async with amqp_channel() as ch:
        await ch.declare_queue(queue, auto_delete=True)
        yaml = gateway_yaml("""
  bus: {type: amqp}
""", "  []")
        async with running_gateway(tmp_path, yaml) as rt:
            conn = rt.slots["bus"].connector
            target = Target(route="r", connector="bus", options=AmqpTarget(routing_key=queue))
            env = Envelope(source="t", protocol="test", subject="s", body=b"{}", content_type="application/json")
            assert await conn.send(env, target) is None  # the channel is open
            write_queue = conn._pub_raw.write_queue
            writes = 0
            put = write_queue.put

            async def counting_put(item: Any) -> None:
                nonlocal writes
                writes += 1
                await put(item)

            write_queue.put = counting_put
            try:
                answers = await asyncio.gather(*(conn.send(env.evolve(id=f"m-{n}"), target) for n in range(50)))
            finally:
                del write_queue.put
            got = await drain_queue(ch, queue, 51)
    assert answers == [None] * 50
    assert writes <= 2, writes
    assert len(got) == 51
