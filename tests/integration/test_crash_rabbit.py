"""The crash test with two gateway processes sharing the RabbitMQ-backed spool.

Replica A and replica B each take sequence-numbered messages over REST while the sink is down,
so everything they acknowledge waits in the shared quorum queues. A is ``kill -9``-ed twice and
restarted, then killed for good. The sink comes back, and B alone must deliver everything
both acknowledged: lost = 0; duplicates are counted and printed.

Each replica is the real :class:`gateway.runtime.Runtime` with its spool swapped for
:class:`RabbitSpool` by a tiny runner, because ``gateway.spool.type``/``url`` are not in the
config schema yet (then this becomes ``gateway run`` with ``spool: {type: rabbitmq, url: …}``).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.faultproxy import HttpSink
from tests.gwtest import free_port
from tests.integration.test_crash import GatewayProcess, RestSender, gateway_yaml
from tests.integration.test_durability_rabbit import URL, delete_topology, prefix  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

RUNNER = '''
import asyncio, signal, sys
from gateway import logs
from gateway.admin import mount_admin
from gateway.config.loader import load_config
from gateway.delivery.rabbit import RabbitSpool
from gateway.runtime import Runtime, RuntimeAdmin


async def main(config_path: str, url: str, prefix: str, local: str) -> None:
    runtime = Runtime(load_config(config_path), config_path=config_path)
    runtime.spool = runtime.delivery.spool = RabbitSpool(url, path=local, prefix=prefix, min_free_bytes=0)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runtime.request_stop)
    mount_admin(RuntimeAdmin(runtime), runtime.http)  # as gateway.runtime.serve does
    await runtime.start()
    await runtime.wait()
    await runtime.stop()


logs.setup("info", "json")
asyncio.run(main(*sys.argv[1:]))
'''


@pytest.fixture
async def sink() -> AsyncIterator[HttpSink]:
    async with HttpSink() as s:
        yield s


async def test_two_replicas_one_killed_the_other_delivers_its_backlog(tmp_path: Path, prefix: str,  # noqa: F811
                                                                      sink: HttpSink) -> None:
    rng = random.Random()
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    senders = {name: RestSender(name) for name in ("a", "b")}
    gateways: dict[str, GatewayProcess] = {}
    for name, sender in senders.items():
        home = tmp_path / name
        home.mkdir()
        admin = f"127.0.0.1:{free_port()}"
        config = home / "routes.yaml"
        config.write_text(gateway_yaml(home, admin, sink, [sender]))
        gateways[name] = GatewayProcess(config, admin, home / "gateway.log", command=[
            sys.executable, str(runner), str(config), URL, prefix, str(home / "local.db")])
    attempted: set[str] = set()
    acked: dict[str, set[str]] = {"a": set(), "b": set()}
    stop = asyncio.Event()

    async def client(name: str, index: int) -> None:
        sender = senders[name]
        for n in range(100_000):
            seq = n * 3 + index
            ident = f"{name}:{seq}"
            attempted.add(ident)
            for _ in range(10_000):
                if stop.is_set():
                    return
                if await sender.send(seq):
                    acked[name].add(ident)
                    break
                await asyncio.sleep(0.02)

    sink.status = 503  # everything acknowledged waits in the shared queues
    for s in senders.values():
        await s.open()
    try:
        for gw in gateways.values():
            await gw.start()
        clients = [asyncio.ensure_future(client(name, i)) for name in senders for i in range(3)]
        for _ in range(2):
            await asyncio.sleep(rng.uniform(0.8, 1.5))
            await gateways["a"].kill9()
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            await gateways["a"].start()
        await asyncio.sleep(rng.uniform(0.8, 1.5))
        a_backlog = len(acked["a"] - set(sink.counts))
        await gateways["a"].kill9()  # for good
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
        sink.status = 200
        every = acked["a"] | acked["b"]
        for _ in range(400):  # ≤ 40 s: B's circuit may be in a long cool-down by now
            if all(sink.got(i) for i in every):
                break
            await asyncio.sleep(0.1)
        assert await gateways["b"].terminate() == 0, gateways["b"].tail()
    finally:
        for gw in gateways.values():
            await gw.ensure_stopped()
        for s in senders.values():
            await s.close()
        await delete_topology(prefix, ["sink", "in-rest"])
    received = {i for i, n in sink.counts.items() if n}
    lost = sorted(every - received)
    print(f"\nshared spool: A acknowledged {len(acked['a'])} ({a_backlog} undelivered when A died for good),"
          f" B acknowledged {len(acked['b'])}; delivered {len(received)}, lost {len(lost)},"
          f" duplicated {sink.duplicates}, unexpected {len(received - attempted)}")
    assert a_backlog > 50, "A had no backlog to hand over: the test proved nothing"
    assert lost == [], f"LOST: {lost[:20]}"
    assert received <= attempted
