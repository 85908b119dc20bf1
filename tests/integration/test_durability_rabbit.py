"""The RabbitMQ-backed spool against a real broker: quorum queues, confirms, retry tiers,
the delivery limit and its DLX, replicas sharing work, and the engine on top of it."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from gateway.contract import Status, TransientError
from gateway.delivery.rabbit import TIERS, RabbitSpool, tier_for
from gateway.delivery.store import Job, SpoolError
from gateway.envelope import Envelope
from tests.gwtest import wait_for
from tests.unit.test_delivery import Harness

pytestmark = pytest.mark.integration

URL = os.environ.get("GATEWAY_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def delete_topology(prefix: str, connectors: list[str]) -> None:
    conn = await aio_pika.connect(URL)
    try:
        for name in [f"{prefix}.jobs.{c}" for c in connectors] + [f"{prefix}.dead"] + [
                f"{prefix}.retry.{c}.{int(t * 1000)}ms" for c in connectors for t in TIERS]:
            ch = await conn.channel()
            try:
                await ch.queue_delete(name)
            except Exception:
                pass  # never declared
        ch = await conn.channel()
        for x in (f"{prefix}.jobs", f"{prefix}.dead"):
            await ch.exchange_delete(x)
    finally:
        await conn.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    try:
        conn = await aio_pika.connect(URL, timeout=5)
        await conn.close()
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not reachable at {URL} ({exc}): apt-get install -y rabbitmq-server and start it "
                    "(PEERS.md §2.1), or set GATEWAY_TEST_AMQP_URL")
    p = f"gwtest-{uuid.uuid4().hex[:8]}"
    yield p
    await delete_topology(p, ["out", "other", "api"])


def job(n: int, connector: str = "out", **kw: object) -> Job:
    env = Envelope(source="api", protocol="t", subject="/x", body=json.dumps({"n": n}).encode(), id=f"env-{n}")
    return Job(envelope_id=env.id, route="r", connector=connector, envelope=env.to_json(), options="{}",
               policy='{"attempts": 5}', **kw)  # type: ignore[arg-type]


async def opened(tmp_path: Path, prefix: str, name: str = "a", **kw: object) -> RabbitSpool:
    s = RabbitSpool(URL, path=str(tmp_path / f"{name}.db"), prefix=prefix, min_free_bytes=0, **kw)  # type: ignore[arg-type]
    await s.open()
    return s


async def claim_n(s: RabbitSpool, n: int, connector: str = "out", timeout: float = 5.0) -> list[Job]:
    got: list[Job] = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += await s.claim(connector, n - len(got))
        await asyncio.sleep(0.01)
    return got


def test_backoff_is_rounded_down_to_a_tier() -> None:
    assert tier_for(0.05) == 0.2 and tier_for(0.7) == 0.2 and tier_for(1.0) == 1.0 and tier_for(4.9) == 1.0
    assert tier_for(86_400) == 3600.0


async def test_jobs_round_trip_and_retry_through_a_tier(tmp_path: Path, prefix: str) -> None:
    s = await opened(tmp_path, prefix)
    try:
        await s.put([job(1), job(2), job(3)])
        await s.attach("out", lambda: None, prefetch=8)
        got = await claim_n(s, 3)
        assert sorted(j.envelope_id for j in got) == ["env-1", "env-2", "env-3"]
        assert all(j.created_at > 0 and j.policy == '{"attempts": 5}' for j in got)
        first, second, third = sorted(got, key=lambda j: j.envelope_id)
        await s.done(first)
        await s.done(second)
        third.attempts = 1
        started = time.monotonic()
        await s.reschedule(third, time.time() + 0.3, "HTTP 503")
        [back] = await claim_n(s, 1)
        assert time.monotonic() - started >= 0.19  # held by the 200 ms tier
        assert (back.envelope_id, back.attempts, back.last_error) == ("env-3", 1, "HTTP 503")
        await s.done(back)
        await asyncio.sleep(0.1)
        assert await s.depth() == {}
        with pytest.raises(SpoolError):
            await s.done(back)  # already settled
    finally:
        await s.close()


async def test_a_replica_that_dies_leaves_its_jobs_to_the_others(tmp_path: Path, prefix: str) -> None:
    a = await opened(tmp_path, prefix, "a")
    b = await opened(tmp_path, prefix, "b")
    try:
        await a.put([job(i) for i in range(5)])
        await a.attach("out", lambda: None, prefetch=10)
        assert len(await claim_n(a, 5)) == 5  # a holds them all, unacknowledged
        await a.close()  # gone without settling anything (kill -9 is the crash test's job)
        await b.attach("out", lambda: None, prefetch=10)
        taken = await claim_n(b, 5, timeout=10)
        assert sorted(j.envelope_id for j in taken) == [f"env-{i}" for i in range(5)]
        for j in taken:
            await b.done(j)
    finally:
        await a.close()
        await b.close()


async def test_the_delivery_limit_dead_letters_through_the_dlx(tmp_path: Path, prefix: str) -> None:
    s = await opened(tmp_path, prefix, delivery_limit=2)
    try:
        await s.put([job(1)])
        await s.attach("out", lambda: None, prefetch=1)
        for _ in range(3):
            [j] = await claim_n(s, 1)
            await s.release(j)  # handed back without an outcome, as by a crashing replica
        await wait_for(lambda: _dead(s, 1), what="dead letter from the DLX")
        [dl] = await s.dead_letters()
        assert (dl.reason, dl.envelope_id, dl.connector) == ("delivery_limit", "env-1", "out")
        assert "x-delivery-limit" in dl.last_error
    finally:
        await s.close()


async def _dead(s: RabbitSpool, n: int) -> bool:
    return await s.count_dead_letters() == n


async def test_dead_letters_stay_with_the_replica_and_replay_to_the_shared_queue(tmp_path: Path,
                                                                                  prefix: str) -> None:
    a = await opened(tmp_path, prefix, "a")
    b = await opened(tmp_path, prefix, "b")
    try:
        await a.put([job(1)])
        await a.attach("out", lambda: None, prefetch=4)
        [j] = await claim_n(a, 1)
        await a.dead_letter(j, "permanent", "HTTP 400")
        [dl] = await a.dead_letters()
        assert dl.reason == "permanent" and await b.count_dead_letters() == 0
        assert await a.replay([dl.id], connector="other") == ["other"]
        assert await a.count_dead_letters() == 0
        await b.attach("other", lambda: None, prefetch=4)
        [again] = await claim_n(b, 1, connector="other")
        assert again.envelope_id == "env-1" and again.attempts == 0
        await b.done(again)
    finally:
        await a.close()
        await b.close()


async def test_an_unreachable_broker_is_a_spool_error(tmp_path: Path) -> None:
    s = RabbitSpool("amqp://guest:guest@127.0.0.1:1/", path=str(tmp_path / "x.db"), min_free_bytes=0)
    with pytest.raises(SpoolError, match="cannot open the RabbitMQ spool"):
        await s.open()


async def test_the_engine_on_the_shared_spool(tmp_path: Path, prefix: str) -> None:
    """The same Delivery, on RabbitMQ: accepted only after the confirm, retried, delivered."""
    spool = RabbitSpool(URL, path=str(tmp_path / "local.db"), prefix=prefix, min_free_bytes=0)
    routes = """  - name: r
    from: api
    to: [{connector: out}]
    on_failure: {retry: {attempts: 10, initial: 0.05, max: 0.1}}
"""
    fails = {"env": 2}

    async def flaky(env: Envelope, target: object) -> None:
        if fails["env"] > 0:
            fails["env"] -= 1
            raise TransientError("503")

    async with Harness(tmp_path, routes, spool=spool) as h:
        h.out().behavior = flaky  # type: ignore[assignment]
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.ACCEPTED
        await wait_for(lambda: h.out().delivered, timeout=10, what="delivered after two retries")
        assert [e.id for e in h.out().delivered] == [outcome.envelope_id]
        assert len(h.out().calls) == 3
        await wait_for(lambda: _no_depth(spool), what="queues empty")


async def _no_depth(s: RabbitSpool) -> bool:
    return await s.depth() == {}

