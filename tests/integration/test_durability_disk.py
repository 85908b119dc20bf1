"""The spool on a tiny filesystem: refuse with temporary errors, never acknowledge what could
not be stored, take readiness down, and come back on its own when space returns.

The filesystem is a real 4 MiB tmpfs mounted for the test (the machine runs tests as root;
``mount -t tmpfs`` is the whole requirement; without root the tests are skipped), so ENOSPC comes
from the kernel through SQLite.

The long test is what an operator meets: a stream fills the disk while messages are being
delivered, so both new jobs and the removal of delivered ones fail; the disk stays full a while;
space is freed. Every acknowledged message must arrive exactly once (the removal of a delivered
job is retried, never the send) and the write-ahead log must not grow back into the freed space.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.runtime import Runtime
from tests.faultproxy import HttpSink
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the full-disk tests mount a 4 MiB tmpfs (mount -t tmpfs), which needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"the full-disk test mounts a 4 MiB tmpfs and needs root (mount -t tmpfs): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@pytest.fixture
async def sink() -> AsyncIterator[HttpSink]:
    async with HttpSink() as s:
        yield s


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem until ``leave`` bytes are free (0: until the kernel says ENOSPC)."""
    filler = directory / "filler"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(filler, "wb", buffering=0) as fh:
        try:
            todo = max(0, free - leave) if leave else 1 << 40
            chunk = b"\0" * 65536
            while todo > 0:
                n = fh.write(chunk[:min(len(chunk), todo)])
                todo -= n or 0
        except OSError:
            pass  # ENOSPC: full
    return filler


def config(tmp_path: Path, spool: Path, port: int, sink: HttpSink, min_free: str) -> str:
    return f"""
gateway:
  admin: {{listen: "127.0.0.1:{free_port()}"}}
  spool: {{path: "{spool}", min_free_bytes: {min_free}}}
  state_dir: "{tmp_path / 'state'}"
  drain: 2s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {{type: none}}
    endpoints: [{{path: "/in/**", methods: [POST]}}]
  out: {{type: rest, base_url: "{sink.url}"}}
routes:
  - name: to-sink
    from: api
    to: [{{connector: out, path: /sink}}]
    on_failure: {{retry: {{initial: 0.05, max: 0.2}}}}
"""


async def post(session: aiohttp.ClientSession, port: int, ident: str) -> tuple[int, str]:
    async with session.post(f"http://127.0.0.1:{port}/in/{ident}", json={"id": ident}) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After", "")


async def ready(session: aiohttp.ClientSession, rt: Runtime) -> int:
    async with session.get(f"http://{rt.config.model.gateway.admin.listen}/readyz") as r:
        return r.status


async def empty(rt: Runtime) -> bool:
    return not await rt.spool.depth()


async def test_below_the_free_space_minimum_new_messages_get_503(tmp_path: Path, tiny_fs: Path,
                                                                 sink: HttpSink) -> None:
    port = free_port()
    cfg = config(tmp_path, tiny_fs / "spool.db", port, sink, "1MiB")
    async with running_gateway(tmp_path, cfg) as rt, aiohttp.ClientSession() as session:
        assert (await post(session, port, "before"))[0] == 202
        await wait_for(lambda: sink.got("before"), what="delivered")
        filler = fill(tiny_fs, leave=512 * 1024)
        await wait_for(lambda: not rt.spool.has_space, timeout=5, what="low space noticed")
        status, retry_after = await post(session, port, "refused")
        assert status == 503 and int(retry_after) >= 1
        assert await ready(session, rt) == 503
        filler.unlink()
        await wait_for(lambda: _status_is(session, rt, 200), timeout=5, what="ready again")
        assert (await post(session, port, "after"))[0] == 202
        await wait_for(lambda: sink.got("after"), what="delivered after space returned")
        assert not sink.got("refused")


async def _status_is(session: aiohttp.ClientSession, rt: Runtime, code: int) -> bool:
    return await ready(session, rt) == code


async def test_enospc_from_sqlite_is_a_temporary_refusal_and_heals_by_itself(tmp_path: Path, tiny_fs: Path,
                                                                           sink: HttpSink) -> None:
    port = free_port()
    cfg = config(tmp_path, tiny_fs / "spool.db", port, sink, "0")  # no early refusal: let the disk fill up
    async with running_gateway(tmp_path, cfg) as rt, aiohttp.ClientSession() as session:
        accepted = []
        for i in range(5):
            assert (await post(session, port, f"a{i}"))[0] == 202
            accepted.append(f"a{i}")
        await wait_for(lambda: all(sink.got(i) for i in accepted), what="delivered")
        await wait_for(lambda: empty(rt), what="spool emptied")
        filler = fill(tiny_fs)
        refused = []
        for i in range(5):
            status, retry_after = await post(session, port, f"full{i}")
            assert status == 503, "a message the spool could not store must never get 202"
            assert int(retry_after) >= 1
            refused.append(f"full{i}")
        assert not rt.spool.healthy
        assert await _status_is(session, rt, 503)
        assert rt.metrics.registry.get_sample_value(
            "gateway_backpressure_refusals_total", {"connector": "api", "reason": "spool_error"}) == 5
        filler.unlink()
        # no message needs to arrive: the spool's probe notices the space by itself
        await wait_for(lambda: _status_is(session, rt, 200), timeout=5, what="ready again")
        assert (await post(session, port, "after"))[0] == 202
        await wait_for(lambda: sink.got("after"), what="delivered after space returned")
        assert not any(sink.got(i) for i in refused)


async def test_a_disk_that_fills_under_load_recovers_and_sends_each_message_once(tmp_path: Path, tiny_fs: Path,
                                                                                sink: HttpSink) -> None:
    port = free_port()
    spool = tiny_fs / "spool.db"
    cfg = config(tmp_path, spool, port, sink, "0")  # no early refusal: the kernel's ENOSPC decides
    filler = fill(tiny_fs, leave=1536 * 1024)  # an operator's file that leaves 1.5 MiB
    acked: set[str] = set()
    refusals = 0
    payload = "x" * 2048

    async def client(session: aiohttp.ClientSession, c: int, stop: asyncio.Event) -> None:
        nonlocal refusals
        for n in range(100_000):
            if stop.is_set():
                return
            ident = f"c{c}-{n}"
            async with session.post(f"http://127.0.0.1:{port}/in/{ident}", json={"id": ident, "pad": payload}) as r:
                await r.read()
                if r.status == 202:
                    acked.add(ident)
                else:
                    assert r.status == 503, f"a full spool answers 503, not {r.status}"
                    refusals += 1
                    if refusals >= 50:
                        stop.set()
                    await asyncio.sleep(0.05)

    async with running_gateway(tmp_path, cfg) as rt, aiohttp.ClientSession() as session:
        sink.status = 503  # a backlog builds up on disk until the disk is full
        stop = asyncio.Event()
        clients = [asyncio.ensure_future(client(session, c, stop)) for c in range(8)]
        await asyncio.wait(clients, timeout=60)
        stop.set()
        await asyncio.gather(*clients)
        assert refusals >= 50, f"the disk never filled ({len(acked)} accepted): the test proved nothing"
        # The peer is back while the disk is still full: sends succeed, their removal may not.
        # The disk stays full longer than a failed write holds a job back (5 s).
        sink.status = 200
        await asyncio.sleep(8)
        full_duplicates = sink.duplicates
        filler.unlink()
        await wait_for(lambda: all(sink.got(i) for i in acked), timeout=60, what="every accepted message delivered")
        await wait_for(lambda: empty(rt), timeout=30, what="spool emptied")
        await wait_for(lambda: _status_is(session, rt, 200), timeout=10, what="ready again")
        await asyncio.sleep(6)  # long enough for a job held after a failed write to come back
        wal = spool.with_name("spool.db-wal")
        deadline = time.monotonic() + 15
        while wal.exists() and wal.stat().st_size > 512 * 1024 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        wal_size = wal.stat().st_size if wal.exists() else 0
        assert (await post(session, port, "after"))[0] == 202
        await wait_for(lambda: sink.got("after"), what="delivered after space returned")
    print(f"\ndisk full: accepted {len(acked)}, refused {refusals}, duplicates while full {full_duplicates},"
          f" after {sink.duplicates}; write-ahead log {wal_size} bytes after recovery")
    assert sink.duplicates == 0, f"{sink.duplicates} messages were sent more than once"
    assert wal_size <= 512 * 1024, f"the write-ahead log kept {wal_size} bytes of the freed space"
