"""Admin sessions and the failed-attempt budget over real HTTP: a session ends when its token is
rotated or removed, at its expiry and on logout; bearer guessing is throttled per client address
and never locks out the right token; a viewer's refusal says what is true. Then two real
``gateway run`` processes on one routes.yaml, as two pods behind the chart's admin Service: a
session made on one is accepted by the other, and rotating the token ends it on both."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin import hash_token
from gateway.runtime import Runtime
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_crash import GATEWAY, GatewayProcess

pytestmark = pytest.mark.integration

EDITOR, VIEWER = "editor-secret-token", "viewer-secret-token"
SESSION_KEY = secrets.token_urlsafe(32)


def config(tmp_path: Path, admin: int, *, alice: str = EDITOR, victor: str | None = VIEWER,
           ttl: str | None = None) -> str:
    victor_line = f'      - {{name: victor, sha256: "{hash_token(victor)}", role: viewer}}\n' if victor else ""
    ttl_line = f"    session_ttl: {ttl}\n" if ttl else ""
    return f"""\
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
{ttl_line}    tokens:
      - {{name: alice, sha256: "{hash_token(alice)}", role: editor}}
{victor_line}  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  drain: 2s
connectors:
  console: {{type: log}}
routes: []
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(client: httpx.AsyncClient, token: str) -> str:
    r = await client.post("/api/login", json={"token": token})
    assert r.status_code == 200, r.text
    return str(r.json()["session"])


async def whoami(client: httpx.AsyncClient, token: str) -> int:
    return (await client.get("/api/whoami", headers=bearer(token))).status_code


async def put_routes(client: httpx.AsyncClient, rt: Runtime, text: str, token: str) -> None:
    r = await client.put("/api/routes", content=text, headers={
        **bearer(token), "Content-Type": "application/yaml", "If-Match": f'"{rt.config.version}"'})
    assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, int]]:
    admin = free_port()
    async with running_gateway(tmp_path, config(tmp_path, admin)) as rt:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}", timeout=10) as client:
            yield rt, client, admin


async def test_rotating_a_token_ends_its_sessions_and_removing_one_ends_them_too(gw: Any, tmp_path: Path) -> None:
    rt, client, admin = gw
    alice, victor = await login(client, EDITOR), await login(client, VIEWER)
    assert await whoami(client, alice) == 200 and await whoami(client, victor) == 200
    # Alice rotates her own token through the API, with her session.
    await put_routes(client, rt, config(tmp_path, admin, alice="editor-rotated-token"), alice)
    assert await whoami(client, alice) == 401, "the session of a rotated token must end"
    assert await whoami(client, EDITOR) == 401
    assert await whoami(client, "editor-rotated-token") == 200
    assert await whoami(client, victor) == 200, "other tokens' sessions go on"
    # Victor's token is removed.
    await put_routes(client, rt, config(tmp_path, admin, alice="editor-rotated-token", victor=None),
                     "editor-rotated-token")
    assert await whoami(client, victor) == 401


async def test_a_session_ends_at_its_expiry_and_on_logout(tmp_path: Path) -> None:
    admin = free_port()
    async with running_gateway(tmp_path, config(tmp_path, admin, ttl="2s")), \
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}", timeout=10) as client:
        r = await client.post("/api/login", json={"token": EDITOR})
        assert r.json()["expires_in"] == 2
        expiring, ended = r.json()["session"], await login(client, EDITOR)
        assert await whoami(client, ended) == 200
        assert (await client.post("/api/logout", headers=bearer(ended))).status_code == 200
        assert await whoami(client, ended) == 401
        assert await whoami(client, expiring) == 200, "a logout ends that session only"
        await asyncio.sleep(3)
        assert await whoami(client, expiring) == 401


async def test_bearer_guessing_is_throttled_per_address_never_the_right_token(gw: Any) -> None:
    _, client, admin = gw
    statuses = [(await client.get("/api/config", headers=bearer(f"guess-{i}"))).status_code for i in range(25)]
    assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
    r = await client.get("/api/config", headers=bearer(f"guess-{len(statuses)}"))
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 300
    # The throttled address waits, whatever it sends, or the guessing would go on.
    assert (await client.get("/api/config", headers=bearer(EDITOR))).status_code == 429
    assert (await client.post("/api/login", json={"token": EDITOR})).status_code == 429
    # Another address is not held back: the right token works at once.
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}", transport=other, timeout=10) as c2:
        assert (await c2.get("/api/config", headers=bearer(EDITOR))).status_code == 200
        assert (await c2.post("/api/login", json={"token": EDITOR})).status_code == 200
    # Once the back-off has passed, the first address gets in with the right token.
    await asyncio.sleep(int(r.headers["retry-after"]) + 0.5)
    assert (await client.get("/api/config", headers=bearer(EDITOR))).status_code == 200


async def test_a_viewers_refusal_says_its_role_not_a_second_factor(gw: Any) -> None:
    _, client, _ = gw
    for token in (VIEWER, await login(client, VIEWER)):
        r = await client.post("/api/reload", headers=bearer(token))
        detail = r.json()["detail"]
        assert r.status_code == 403 and "viewer" in detail and "editor token" in detail
        assert "second factor" not in detail and "one-time code" not in detail


# --- two replicas -----------------------------------------------------------------------------


def replica_config(alice: str) -> str:
    """The one routes.yaml both replicas read; each takes its port and directory from its environment."""
    return f"""\
gateway:
  admin:
    listen: "127.0.0.1:${{ADMIN_PORT}}"
    session_key: "${{ADMIN_SESSION_KEY}}"
    tokens:
      - {{name: alice, sha256: "{hash_token(alice)}", role: editor}}
      - {{name: victor, sha256: "{hash_token(VIEWER)}", role: viewer}}
  spool: {{path: "${{GW_REPLICA_DIR}}/spool.db", min_free_bytes: 0}}
  state_dir: "${{GW_REPLICA_DIR}}/state"
  drain: 2s
connectors:
  console: {{type: log}}
routes: []
"""


def replica(tmp_path: Path, name: str, routes: Path) -> GatewayProcess:
    port, directory = free_port(), tmp_path / name
    directory.mkdir()
    command = ["env", f"ADMIN_PORT={port}", f"ADMIN_SESSION_KEY={SESSION_KEY}", f"GW_REPLICA_DIR={directory}",
               GATEWAY, "run", "--config", str(routes)]
    return GatewayProcess(routes, f"127.0.0.1:{port}", tmp_path / f"{name}.log", command=command)


@pytest.mark.timeout(120)
async def test_two_replicas_share_sessions_and_a_rotation_ends_them_on_both(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(replica_config(EDITOR))
    a, b = replica(tmp_path, "a", routes), replica(tmp_path, "b", routes)
    try:
        await asyncio.gather(a.start(timeout=60), b.start(timeout=60))
        async with httpx.AsyncClient(base_url=f"http://{a.admin}", timeout=10) as ca, \
                httpx.AsyncClient(base_url=f"http://{b.admin}", timeout=10) as cb:
            session = await login(ca, EDITOR)
            for c in (ca, cb):
                r = await c.get("/api/whoami", headers=bearer(session))
                assert r.status_code == 200 and r.json() == {"name": "alice", "role": "editor", "via": "session"}
            other = await login(cb, EDITOR)
            assert await whoami(ca, other) == 200
            assert (await ca.post("/api/logout", headers=bearer(other))).status_code == 200
            assert await whoami(ca, other) == 401

            # Rotate alice's token in the file both replicas read, as a ConfigMap update would.
            rotated = replica_config("editor-rotated-token")
            tmp = routes.with_suffix(".new")
            tmp.write_text(rotated)
            os.replace(tmp, routes)

            async def reloaded(c: httpx.AsyncClient) -> bool:
                r = await c.get("/api/routes", headers={**bearer(VIEWER), "Accept": "application/yaml"})
                return r.status_code == 200 and r.text == rotated

            for c in (ca, cb):
                await wait_for(lambda c=c: reloaded(c), timeout=30, interval=0.5, what="the hot reload")
                assert await whoami(c, session) == 401, f"the rotated token's session must end on {c.base_url}"
                assert await whoami(c, "editor-rotated-token") == 200
    finally:
        await asyncio.gather(a.ensure_stopped(), b.ensure_stopped())
