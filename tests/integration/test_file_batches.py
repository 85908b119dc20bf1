"""The file sink's batches under failure: a spooled job is acknowledged (removed from the spool)
only after the fsync that covers its line, so an fsync that fails leaves every job of its batch
in the spool, and ``kill -9`` during batched appends loses no acknowledged message."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_crash import CrashRun, RestSender, gateway_yaml

pytestmark = pytest.mark.integration


def ids(path: Path) -> dict[str, int]:
    """How often each ``{"id": …}`` line is in the file (half lines a crash left are skipped)."""
    counts: dict[str, int] = {}
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                ident = str(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                continue
            counts[ident] = counts.get(ident, 0) + 1
    return counts


async def test_a_failed_fsync_leaves_every_job_of_its_batch_in_the_spool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    failed: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if failing:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    failing = True
    monkeypatch.setattr(os, "fsync", fsync)
    yaml = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  out: {{type: file, path: "{out}"}}
routes:
  - name: keep
    from: api
    to: [{{connector: out, format: body}}]
    on_failure: {{retry: {{attempts: 1000, initial: 0.05, max: 0.2, max_age: 1h}}}}
"""
    async with running_gateway(tmp_path, yaml) as rt, httpx.AsyncClient(timeout=10) as http:
        answers = await asyncio.gather(*(http.post(f"http://127.0.0.1:{port}/e", json={"id": f"m{n}"})
                                         for n in range(40)))
        assert [a.status_code for a in answers] == [202] * 40
        await wait_for(lambda: len(failed) >= 3, timeout=10, what="appends whose fsync fails")
        depth = (await rt.delivery.spool.depth()).get("out", (0, 0.0))[0]
        assert depth == 40, "a job whose line was not fsync'd left the spool"
        assert rt.metrics.registry.get_sample_value(
            "gateway_messages_delivered_total", {"connector": "out", "route": "keep"}) in (None, 0.0)

        failing = False
        await wait_for(lambda: set(ids(out)) == {f"m{n}" for n in range(40)}, timeout=30,
                       what="every message once fsync works again")

        async def drained() -> bool:
            return (await rt.delivery.spool.depth()).get("out", (0, 0.0))[0] == 0

        await wait_for(drained, timeout=10, what="the spool to empty")


class FileSink:
    """The file connector's output, read the way :class:`CrashRun` reads its HTTP sink."""

    url = "http://127.0.0.1:9"  # not used: the route goes to a file
    status = 200  # the crash run's failure schedule has no effect on a file

    def __init__(self, path: Path):
        self.path = path
        self._size = -1
        self._counts: dict[str, int] = {}

    @property
    def counts(self) -> dict[str, int]:
        size = self.path.stat().st_size if self.path.is_file() else 0
        if size != self._size:
            self._size, self._counts = size, ids(self.path)
        return self._counts

    def got(self, ident: str) -> bool:
        return self.counts.get(ident, 0) > 0

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.counts.values() if n > 1)


class FileRestSender(RestSender):
    def routes_yaml(self) -> str:
        return super().routes_yaml().replace("{connector: sink, path: /sink}", "{connector: sink, format: body}")


async def test_kill_9_during_batched_appends_loses_no_acknowledged_message(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    sink = FileSink(out)
    sender = FileRestSender()
    run = CrashRun(tmp_path, [sender], sink, kills=4, clients=16)  # type: ignore[arg-type]
    config = tmp_path / "routes.yaml"
    http_sink = f'  sink: {{type: rest, base_url: "{sink.url}", timeout: 2s}}'
    text = gateway_yaml(tmp_path, run.gateway.admin, sink, [sender])  # type: ignore[arg-type]
    assert http_sink in text
    config.write_text(text.replace(http_sink, f'  sink: {{type: file, path: "{out}"}}'))
    report = await run.run()
    print(report)
    assert report.acknowledged > 100, "too little traffic for the test to mean anything"
    assert report.lost == [], f"LOST acknowledged messages: {report.lost[:20]} (seed {run.seed})"
    assert report.unexpected == [], f"unexpected messages: {report.unexpected[:20]}"
