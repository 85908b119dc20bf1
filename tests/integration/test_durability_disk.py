"""The spool on a tiny filesystem: refuse with temporary errors, never acknowledge what could
not be stored, take readiness down, and come back on its own when space returns.

The filesystem is a real 4 MiB tmpfs mounted for the test (the machine runs tests as root;
``mount -t tmpfs`` is the whole requirement), so ENOSPC comes from the kernel through SQLite.
"""

from __future__ import annotations

import os
import subprocess
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
