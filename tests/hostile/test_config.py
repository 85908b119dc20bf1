"""Hostile routes.yaml: every file is refused with line-numbered issues, fast, off the event loop.

Each hostile file goes to a running gateway three ways: ``POST /api/routes/validate`` with a
viewer token (answered with the issues, ``/healthz`` responsive throughout, messages still
accepted), a write over routes.yaml that hot reload picks up (logged ``config.invalid`` with
its issues, the old config serving), and ``gateway validate`` (``file:line: path: message``
lines, exit 1, no traceback). Refused edits are in the log with who, what and why; the admin
API's concurrent validations queue in one worker and the surplus is answered 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import aiohttp

from gateway.admin.auth import hash_token
from tests.gwtest import jsonl, wait_for
from tests.hostile.harness import HostileGateway, LoopProbe
from tests.ports import free_port

VIEWER, EDITOR = "viewer-token-for-hostile-config", "editor-token-for-hostile-config"
GATEWAY = str(Path(sys.executable).with_name("gateway"))


def billion_laughs(levels: int) -> str:
    text = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text


#: name -> (routes.yaml bytes, the line an issue must name)
HOSTILE: dict[str, tuple[bytes, int]] = {
    "merge of a list": (b"x: &x [1]\nconnectors:\n  <<: *x\n", 3),
    "impossible date": (b"connectors: {}\nroutes:\n  - name: 2024-13-45\n", 3),
    "unknown tag": (b"connectors: {}\nroutes: !foo []\n", 2),
    "python tag": (b"connectors: !!python/object/apply:os.system [ls]\n", 1),
    "billion laughs": (billion_laughs(10).encode(), 7),
    "anchor inside itself": (b"connectors: {}\nroutes: &r [*r]\n", 2),
    "100,000-digit integer": (b"connectors: {}\nroutes: []\ngateway: {drain: " + b"9" * 100_000 + b"}\n", 3),
    "two documents": (b"connectors: {}\n---\nroutes: []\n", 2),
    "tab indentation": (b"connectors:\n\tapi: {}\n", 2),
    "invalid UTF-8": (b"connectors: {}\nroutes: [caf\xe9]\n", 2),
    "duplicate key": (b"connectors: {}\nroutes: []\nroutes: []\n", 3),
    "sequence as key": (b"connectors: {}\n? [a, b]\n: 1\n", 2),
    "nesting 500 deep": (b"connectors: {}\nroutes: " + b"[" * 500 + b"]" * 500 + b"\n", 2),
    "unclosed bracket": (b"connectors: {}\nroutes: [{name: r\n", 2),
}


def routes(tmp_path: Path, admin: int, api: int) -> str:
    return f"""\
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens:
      - {{name: vera, sha256: "{hash_token(VIEWER)}", role: viewer}}
      - {{name: eddie, sha256: "{hash_token(EDITOR)}", role: editor}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  log: {{format: json}}
  drain: 5s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
    endpoints: [{{path: "/events/**", methods: [POST]}}]
  sink: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - name: events
    from: api
    to: [{{connector: sink}}]
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def post_event(http: aiohttp.ClientSession, api: int, n: int) -> None:
    async with http.post(f"http://127.0.0.1:{api}/events/{n}", json={"n": n}) as r:
        assert r.status == 202, await r.text()


async def test_hostile_files_are_refused_with_lines_through_the_api(tmp_path: Path) -> None:
    admin, api = free_port(), free_port()
    async with HostileGateway(tmp_path, routes(tmp_path, admin, api)) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            with LoopProbe(gw.admin) as probe:
                for n, (name, (text, line)) in enumerate(HOSTILE.items()):
                    started = time.monotonic()
                    async with http.post(f"http://{gw.admin}/api/routes/validate", data=text,
                                         headers={**bearer(VIEWER), "Content-Type": "application/yaml"}) as r:
                        answer = await r.json()
                    assert r.status == 200 and answer["valid"] is False, (name, r.status, answer)
                    assert line in [e["line"] for e in answer["errors"]], (name, answer["errors"])
                    assert time.monotonic() - started < 10, name
                    await post_event(http, api, n)  # the data plane goes on
            probe.assert_responsive()
            assert gw.loop_lag_worst() < 0.5
            await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == len(HOSTILE), timeout=30,
                           what="every message sent during the attack delivered")
        await gw.alive()


async def test_hostile_files_on_hot_reload_are_logged_invalid_and_the_old_config_serves(tmp_path: Path) -> None:
    admin, api = free_port(), free_port()
    async with HostileGateway(tmp_path, routes(tmp_path, admin, api)) as gw:
        good = gw.config_path.read_bytes()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            with LoopProbe(gw.admin) as probe:
                for n, (name, (text, line)) in enumerate(HOSTILE.items()):
                    seen = len(gw.events("config.invalid"))
                    gw.config_path.write_bytes(text)

                    def names_the_line(seen: int = seen, line: int = line) -> bool:
                        # a watcher may also have read the file half-written: look for the whole one
                        return any(re.match(rf".*:{line}: ", issue)
                                   for logged in gw.events("config.invalid")[seen:] for issue in logged["issues"])

                    await wait_for(names_the_line, timeout=30, what=f"config.invalid with line {line} for {name}")
                    await post_event(http, api, n)  # the old routes serve
            probe.assert_responsive()
            assert gw.events("config.watch_failed") == []
            gw.config_path.write_bytes(good)
            await wait_for(lambda: len(jsonl(tmp_path / "out.jsonl")) == len(HOSTILE), timeout=30,
                           what="every message sent during the attack delivered")
        await gw.alive()


async def test_gateway_validate_prints_file_line_path_message_and_exits_1(tmp_path: Path) -> None:
    async def validate(path: Path) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(GATEWAY, "validate", str(path), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    paths = []
    for i, (text, _) in enumerate(HOSTILE.values()):
        paths.append(tmp_path / f"hostile-{i}.yaml")
        paths[-1].write_bytes(text)
    for (name, (_, line)), path in zip(HOSTILE.items(), paths, strict=True):
        code, err = await validate(path)
        assert code == 1 and "Traceback" not in err, (name, code, err)
        assert f"{path}:{line}: " in err, (name, err)
        issues = err.splitlines()[:-1]
        assert issues and all(re.match(rf"{re.escape(str(path))}(:\d+)?: ", i) for i in issues), (name, err)


async def test_refused_edits_are_logged_with_who_what_and_why(tmp_path: Path) -> None:
    admin, api = free_port(), free_port()
    async with HostileGateway(tmp_path, routes(tmp_path, admin, api)) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            url = f"http://{gw.admin}/api/routes"
            async with http.get(url, headers=bearer(VIEWER)) as r:
                etag = r.headers["ETag"]
            yaml_editor = {**bearer(EDITOR), "Content-Type": "application/yaml"}
            async with http.put(url, data=billion_laughs(10), headers={**yaml_editor, "If-Match": etag}) as r:
                assert r.status == 422 and (await r.json())["errors"][0]["line"] == 7
            async with http.put(url, data=b"routes: []\n", headers={**yaml_editor, "If-Match": '"0123abcd0123"'}) as r:
                assert r.status == 409
        invalid, refused = gw.events("config.invalid")[-1], gw.events("config.refused")[-1]
        assert invalid["by"] == "eddie" and invalid["version"] and "alias *f" in invalid["first"]
        assert refused["by"] == "eddie" and refused["base"] == "0123abcd0123" and refused["status"] == 409
        assert refused["version"] and "based on version 0123abcd0123" in refused["reason"]
        await gw.alive()


async def test_concurrent_validations_queue_in_one_worker_and_the_surplus_is_told_to_retry(tmp_path: Path) -> None:
    admin, api = free_port(), free_port()
    big = routes(tmp_path, admin, api).split("routes:\n")[0].split("connectors:\n", 1)[1]
    big = "connectors:\n" + big + "routes:\n" + "".join(
        f"  - {{name: r{i}, from: api, match: {{subject: '/events/{i}/**', when: 'data.n > {i}'}}, "
        f"to: [{{connector: sink, headers: {{x-n: '{{{{ data.n }}}}'}}}}]}}\n" for i in range(10_000))
    assert len(big) > 1024 * 1024  # over the 1 MiB that was the limit: a 10,000-route config fits
    async with HostileGateway(tmp_path, routes(tmp_path, admin, api)) as gw:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:

            async def validate() -> tuple[int, str | None, object]:
                async with http.post(f"http://{gw.admin}/api/routes/validate", data=big,
                                     headers={**bearer(VIEWER), "Content-Type": "application/yaml"}) as r:
                    return r.status, r.headers.get("Retry-After"), (await r.json())

            with LoopProbe(gw.admin) as probe:
                answers = await asyncio.gather(*(validate() for _ in range(8)))
                await post_event(http, api, 1)
            probe.assert_responsive()
            assert gw.loop_lag_worst() < 0.5
        statuses = sorted(status for status, _, _ in answers)
        assert 200 in statuses and 503 in statuses, statuses
        assert set(statuses) == {200, 503}, answers
        for status, retry_after, body in answers:
            if status == 200:
                assert body["valid"] is True and body["routes"] == 10_000, body  # type: ignore[index]
            else:
                assert retry_after is not None and int(retry_after) > 0
        await gw.alive()
