"""What a REST caller is told when its message is not simply accepted, over real sockets.

Unauthenticated and authenticated callers alike get a status, a stable problem ``type``, a short
reason they can act on and an ``id``; never a connector or route name, a URL, a Python class
name or a traceback. The full reason is in a log line carrying that same id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.logs import JsonFormatter
from tests.gwtest import free_port, running_gateway

pytestmark = pytest.mark.integration

TOKEN = "zebra-token-0123456789"
# Every name the config gives has "zebra" in it, so one word finds any of them in an answer.
INTERNAL = re.compile(r"zebra|127\.0\.0\.1|https?://|Traceback|\b[A-Z][A-Za-z]+(?:Error|Exception)\b|pydantic")


def config(port: int, down: int, out: Path) -> str:
    return f"""
connectors:
  inbox-zebra:
    type: rest
    listen: "127.0.0.1:{port}"
    auth: {{type: bearer, tokens: ["${{GW_TEST_ZEBRA_TOKEN}}"]}}
  backend-zebra: {{type: rest, base_url: "http://127.0.0.1:{down}/zebra-api", timeout: 2s}}
  sink-zebra: {{type: file, path: "{out}"}}
routes:
  - name: zebra-direct
    from: inbox-zebra
    match: {{subject: "/direct"}}
    mode: direct
    to: [{{connector: backend-zebra, path: "/orders"}}]
  - name: zebra-rpc
    from: inbox-zebra
    match: {{subject: "/rpc"}}
    to: [{{connector: backend-zebra, path: "/quote", reply: true}}]
  - name: zebra-template
    from: inbox-zebra
    match: {{subject: "/template"}}
    to: [{{connector: sink-zebra, body: "{{{{ data.order.id }}}}"}}]
  - name: zebra-when
    from: inbox-zebra
    match: {{subject: "/when", when: 'data.kind == "x"'}}
    to: [{{connector: sink-zebra}}]
  - name: zebra-template-strict
    from: inbox-zebra
    match: {{subject: "/strict"}}
    on_failure: {{dead_letter: false}}
    to: [{{connector: sink-zebra, body: "{{{{ data.order.id }}}}"}}]
"""


class _Lines(logging.Handler):
    """The gateway's log lines, as its JSON formatter writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def log_lines() -> Iterator[_Lines]:
    handler = _Lines()
    log = logging.getLogger("gateway")
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


async def test_answers_tell_the_client_what_it_can_fix_and_the_log_has_the_rest_under_the_same_id(
        tmp_path: Path, log_lines: _Lines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_ZEBRA_TOKEN", TOKEN)
    port = free_port()
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with running_gateway(tmp_path, config(port, free_port(), tmp_path / "out.jsonl")), \
            aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}"
        requests = [
            ("no token", "/direct", {}, b"{}", 401),
            ("bad token", "/direct", {"authorization": "Bearer not-the-token-at-all"}, b"{}", 403),
            ("bad body", "/direct", {**auth, "ce-specversion": "1.0"}, b"{}", 400),
            ("backend down", "/direct", auth, b"{}", 503),
            ("backend down, request/reply", "/rpc", auth, b"{}", 503),
            ("failing template, dead-lettered", "/template", auth, b'{"order": {}}', 202),
            ("failing template, refused", "/strict", auth, b'{"order": {}}', 422),
            ("no route", "/nowhere", auth, b"{}", 404),
            ("body does not parse", "/when", auth, b'{"kind": ', 202),
        ]
        answers = []
        for what, path, headers, body, status in requests:
            async with http.post(base + path, data=body,
                                 headers={"content-type": "application/json", **headers}) as r:
                text = await r.text()
                assert r.status == status, (what, r.status, text)
                answers.append((what, r.status, r.headers.get("content-type", ""), text, await r.json()))
    for what, status, ctype, text, doc in answers:
        assert not INTERNAL.search(text), (what, text)
        assert doc["id"], (what, text)
        assert any(doc["id"] in line for line in log_lines.lines), (what, doc["id"])
        if status >= 400:
            assert ctype == "application/problem+json", what
            assert doc["type"].startswith("urn:gateway:problem:") and doc["detail"] and doc["status"] == status
    problems = {what: doc for what, _, _, _, doc in answers}
    assert problems["no token"]["type"] == "urn:gateway:problem:unauthorized"
    assert problems["backend down"]["type"] == "urn:gateway:problem:unavailable"
    assert problems["backend down, request/reply"]["type"] == "urn:gateway:problem:upstream-unavailable"
    assert problems["failing template, refused"]["type"] == "urn:gateway:problem:unprocessable"
    assert problems["no route"]["type"] == "urn:gateway:problem:no-route"
    assert problems["body does not parse"]["reason"].startswith("the body cannot be parsed: invalid JSON")
    # the detail the client could not be given is in the log line with its id
    strict = problems["failing template, refused"]["id"]
    assert any(strict in line and "zebra-template-strict" in line for line in log_lines.lines)
    down = problems["backend down"]["id"]
    assert any(down in line and "backend-zebra" in line for line in log_lines.lines)
