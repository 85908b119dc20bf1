"""Templates and conditions that would stall the gateway (issue 16, template/expression family).

Config bombs: a route template whose constants are enormous (``{{ 10**10000000 }}``,
``{{ 'x' * 10**9 }}``) is refused at load with its line, by ``gateway validate``, by
``POST /api/routes/validate`` and by a hot reload, without running the arithmetic; the running
routes keep serving. Message bombs: data that drives nested loops in a template, and a
catastrophic pattern (``(a+)+$``) given to ``matches()``, are answered at once (dead letter,
not matched) while ``/healthz`` stays quick, and the next ordinary message is delivered.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.admin import hash_token
from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port

GATEWAY = str(Path(sys.executable).with_name("gateway"))
VIEWER = "viewer-secret-token"
BOMBS = {"power": "{{ 10**10000000 }}", "repeat": "{{ 'x' * 10**9 }}"}
#: Unbounded, these take 17-28 s of CPU (and 2.9 GB for the repeat); refused, well under this.
QUICK = 10.0
#: No request waits longer than this (a stalled gateway fails the test instead of hanging it).
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60)


def routes_yaml(tmp_path: Path, api: int, admin: int, out: Path, report: str = "{{ data.n }} dots") -> str:
    """The gateway's routes; ``report`` is the body template of the ``report`` route."""
    return f"""\
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens:
      - {{name: victor, sha256: "{hash_token(VIEWER)}", role: viewer}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  log: {{format: json}}
  drain: 5s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
    endpoints: [{{path: "/**", methods: [POST]}}]
  sink: {{type: file, path: "{out}"}}
routes:
  - name: loops
    from: api
    match: {{subject: "/loops/**"}}
    to:
      - connector: sink
        body: "{{% for i in range(data.n) %}}{{% for j in range(data.n) %}}.{{% endfor %}}{{% endfor %}}"
  - name: pattern
    from: api
    match: {{subject: "/pattern/**", when: "matches(subject, data.p)"}}
    to: [{{connector: sink}}]
  - name: report
    from: api
    match: {{subject: "/report/**"}}
    to:
      - connector: sink
        body: "{report}"
"""


def body_line(text: str) -> int:
    """The line of the ``report`` route's body in ``text``."""
    return text.count("\n", 0, text.rindex("body:")) + 1


async def post(http: aiohttp.ClientSession, port: int, path: str, data: object) -> tuple[int, dict[str, object], float]:
    t0 = time.monotonic()
    async with http.post(f"http://127.0.0.1:{port}{path}", json=data) as r:
        return r.status, await r.json(content_type=None), time.monotonic() - t0


@pytest.mark.parametrize("bomb", sorted(BOMBS))
async def test_gateway_validate_refuses_a_template_bomb_with_its_line(tmp_path: Path, bomb: str) -> None:
    text = routes_yaml(tmp_path, free_port(), free_port(), tmp_path / "out.jsonl", BOMBS[bomb])
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(GATEWAY, "validate", str(path), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, env=dict(os.environ))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    took, said = time.monotonic() - t0, out.decode(errors="replace")
    assert proc.returncode == 1, said
    assert took < QUICK, f"gateway validate took {took:.1f} s"
    assert f"{path}:{body_line(text)}: routes[2].to[0].body: template refused" in said, said
    assert "Traceback" not in said


async def test_admin_validate_and_hot_reload_refuse_template_bombs_while_serving(tmp_path: Path) -> None:
    api, admin, out = free_port(), free_port(), tmp_path / "out.jsonl"
    good = routes_yaml(tmp_path, api, admin, out)
    async with HostileGateway(tmp_path, good) as gw, aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        for name, bomb in BOMBS.items():
            text = routes_yaml(tmp_path, api, admin, out, bomb)
            with LoopProbe(gw.admin) as probe:
                t0 = time.monotonic()
                async with http.post(f"http://{gw.admin}/api/routes/validate", data=text,
                                     headers={"Authorization": f"Bearer {VIEWER}",
                                              "Content-Type": "application/yaml"}) as r:
                    status, answer = r.status, await r.json(content_type=None)
                took = time.monotonic() - t0
            probe.assert_responsive()
            assert took < QUICK, f"{name}: /api/routes/validate took {took:.1f} s"
            assert status == 200 and answer["valid"] is False, (status, answer)
            error = answer["errors"][0]
            assert error["line"] == body_line(text) and "template refused" in error["message"], error

            invalid = len(gw.events("config.invalid"))
            with LoopProbe(gw.admin) as probe:
                gw.config_path.with_name("routes.yaml.new").write_text(text)
                os.replace(gw.config_path.with_name("routes.yaml.new"), gw.config_path)
                await wait_for(lambda seen=invalid: len(gw.events("config.invalid")) > seen, timeout=30,
                               what=f"{name}: the hot reload logged as invalid")
            probe.assert_responsive()
            status, answer, _ = await post(http, api, f"/report/{name}", {"n": 7})
            assert status == 202 and answer["status"] == "accepted", answer
        await wait_for(lambda: len(jsonl(out)) == len(BOMBS), timeout=15, what="the reports delivered")
        assert [line["body"] for line in jsonl(out)] == ["7 dots"] * len(BOMBS)  # the old routes served them
        assert gw.loop_lag_worst() < 0.5
        await gw.alive()


async def test_message_data_cannot_stall_templates_or_conditions(tmp_path: Path) -> None:
    api, admin, out = free_port(), free_port(), tmp_path / "out.jsonl"
    async with HostileGateway(tmp_path, routes_yaml(tmp_path, api, admin, out)) as gw, \
            aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as http:
        with LoopProbe(gw.admin) as probe:
            # 100,000² iterations unbounded; the render's budget stops it: dead-lettered, permanently.
            status, answer, took = await post(http, api, "/loops/big", {"n": 100_000})
            assert status == 202 and answer["status"] == "dead_lettered", answer
            assert took < QUICK
            async with http.get(f"http://{gw.admin}/api/dead-letters", params={"route": "loops"},
                                headers={"Authorization": f"Bearer {VIEWER}"}) as r:
                [kept] = (await r.json())["dead_letters"]
            # The iteration budget or the deadline, whichever a busy machine reaches first.
            assert kept["reason"] == "template" and "gateway.templates" in kept["last_error"], kept
            # Backtracking regex engines take 2^40 steps here; RE2 answers at once: no route matches.
            status, answer, took = await post(http, api, "/pattern/" + "a" * 40 + "b", {"p": "(a+)+$"})
            assert 400 <= status < 500, (status, answer)
            assert took < QUICK
            status, answer, _ = await post(http, api, "/loops/small", {"n": 3})
            assert status == 202 and answer["status"] == "accepted", answer
            status, answer, _ = await post(http, api, "/pattern/" + "a" * 40, {"p": "(a+)+$"})
            assert status == 202 and answer["status"] == "accepted", answer
        probe.assert_responsive()
        assert gw.loop_lag_worst() < 0.5
        await gw.alive()
        await wait_for(lambda: len(jsonl(out)) == 2, timeout=15, what="the two ordinary messages delivered")
    delivered = jsonl(out)
    assert delivered[0]["body"] == "." * 9
    assert delivered[1]["subject"] == "/pattern/" + "a" * 40
