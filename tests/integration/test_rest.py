"""REST in and out over real sockets: a real gateway runtime, real HTTP clients and servers."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.gwtest import free_port, jsonl, running_gateway, wait_for

pytestmark = pytest.mark.integration


class Peer:
    """A real HTTP server playing the REST service behind the gateway."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict[str, Any]] = []
        self.script: list[int] = []  # statuses to answer, in order; then 200
        self.delay = 0.0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append({"path": request.path, "raw_path": request.raw_path, "query": dict(request.query),
                              "body": body, "headers": dict(request.headers), "method": request.method})
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.script.pop(0) if self.script else 200
        if status == 200:
            return web.json_response({"ok": True, "echo": json.loads(body or b"null"), "n": len(self.received)})
        return web.json_response({"error": status}, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    p = Peer()
    await p.start()
    yield p
    await p.stop()


def config(port: int, peer_port: int, out: Path, extra_routes: str = "", auth: str = "{type: none}",
           max_body: str = "1KiB") -> str:
    return f"""
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {auth}
    max_body: {max_body}
    read_timeout: 2s
    endpoints:
      - {{path: "/events/**", methods: [POST]}}
      - {{path: "/orders/**", methods: [POST, PUT]}}
      - {{path: "/rpc/**", methods: [POST]}}
      - {{path: "/typed/**", methods: [POST], content_types: ["application/json", "text/*"]}}
  backend:
    type: rest
    base_url: "http://127.0.0.1:{peer_port}"
    timeout: 2s
  sink: {{type: file, path: "{out}"}}
routes:
  - name: rpc
    from: api
    match: {{subject: "/rpc/*"}}
    timeout: 1s
    to:
      - connector: backend
        path: "/svc/{{{{ subject.split('/')[-1] }}}}"
        reply: true
  - name: orders
    from: api
    match: {{subject: "/orders/*"}}
    on_failure: {{retry: {{attempts: 5, initial: 50ms, max: 200ms}}}}
    to:
      - connector: backend
        path: "/orders/{{{{ data.id }}}}"
        query: {{source: "{{{{ source }}}}"}}
      - connector: sink
  - name: events
    from: api
    match: {{subject: "/events/**", when: "data.kind != 'ignored'"}}
    to: [{{connector: sink}}]
{extra_routes}
"""


def lines(path: Path) -> list[dict[str, Any]]:
    return jsonl(path)


async def test_post_is_accepted_spooled_and_written_to_the_file(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)) as rt, httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/events/a", json={"kind": "x", "n": 1},
                            headers={"x-trace": "t1", "authorization": "Bearer leak"})
        assert r.status_code == 202
        env_id = r.json()["id"]
        assert r.headers["x-envelope-id"] == env_id and r.json()["status"] == "accepted"
        await wait_for(lambda: lines(out), what="file sink line")
        [line] = lines(out)
        assert line["id"] == env_id and line["subject"] == "/events/a" and json.loads(line["body"]) == {
            "kind": "x", "n": 1}
        assert line["headers"] == {"x-trace": "t1"}  # authorization never travels
        metrics = (await http.get(f"http://{rt.config.model.gateway.admin.listen}/metrics")).text
        assert 'gateway_messages_received_total{connector="api"} 1.0' in metrics
        await wait_for(lambda: 'gateway_messages_delivered_total{connector="sink",route="events"} 1.0'
                       in rt.metrics.exposition().decode(), what="delivered metric")


async def test_rest_in_to_rest_out_with_template_path_query_and_idempotency_key(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        r = await http.put(f"http://127.0.0.1:{port}/orders/9", json={"id": "A 1/2", "total": 5})
        assert r.status_code == 202
        await wait_for(lambda: peer.received, what="peer request")
        got = peer.received[0]
        # a value is one path segment: it cannot add segments, a query or a host
        assert got["path"] == "/orders/A 1/2" and got["raw_path"] == "/orders/A%201%2F2?source=api"
        assert got["query"] == {"source": "api"}
        assert got["headers"]["Idempotency-Key"] == r.json()["id"]
        assert json.loads(got["body"]) == {"id": "A 1/2", "total": 5}


async def test_peer_5xx_is_retried_until_delivered_once(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    peer.script = [503, 500, 200]
    async with running_gateway(tmp_path, config(port, peer.port, out)) as rt, httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/orders/1", json={"id": 1})
        assert r.status_code == 202
        await wait_for(lambda: len(peer.received) == 3, what="three attempts")
        await asyncio.sleep(0.3)
        assert len(peer.received) == 3
        assert {p["headers"]["Idempotency-Key"] for p in peer.received} == {r.json()["id"]}
        assert await rt.spool.count_dead_letters() == 0


async def test_peer_4xx_is_dead_lettered_at_once_with_the_reason(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    peer.script = [422]
    async with running_gateway(tmp_path, config(port, peer.port, out)) as rt, httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/orders/1", json={"id": 1})
        assert r.status_code == 202
        await wait_for(rt.spool.count_dead_letters, what="dead letter")
        [dl] = await rt.spool.dead_letters()
        assert dl.reason == "permanent" and "HTTP 422" in dl.last_error and dl.connector == "backend"
        assert dl.envelope_id == r.json()["id"]
        assert len(peer.received) == 1
        admin = rt.config.model.gateway.admin.listen
        listed = (await http.get(f"http://{admin}/api/dead-letters")).json()["dead_letters"]
        assert [d["envelope_id"] for d in listed] == [r.json()["id"]]


async def test_request_reply_returns_the_peer_answer(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/quote", json={"q": 1})
        assert r.status_code == 200
        assert r.json() == {"ok": True, "echo": {"q": 1}, "n": 1}
        assert peer.received[0]["path"] == "/svc/quote"


@pytest.mark.parametrize(("status", "expected"), [(500, 502), (404, 404), (400, 400)])
async def test_request_reply_failures_map_to_http_status(tmp_path: Path, peer: Peer, status: int,
                                                         expected: int) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    peer.script = [status]
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/x", json={})
        assert r.status_code == expected
        assert r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["detail"] == f"the upstream service answered HTTP {status}"
        assert problem["upstream"] == {"status": status}  # the service's raw body stays in the log
        assert problem["envelope_id"] == r.headers["x-envelope-id"]
        assert "127.0.0.1" not in r.text  # internal hosts never reach the caller


async def test_request_reply_timeout_is_504_not_a_hang(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    peer.delay = 3
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/slow", json={})
        assert r.status_code == 504
        assert "retry-after" in r.headers


async def test_request_reply_with_peer_down_is_503(tmp_path: Path) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, free_port(), out)), httpx.AsyncClient() as http:
        r = await http.post(f"http://127.0.0.1:{port}/rpc/x", json={})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["detail"] == "the upstream service cannot be reached" and "127.0.0.1" not in r.text


async def test_error_paths_answer_problem_json(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}"
        cases = [
            (await http.post(f"{base}/nowhere", json={}), 404),
            (await http.get(f"{base}/events/a"), 405),
            (await http.post(f"{base}/events/a", content=b"x" * 2048), 413),
            (await http.post(f"{base}/events/a", content=b"{}", headers={"ce-specversion": "1.0"}), 400),
            (await http.post(f"{base}/events/a", content=b"[1]",
                             headers={"content-type": "application/cloudevents+json"}), 400),
            (await http.post(f"{base}/events/a", json={"kind": "ignored"}), 404),  # no route → reject policy
            (await http.post(f"{base}/typed/a", content=b"x", headers={"content-type": "image/png"}), 415),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.status_code, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            problem = response.json()
            assert problem["status"] == status and problem["title"] and problem["detail"]
        assert cases[1][0].headers["allow"] == "POST"
    assert lines(out) == []  # nothing refused was stored


async def test_slow_body_times_out_with_408_and_others_are_served(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /events/a HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{")
        await writer.drain()
        ok = await http.post(f"http://127.0.0.1:{port}/events/b", json={"n": 1})
        assert ok.status_code == 202
        head = await asyncio.wait_for(reader.read(200), timeout=5)
        assert head.startswith(b"HTTP/1.1 408")
        writer.close()


async def test_bearer_auth(tmp_path: Path, peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_TOKEN", "t0ken-long-enough")
    port, out = free_port(), tmp_path / "out.jsonl"
    cfg = config(port, peer.port, out, auth='{type: bearer, tokens: ["${GW_TEST_TOKEN}"]}')
    async with running_gateway(tmp_path, cfg), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/events/a"
        assert (await http.post(url, json={})).status_code == 401
        assert (await http.post(url, json={}, headers={"authorization": "Bearer nope"})).status_code == 403
        assert (await http.post(url, json={}, headers={"authorization": "Bearer t0ken-long-enough"})).status_code == 202
        spec = (await http.get(f"http://127.0.0.1:{port}/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["auth"]["scheme"] == "bearer"
        assert "/events/{rest}" in spec["paths"]


async def test_api_key_auth(tmp_path: Path, peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_KEY", "k3y-long-enough")
    port, out = free_port(), tmp_path / "out.jsonl"
    cfg = config(port, peer.port, out, auth='{type: api_key, header: X-Gw-Key, tokens: ["${GW_TEST_KEY}"]}')
    async with running_gateway(tmp_path, cfg), httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{port}/events/a"
        assert (await http.post(url, json={})).status_code == 401
        assert (await http.post(url, json={}, headers={"x-gw-key": "nope"})).status_code == 403
        ok = await http.post(url, json={}, headers={"x-gw-key": "k3y-long-enough"})
        assert ok.status_code == 202
        await wait_for(lambda: lines(out), what="the accepted message")
    assert all("k3y" not in json.dumps(line) for line in lines(out))  # the key is not carried along


async def test_cloudevents_binary_and_structured_keep_the_event_id(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)), httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{port}"
        r1 = await http.post(f"{base}/events/ce", json={"kind": "b"}, headers={
            "ce-specversion": "1.0", "ce-id": "evt-1", "ce-source": "/sensors/1", "ce-type": "reading"})
        r2 = await http.post(f"{base}/events/ce", content=json.dumps({
            "specversion": "1.0", "id": "evt-2", "source": "/s", "type": "t", "data": {"kind": "s"}}),
            headers={"content-type": "application/cloudevents+json"})
        assert (r1.status_code, r1.json()["id"]) == (202, "evt-1")
        assert (r2.status_code, r2.json()["id"]) == (202, "evt-2")
        await wait_for(lambda: len(lines(out)) == 2, what="two lines")
        by_id = {line["id"]: line for line in lines(out)}
        assert by_id["evt-1"]["attributes"]["ce_type"] == "reading"
        assert json.loads(by_id["evt-2"]["body"]) == {"kind": "s"}


async def test_spool_failure_answers_503_and_stores_nothing(tmp_path: Path, peer: Peer) -> None:
    port, out = free_port(), tmp_path / "out.jsonl"
    async with running_gateway(tmp_path, config(port, peer.port, out)) as rt, httpx.AsyncClient() as http:
        rt.spool.min_free_bytes = 1 << 62  # the disk now counts as full
        rt.spool._free_checked_at = 0
        r = await http.post(f"http://127.0.0.1:{port}/events/a", json={"n": 1})
        assert r.status_code == 503 and r.headers["retry-after"]
        ready = await http.get(f"http://{rt.config.model.gateway.admin.listen}/readyz")
        assert ready.status_code == 503
    assert lines(out) == []


@pytest.mark.parametrize("kind", ["bearer", "basic"])
async def test_outbound_credentials_from_a_file_are_sent_and_a_renewed_one_is_used_next(
        tmp_path: Path, peer: Peer, kind: str) -> None:
    """outbound_auth reaches the backend; the token (or password) file is read per request, so a
    credential renewed in the file (a sidecar, a mounted Secret) goes with the next message."""
    port, out = free_port(), tmp_path / "out.jsonl"
    secret = tmp_path / "backend-secret"
    secret.write_text("first-credential\n")
    auth = (f'{{type: bearer, token: {{file: "{secret}"}}}}' if kind == "bearer"
            else f'{{type: basic, username: gw, password: {{file: "{secret}"}}}}')
    text = config(port, peer.port, out).replace('    timeout: 2s\n', f'    timeout: 2s\n    outbound_auth: {auth}\n', 1)

    def sent(n: int) -> str:
        return str(peer.received[n]["headers"]["Authorization"])

    def expected(value: str) -> str:
        return f"Bearer {value}" if kind == "bearer" else "Basic " + base64.b64encode(f"gw:{value}".encode()).decode()

    async with running_gateway(tmp_path, text), httpx.AsyncClient() as http:
        assert (await http.post(f"http://127.0.0.1:{port}/orders/1", json={"id": 1})).status_code == 202
        await wait_for(lambda: len(peer.received) == 1, what="the first request")
        assert sent(0) == expected("first-credential")
        replacement = tmp_path / "backend-secret.new"
        replacement.write_text("renewed-credential\n")
        replacement.rename(secret)
        assert (await http.post(f"http://127.0.0.1:{port}/orders/2", json={"id": 2})).status_code == 202
        await wait_for(lambda: len(peer.received) == 2, what="the second request")
        assert sent(1) == expected("renewed-credential")
