"""Hostile HTTP clients against the REST data plane: oversized heads, slow heads and bodies, and a
slowloris flood. Each is refused with its HTTP answer below the app (nothing reaches the spool or
the sink), real requests keep getting ``202`` meanwhile, and ``/healthz`` stays responsive.

The slowloris test opens about a thousand sockets in this process and the gateway it starts (a
child, which inherits the limit): it raises the soft open-file limit (``RLIMIT_NOFILE``) to 4096
when it is lower and the hard limit allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from pathlib import Path

import aiohttp
import pytest

from tests.gwtest import jsonl
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port


def _routes(tmp_path: Path, port: int, out: Path, http_limits: str = "", read_timeout: str = "10s") -> str:
    admin = free_port()
    return f"""
gateway:
  admin: {{listen: "127.0.0.1:{admin}"}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  log: {{format: json}}
  drain: 5s
  http: {{"127.0.0.1:{port}": {{{http_limits}}}}}
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {{type: none}}
    read_timeout: {read_timeout}
    endpoints: [{{path: "/events/**", methods: [POST]}}]
  sink: {{type: file, path: "{out}"}}
routes:
  - {{name: events, from: api, to: [{{connector: sink}}]}}
"""


async def _answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int | None, float]:
    """The status of what the server answers (None if it closed without one) and when it closed."""
    t0 = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - t0


async def test_an_oversized_head_is_refused_before_the_app(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, _routes(tmp_path, port, out)) as gw:
        url = f"http://127.0.0.1:{port}/events/x"
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession() as http:
                for size in (2 * 1024 * 1024, 20 * 1024 * 1024):
                    async with http.post(url, json={"big": True}, headers={"X-Big": "a" * size}) as r:
                        assert r.status == 431
                        assert r.headers["content-type"] == "application/problem+json"
                many = {f"X-H{i}": "v" for i in range(200)}
                async with http.post(url, json={"many": True}, headers=many) as r:
                    assert r.status == 431
                async with http.post(url + "?q=" + "a" * 20000, json={"long": True}) as r:
                    assert r.status == 414
                async with http.post(url, json={"ok": True}, headers={"X-Fine": "b" * 4000}) as r:
                    assert r.status == 202
        probe.assert_responsive()
        await gw.alive()
    refused = gw.events("http.refused")
    assert sum(e.get("header_too_large", 0) for e in refused) == 3
    assert sum(e.get("url_too_long", 0) for e in refused) == 1
    stored = jsonl(out)
    assert len(stored) == 1 and stored[0]["body"] == '{"ok": true}'
    assert b"aaaaaaaaaa" not in out.read_bytes()


async def test_a_head_that_never_completes_is_closed(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, _routes(tmp_path, port, out, "head_timeout: 2s")) as gw:
        with LoopProbe(gw.admin) as probe:
            silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
            partial_r, partial_w = await asyncio.open_connection("127.0.0.1", port)
            partial_w.write(b"POST /events/x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            silent, partial = await asyncio.gather(_answer(silent_r, 30), _answer(partial_r, 30))
        assert silent[0] is None and 1.5 < silent[1] < 10, f"a silent connection: {silent}"
        assert partial[0] == 408 and 1.5 < partial[1] < 10, f"an unfinished head: {partial}"
        for w in (silent_w, partial_w):
            w.close()
        probe.assert_responsive()
        await gw.alive()
    assert jsonl(out) == []


async def test_a_trickled_body_is_cut_off(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    # The connector would wait 60 s for the body; the listener's body_timeout is the bound here.
    routes = _routes(tmp_path, port, out, "body_timeout: 2s", read_timeout="60s")
    async with HostileGateway(tmp_path, routes) as gw:
        with LoopProbe(gw.admin) as probe:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /events/x HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for _ in range(100):
                        await asyncio.sleep(0.3)
                        writer.write(b" ")
                        await writer.drain()

            dripping = asyncio.create_task(trickle())
            status, took = await _answer(reader, 30)
            dripping.cancel()
            writer.close()
        assert status == 408 and took < 10, f"answered {status} after {took:.1f}s"
        probe.assert_responsive()
        await gw.alive()
    assert jsonl(out) == []


def _raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} open files (ulimit -n)")


@pytest.mark.parametrize("per_client", ["default", "unbounded"])
async def test_a_slowloris_flood_does_not_turn_real_requests_away(tmp_path: Path, per_client: str) -> None:
    _raise_open_file_limit(4096)
    port, out = free_port(), tmp_path / "out.jsonl"
    limits = "head_timeout: 6s" + (", max_connections_per_client: 0" if per_client == "unbounded" else "")
    async with HostileGateway(tmp_path, _routes(tmp_path, port, out, limits)) as gw:
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        stop = asyncio.Event()

        async def drip() -> None:
            # One header byte per second on every slow connection, never the end of the head.
            while not stop.is_set():
                for _, w in slow:
                    if not w.is_closing():
                        w.write(b"x")
                await asyncio.sleep(1.0)

        with LoopProbe(gw.admin) as probe:
            for i in range(1000):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"POST /events/slow HTTP/1.1\r\nHost: a\r\nX-Slow-%d: " % i)
                slow.append((r, w))
            dripping = asyncio.create_task(drip())
            statuses = []
            async with aiohttp.ClientSession() as http:
                for i in range(50):
                    async with http.post(f"http://127.0.0.1:{port}/events/{i}", json={"i": i}) as resp:
                        statuses.append(resp.status)
            # Every slow connection is closed by the head timeout (or was closed to make room).
            closed = await asyncio.gather(*(_answer(r, 30) for r, _ in slow))
            stop.set()
            await dripping
        for _, w in slow:
            w.close()
        assert statuses == [202] * 50
        assert all(status in (None, 408) for status, _ in closed)
        probe.assert_responsive()
        await gw.alive()
    assert sorted(json.loads(e["body"])["i"] for e in jsonl(out)) == list(range(50))


async def test_a_hostile_traceparent_is_ignored_never_refused_never_echoed(tmp_path: Path) -> None:
    """Huge (as large as the listener takes a header), malformed and repeated trace context headers:
    each message is taken (202) as if it
    had none, stored without a context of the sender's, and no answer echoes what was sent."""
    from gateway.tracecontext import parse

    port, out = free_port(), tmp_path / "out.jsonl"
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    valid = f"00-{tid}-00f067aa0ba902b7-01"
    hostile: list[list[tuple[str, str]]] = [
        [("traceparent", "00-" + "a" * 12_000)],
        [("traceparent", valid + "-" + "x" * 12_000)],
        [("traceparent", valid.upper())],
        [("traceparent", "ff" + valid[2:])],
        [("traceparent", "00-" + "0" * 32 + "-00f067aa0ba902b7-01")],
        [("traceparent", valid), ("traceparent", valid)],  # repeated: not one valid value
        [("traceparent", "garbage"), ("tracestate", "s" * 12_000)],
    ]
    async with HostileGateway(tmp_path, _routes(tmp_path, port, out)) as gw:
        with LoopProbe(gw.admin) as probe:
            async with aiohttp.ClientSession() as http:
                for headers in hostile:
                    async with http.post(f"http://127.0.0.1:{port}/events/t", json={"n": 1}, headers=headers) as r:
                        assert r.status == 202, await r.text()
                        answered = r.headers.get("traceparent")
                        sent = {value for _, value in headers}
                        assert answered is None or (answered not in sent and parse(answered) is not None)
        probe.assert_responsive()
        await gw.alive()
    stored = jsonl(out)
    assert len(stored) == len(hostile)
    for rec in stored:
        ctx = rec["attributes"].get("traceparent")
        assert ctx is None or (tid not in ctx and parse(ctx) is not None)
        assert "sss" not in rec["attributes"].get("tracestate", "")
