"""Admission: past ``spool.admit_depth`` jobs waiting for a connector, a new message for it is
taken in only as delivery makes room — it waits up to ``admit_wait``, else it is refused with
503 + Retry-After (before the spool fills) — and is taken in again once the backlog drains.

The sink is a file connector whose path is a directory: every append fails (EISDIR) and the
jobs stay in the spool, until the test removes the directory and delivery resumes.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration


def config(tmp_path: Path, port: int, admin: int, out: Path, admit_wait: str) -> str:
    return f"""
gateway:
  admin: {{listen: "127.0.0.1:{admin}"}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0, admit_depth: 3, admit_wait: {admit_wait}}}
  state_dir: "{tmp_path / 'state'}"
connectors:
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  out: {{type: file, path: "{out}"}}
routes:
  - name: keep
    from: api
    to: [{{connector: out, format: body}}]
    on_failure: {{retry: {{attempts: 1000, initial: 0.05, max: 0.2, max_age: 1h}}}}
"""


def lines(out: Path) -> list[bytes]:
    return out.read_bytes().splitlines() if out.is_file() else []


async def refusals(http: httpx.AsyncClient, admin: int) -> float:
    text = (await http.get(f"http://127.0.0.1:{admin}/metrics")).text
    m = re.search(r'gateway_backpressure_refusals_total\{connector="api",reason="backlog"\} ([\d.]+)', text)
    return float(m.group(1)) if m else 0.0


async def test_a_backlog_at_admit_depth_refuses_with_503_and_retry_after_until_it_drains(tmp_path: Path) -> None:
    port, admin, out = free_port(), free_port(), tmp_path / "out.jsonl"
    out.mkdir()  # appends fail until it is removed
    async with running_gateway(tmp_path, config(tmp_path, port, admin, out, "200ms")), \
            httpx.AsyncClient(timeout=10) as http:
        url = f"http://127.0.0.1:{port}/events"
        for n in range(3):
            assert (await http.post(url, json={"n": n})).status_code == 202
        refused = await http.post(url, json={"n": "refused"})
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert await refusals(http, admin) == 1

        out.rmdir()  # the sink works again: the backlog drains
        await wait_for(lambda: len(lines(out)) == 3, timeout=30, what="the backlog to be delivered")
        accepted = await http.post(url, json={"n": 3})
        assert accepted.status_code == 202, accepted.text
        await wait_for(lambda: len(lines(out)) == 4, timeout=10, what="the new message")
    assert b'"refused"' not in out.read_bytes()  # refused means not taken: the sender retries it


async def test_a_message_waiting_for_room_is_accepted_when_delivery_makes_it(tmp_path: Path) -> None:
    port, admin, out = free_port(), free_port(), tmp_path / "out.jsonl"
    out.mkdir()
    async with running_gateway(tmp_path, config(tmp_path, port, admin, out, "60s")) as rt, \
            httpx.AsyncClient(timeout=90) as http:
        url = f"http://127.0.0.1:{port}/events"
        for n in range(3):
            assert (await http.post(url, json={"n": n})).status_code == 202
        waiting = asyncio.ensure_future(http.post(url, json={"n": 3}))
        gate = rt.delivery.dispatcher.admission
        await wait_for(lambda: gate.waiting("out") == 1, timeout=5, what="the fourth message to wait at the gate")
        assert not waiting.done()
        out.rmdir()
        answer = await waiting
        assert answer.status_code == 202, answer.text
        await wait_for(lambda: len(lines(out)) == 4, timeout=30, what="all four messages")
        assert await refusals(http, admin) == 0

