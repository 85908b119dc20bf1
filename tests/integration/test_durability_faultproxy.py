"""The fault proxy itself: each fault does to a real HTTP exchange what it says."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.faultproxy import FaultProxy, HttpSink
from tests.gwtest import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
async def pair() -> AsyncIterator[tuple[HttpSink, FaultProxy]]:
    async with HttpSink() as sink, FaultProxy("127.0.0.1", sink.port) as proxy:
        yield sink, proxy


async def post(proxy: FaultProxy, ident: str, timeout: float = 2.0) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
            s.post(f"http://{proxy.address}/sink", json={"id": ident, "pad": "x" * 200}) as r:
        return r.status


async def test_a_healthy_proxy_is_transparent(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    assert await post(proxy, "a") == 200
    assert sink.counts["a"] == 1 and proxy.bytes_up > 200 and proxy.bytes_down > 0


async def test_refuse_resets_new_connections(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    proxy.refuse = True
    with pytest.raises(aiohttp.ClientError):
        await post(proxy, "a")
    assert sink.requests == 0 and proxy.resets == 1
    proxy.heal()
    assert await post(proxy, "b") == 200


async def test_drop_after_cuts_the_request_in_half(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    proxy.drop_after = 60  # inside the headers
    with pytest.raises(aiohttp.ClientError):
        await post(proxy, "a")
    assert sink.counts["a"] == 0
    assert proxy.resets == 1


async def test_blackhole_leaves_the_client_hanging_until_its_timeout(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    proxy.blackhole = True
    with pytest.raises(TimeoutError):
        await post(proxy, "a", timeout=0.3)
    assert sink.requests == 0 and proxy.resets == 0  # nothing was closed either


async def test_latency_delays_each_exchange(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    proxy.latency = 0.15
    started = time.monotonic()
    assert await post(proxy, "a") == 200
    assert sink.counts["a"] == 1
    assert time.monotonic() - started >= 0.3  # once up, once down


async def test_cut_resets_connections_in_flight(pair: tuple[HttpSink, FaultProxy]) -> None:
    sink, proxy = pair
    sink.hang = True
    request = asyncio.ensure_future(post(proxy, "a"))
    await wait_for(lambda: sink.inflight == 1, what="request at the sink")
    proxy.cut()
    with pytest.raises(aiohttp.ClientError):
        await request
    sink.hang = False
