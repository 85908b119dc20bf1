"""``gateway run --workers 2``: real processes on real sockets.

Two worker processes share the REST port (``SO_REUSEPORT``) and both take requests; the one admin
port's ``/metrics`` adds both up; a reload through the admin API reaches both; a worker killed
with SIGKILL is restarted by the parent and delivers what it had spooled; an MQTT subscription is
shared, each message taken once; a storm route's dedupe holds across workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.faultproxy import HttpSink
from tests.gwtest import free_port, jsonl, wait_for
from tests.integration.test_durability_rabbit import URL, delete_topology, prefix  # noqa: F401 - fixture
from tests.integration.test_mqtt_amqp import amqp_channel, mqtt_probe, require_port, unique

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

GATEWAY = str(Path(sys.executable).with_name("gateway"))


class Workers:
    """A ``gateway run --workers N`` process and its admin port."""

    def __init__(self, tmp_path: Path, body: str, workers: int = 2, admin_host: str = "127.0.0.1",
                 spool: str = ""):
        self.admin = free_port()
        self.port = free_port()
        self.path = tmp_path / "routes.yaml"
        self.tmp = tmp_path
        self.workers = workers
        self.path.write_text(
            "gateway:\n"
            f'  admin: {{listen: "{admin_host}:{self.admin}"}}\n'
            f'  spool: {{path: "{tmp_path / "spool.db"}", min_free_bytes: 0{spool}}}\n'
            f'  state_dir: "{tmp_path / "state"}"\n'
            "  drain: 5s\n"
            + textwrap.dedent(body).replace("PORT", str(self.port)).replace("TMP", str(tmp_path)))
        self.proc: asyncio.subprocess.Process | None = None
        self.session = aiohttp.ClientSession()

    async def start(self) -> None:
        self.log = open(self.tmp / "gateway.log", "wb")  # closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            GATEWAY, "run", "--config", str(self.path), "--workers", str(self.workers),
            stdout=self.log, stderr=self.log, env=os.environ.copy())
        await wait_for(self.all_ready, 30, 0.1, what="every worker ready")

    async def stop(self) -> int:
        """SIGTERM to the parent; its exit code, once no worker is left either."""
        assert self.proc is not None
        pids = [w["pid"] for w in (await self.readyz())["workers"]] if self.proc.returncode is None else []
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 40)
        await self.session.close()
        self.log.close()
        assert not [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)], "a worker outlived"
        return code

    async def readyz(self) -> dict[str, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.admin}/readyz") as resp:
            doc: dict[str, Any] = await resp.json()
            return doc

    async def all_ready(self) -> bool:
        try:
            doc = await self.readyz()
        except aiohttp.ClientError:
            return False
        return len(doc["workers"]) == self.workers and all(w["ready"] for w in doc["workers"])

    async def metric(self, name: str, labels: dict[str, str], admin: str | None = None) -> float:
        """One series' value from the admin port (or a worker's private one)."""
        async with self.session.get(f"http://{admin or f'127.0.0.1:{self.admin}'}/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    async def per_worker(self, name: str, labels: dict[str, str]) -> list[float]:
        return [await self.metric(name, labels, w["admin"]) for w in (await self.readyz())["workers"]]

    async def post(self, n: int, path: str = "/in/x", key: str = "") -> list[int]:
        """``n`` POSTs, each on a new connection (the kernel spreads connections, not requests)."""
        statuses = []
        for i in range(n):
            async with aiohttp.ClientSession() as s, s.post(
                    f"http://127.0.0.1:{self.port}{path}", json={"i": i, "key": key or str(i)}) as resp:
                statuses.append(resp.status)
        return statuses


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@asynccontextmanager
async def workers(tmp_path: Path, body: str, n: int = 2, admin_host: str = "127.0.0.1",
                  spool: str = "") -> AsyncIterator[Workers]:
    gw = Workers(tmp_path, body, n, admin_host, spool)
    try:
        await gw.start()
        yield gw
    finally:
        if gw.proc is not None:
            assert await gw.stop() == 0
        else:
            await gw.session.close()


REST_TO_FILE = """
connectors:
  in: {type: rest, listen: "127.0.0.1:PORT", auth: {type: none}, endpoints: [{path: "/in/**", methods: [POST]}]}
  out: {type: file, path: "TMP/out.jsonl"}
  out2: {type: file, path: "TMP/out2.jsonl"}
routes:
  - name: first
    from: in
    to: [{connector: out}]
"""


async def test_two_workers_share_the_port_and_the_metrics_add_up(tmp_path: Path) -> None:
    async with workers(tmp_path, REST_TO_FILE) as gw:
        assert await gw.post(60) == [202] * 60
        await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == 60, 10, what="60 lines")
        each = await gw.per_worker("gateway_messages_received_total", {"connector": "in"})
        assert all(n > 0 for n in each), f"both workers take requests: {each}"
        assert sum(each) == 60
        assert await gw.metric("gateway_messages_received_total", {"connector": "in"}) == 60
        assert await gw.metric("gateway_workers", {}) == 2
        ids = [line["id"] for line in jsonl(tmp_path / "out.jsonl")]
        assert len(set(ids)) == 60


async def test_a_reload_through_the_admin_api_reaches_every_worker(tmp_path: Path) -> None:
    async with workers(tmp_path, REST_TO_FILE) as gw:
        text = gw.path.read_text().replace("name: first", "name: second").replace(
            "[{connector: out}]", "[{connector: out2}]")
        base = (await gw.readyz())["config_version"]
        async with gw.session.put(f"http://127.0.0.1:{gw.admin}/api/routes", data=text.encode(),
                                  headers={"content-type": "application/yaml", "if-match": f'"{base}"'}) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
        assert doc["workers"]["confirmed"] is True
        assert set(doc["workers"]["versions"].values()) == {doc["version"]}
        assert await gw.post(60) == [202] * 60
        await wait_for(lambda: len(jsonl(tmp_path / "out2.jsonl")) == 60, 10, what="60 lines by the new route")
        each = await gw.per_worker("gateway_messages_routed_total", {"route": "second", "outcome": "matched"})
        assert all(n > 0 for n in each), f"both workers route by the new route: {each}"
        assert not jsonl(tmp_path / "out.jsonl")


async def test_a_killed_worker_is_restarted_and_delivers_its_spool(tmp_path: Path) -> None:
    await _kill_a_worker(tmp_path, "")


async def test_a_killed_worker_with_the_rabbitmq_spool_loses_nothing(
        tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - fixture
    monkeypatch.setenv("SPOOL_AMQP_URL", URL)
    try:
        await _kill_a_worker(tmp_path, f', type: rabbitmq, url: "${{SPOOL_AMQP_URL}}", queue_prefix: {prefix}')
    finally:
        await delete_topology(prefix, ["sink"])


async def _kill_a_worker(tmp_path: Path, spool: str) -> None:
    """40 messages acknowledged while the sink fails, worker 1 killed with SIGKILL and restarted
    by the parent; once the sink recovers, every acknowledged message reaches it."""
    async with HttpSink() as sink:
        sink.status = 503  # every send fails: acknowledged messages wait in the spools
        body = f"""
        connectors:
          in: {{type: rest, listen: "127.0.0.1:PORT", auth: {{type: none}},
                endpoints: [{{path: "/in/**", methods: [POST]}}]}}
          sink: {{type: rest, base_url: "{sink.url}", timeout: 2s}}
        routes:
          - name: r
            from: in
            to: [{{connector: sink, path: /got}}]
            on_failure: {{retry: {{attempts: 1000, initial: 0.05, max: 0.3, max_age: 1h}}}}
        """
        async with workers(tmp_path, body, spool=spool) as gw:
            statuses = await gw.post(40)
            assert statuses == [202] * 40
            doomed = (await gw.readyz())["workers"][1]
            spooled = await gw.metric("gateway_messages_received_total", {"connector": "in"}, doomed["admin"])
            assert spooled > 0
            os.kill(doomed["pid"], signal.SIGKILL)
            await wait_for(lambda: gw.proc is not None and _restarted(gw, doomed["pid"]), 20, 0.1,
                           what="worker 1 restarted")
            await wait_for(gw.all_ready, 20, 0.1, what="both workers ready again")
            sink.status = 200
            await wait_for(lambda: len(sink.counts) == 40, 20, what="every acknowledged message delivered")
            assert await gw.metric("gateway_worker_restarts_total", {}) == 1


async def _restarted(gw: Workers, old_pid: int) -> bool:
    worker = (await gw.readyz())["workers"][1]
    return bool(worker["pid"] != old_pid and worker["alive"])


async def test_an_mqtt_subscription_is_shared_each_message_once(tmp_path: Path) -> None:
    require_port(1883, "Mosquitto")
    topic = unique("workers")
    body = f"""
    connectors:
      plant: {{type: mqtt, url: "mqtt://127.0.0.1:1883", client_id: {unique("gw")}, subscribe: ["{topic}/#"]}}
      out: {{type: file, path: "TMP/out.jsonl"}}
    routes:
      - name: r
        from: plant
        to: [{{connector: out}}]
    """
    async with workers(tmp_path, body) as gw, mqtt_probe() as probe:
        for i in range(200):
            probe.publish(f"{topic}/{i % 7}", json.dumps({"i": i}), qos=1)
        await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) >= 200, 20, what="200 messages")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        lines = jsonl(tmp_path / "out.jsonl")
        assert sorted(json.loads(line["body"])["i"] for line in lines) == list(range(200))
        each = await gw.per_worker("gateway_messages_received_total", {"connector": "plant"})
        assert all(n > 0 for n in each), f"both workers take messages from the shared subscription: {each}"


async def test_a_storm_dedupe_holds_across_workers(tmp_path: Path) -> None:
    body = """
    connectors:
      in: {type: rest, listen: "127.0.0.1:PORT", auth: {type: none}, endpoints: [{path: "/in/**", methods: [POST]}]}
      out: {type: file, path: "TMP/out.jsonl"}
    routes:
      - name: alerts
        from: in
        dedupe: {key: "{{ data.key }}", window: 1h}
        to: [{connector: out}]
    """
    async with workers(tmp_path, body) as gw:
        statuses = await gw.post(40, key="same")
        assert all(s in (200, 202) for s in statuses), statuses
        each = await gw.per_worker("gateway_inbound_outcomes_total", {"connector": "in"})
        assert (await gw.per_worker("gateway_messages_forwarded_total", {"connector": "in"}))[1] > 0
        await asyncio.sleep(0.5)
        assert len(jsonl(tmp_path / "out.jsonl")) == 1, "one message passes the dedupe, whichever worker took it"
        assert sum(each) == 40
        assert await gw.metric("gateway_messages_routed_total", {"route": "alerts", "outcome": "suppressed"}) == 39


async def test_an_idempotency_key_holds_across_workers(tmp_path: Path) -> None:
    async with workers(tmp_path, REST_TO_FILE) as gw:
        ids = set()
        for _ in range(20):  # each on a new connection: the kernel deals them to both workers
            async with aiohttp.ClientSession() as s, s.post(f"http://127.0.0.1:{gw.port}/in/x", json={"n": 1},
                                                            headers={"Idempotency-Key": "order-17"}) as resp:
                assert resp.status == 202
                ids.add((await resp.json())["id"])
        assert len(ids) == 1, "every retry is answered with the first message's id"
        await asyncio.sleep(0.5)
        assert len(jsonl(tmp_path / "out.jsonl")) == 1
        each = await gw.per_worker("gateway_messages_received_total", {"connector": "in"})
        assert sum(each) == 20 and 20 in each, f"one worker owns the key and routes every retry: {each}"


def _own_address() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


async def test_the_admin_api_behind_the_parent_sees_the_real_client(tmp_path: Path) -> None:
    """No tokens: the admin API is open to loopback only. Every proxied request reaches worker 0
    from the parent on 127.0.0.1; a client on another address must still be refused."""
    address = _own_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    async with workers(tmp_path, REST_TO_FILE, admin_host="0.0.0.0") as gw:
        async with gw.session.get(f"http://127.0.0.1:{gw.admin}/api/whoami") as resp:
            assert resp.status == 200
            assert (await resp.json())["via"] == "loopback"
        async with gw.session.get(f"http://{address}:{gw.admin}/api/whoami") as resp:
            assert resp.status == 403
        async with gw.session.get(f"http://{address}:{gw.admin}/api/whoami",
                                  headers={"x-gateway-client": "127.0.0.1 1"}) as resp:
            assert resp.status == 403, "a client cannot claim an address"


async def test_amqp_consumers_compete_each_message_once(tmp_path: Path) -> None:
    import aio_pika

    queue = unique("workers")
    body = f"""
    connectors:
      bus: {{type: amqp, queue: {{name: {queue}, queue_type: classic, durable: false}}, prefetch: 10}}
      out: {{type: file, path: "TMP/out.jsonl"}}
    routes:
      - name: r
        from: bus
        to: [{{connector: out}}]
    """
    async with workers(tmp_path, body) as gw, amqp_channel() as channel:
        for i in range(200):
            await channel.default_exchange.publish(aio_pika.Message(json.dumps({"i": i}).encode(),
                                                                    content_type="application/json"), queue)
        await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) >= 200, 20, what="200 messages")
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        lines = jsonl(tmp_path / "out.jsonl")
        assert sorted(json.loads(line["body"])["i"] for line in lines) == list(range(200))
        each = await gw.per_worker("gateway_messages_received_total", {"connector": "bus"})
        assert all(n > 0 for n in each), f"both workers consume from the queue: {each}"


async def test_two_workers_share_the_smtp_port(tmp_path: Path) -> None:
    import smtplib

    body = """
    connectors:
      mail-in: {type: smtp, listen: "127.0.0.1:PORT", recipients: ["example.com"]}
      out: {type: file, path: "TMP/out.jsonl"}
    routes:
      - {name: mail, from: mail-in, to: [{connector: out}]}
    """

    def send(n: int) -> None:
        for i in range(n):  # a connection each: the kernel deals connections, not messages
            with smtplib.SMTP("127.0.0.1", gw.port, timeout=10) as s:
                s.sendmail("a@client.test", ["b@example.com"], f"Subject: {i}\r\n\r\nmail {i}\r\n")

    async with workers(tmp_path, body) as gw:
        await asyncio.to_thread(send, 30)
        await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == 30, 10, what="30 mails")
        each = await gw.per_worker("gateway_messages_received_total", {"connector": "mail-in"})
        assert all(n > 0 for n in each) and sum(each) == 30, each


async def test_a_port_taken_at_start_fails_the_gateway_as_one_process_would(tmp_path: Path) -> None:
    gw = Workers(tmp_path, REST_TO_FILE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", gw.port))
        taken.listen()
        proc = await asyncio.create_subprocess_exec(GATEWAY, "run", "--config", str(gw.path), "--workers", "2",
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    await gw.session.close()
    assert proc.returncode == 1
    assert b"worker.start_failed" in err


async def test_a_throttle_digest_counts_the_messages_of_both_workers(tmp_path: Path) -> None:
    body = """
    connectors:
      in: {type: rest, listen: "127.0.0.1:PORT", auth: {type: none}, endpoints: [{path: "/in/**", methods: [POST]}]}
      out: {type: file, path: "TMP/out.jsonl"}
    routes:
      - name: alerts
        from: in
        throttle: {key: "{{ data.key }}", limit: 1, window: 3s, then: digest}
        to:
          - connector: out
            format: body
            body: >-
              {% if data.digest is defined %}digest count={{ data.digest.count }}{% else %}alert{% endif %}
    """
    async with workers(tmp_path, body) as gw:
        assert await gw.post(30, key="boiler-7") == [202] * 30
        each = await gw.per_worker("gateway_inbound_outcomes_total", {"connector": "in", "outcome": "accepted"})
        forwarded = await gw.per_worker("gateway_messages_forwarded_total", {"connector": "in"})
        assert forwarded[0] == 0 and forwarded[1] > 0, f"worker 1 took some and handed them to worker 0: {forwarded}"
        assert each == [30, 0], "worker 0 decided them all"
        await wait_for(lambda: len((tmp_path / "out.jsonl").read_text().splitlines()) >= 2
                       if (tmp_path / "out.jsonl").exists() else False, 15, what="the alert and its digest")
        await asyncio.sleep(0.5)
        assert (tmp_path / "out.jsonl").read_text().splitlines() == ["alert", "digest count=29"]
