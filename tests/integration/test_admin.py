"""The admin API over real sockets against a real in-process gateway: auth, reads, validated and
atomic writes with If-Match, conflicts, dry runs, history, diff, rollback, the editor's files."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from pydantic import SecretStr

from gateway.admin import hash_token
from gateway.config.models import AdminToken
from gateway.runtime import Runtime
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration

EDITOR, VIEWER = "editor-secret-token", "viewer-secret-token"


def config(tmp_path: Path, api: int, admin: int) -> str:
    return f"""\
# routes for the admin API tests
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens:
      - {{name: alice, sha256: "{hash_token(EDITOR)}", role: editor}}
      - {{name: victor, sha256: "{hash_token(VIEWER)}", role: viewer}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  drain: 2s
connectors:
  api:                       # the REST front door
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
  out:
    type: file
    path: "{tmp_path / 'out.jsonl'}"   # where events land
routes:
  - name: events            # all events
    from: api
    match: {{subject: "/events/**"}}
    to:
      - connector: out
        headers: {{x-tag: "{{{{ data.tag }}}}"}}
"""


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient, int]]:
    api, admin = free_port(), free_port()
    async with running_gateway(tmp_path, config(tmp_path, api, admin)) as rt:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}", timeout=10) as client:
            yield rt, client, api


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_yaml(client: httpx.AsyncClient) -> tuple[str, str]:
    r = await client.get("/api/routes", headers={**bearer(VIEWER), "Accept": "application/yaml"})
    assert r.status_code == 200
    return r.text, r.headers["etag"]


async def put_yaml(client: httpx.AsyncClient, text: str, etag: str | None, token: str = EDITOR) -> httpx.Response:
    headers = {**bearer(token), "Content-Type": "application/yaml"}
    if etag is not None:
        headers["If-Match"] = etag
    return await client.put("/api/routes", content=text, headers=headers)


def metric(rt: Runtime, outcome: str) -> float:
    return rt.metrics.registry.get_sample_value("gateway_config_reloads_total", {"outcome": outcome}) or 0.0


async def test_auth_is_required_and_roles_are_enforced(gw: Any) -> None:
    rt, client, _ = gw
    assert (await client.get("/api/config")).status_code == 401
    assert (await client.get("/api/config", headers={"Authorization": "Basic eDp5"})).status_code == 401
    assert (await client.get("/api/config", headers=bearer("wrong"))).status_code == 401
    assert (await client.get("/api/config", headers=bearer(VIEWER))).status_code == 200
    text, etag = await get_yaml(client)
    r = await put_yaml(client, text.replace("all events", "changed"), etag, token=VIEWER)
    assert r.status_code == 403 and "editor" in r.json()["detail"]
    assert (await client.post("/api/reload", headers=bearer(VIEWER))).status_code == 403
    # Probes stay open.
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    assert rt.config.source.text == text


async def test_login_sessions_and_logout(gw: Any) -> None:
    _, client, _ = gw
    assert (await client.post("/api/login", json={"token": "nope"})).status_code == 401
    assert (await client.post("/api/login", json={})).status_code == 422
    r = await client.post("/api/login", json={"token": EDITOR})
    assert r.status_code == 200
    session = r.json()["session"]
    who = (await client.get("/api/whoami", headers=bearer(session))).json()
    assert who == {"name": "alice", "role": "editor", "via": "session"}
    assert (await client.post("/api/logout", headers=bearer(session))).status_code == 200
    assert (await client.get("/api/whoami", headers=bearer(session))).status_code == 401


async def test_totp_second_factor_for_editors(gw: Any) -> None:
    rt, client, _ = gw
    secret = pyotp.random_base32()

    # routes.yaml will say `totp: "${ADMIN_TOTP}"` once AdminToken has the field; the test puts a
    # token with that attribute in place the way the loader would.
    class TotpToken(AdminToken):
        totp: SecretStr | None = None

    token = TotpToken(name="tess", sha256=hash_token("tess-token"), role="editor", totp=SecretStr(secret))
    admin = rt.config.model.gateway.admin.model_copy(update={"tokens": [*rt.config.model.gateway.admin.tokens, token]})
    model = rt.config.model.model_copy(update={"gateway": rt.config.model.gateway.model_copy(update={"admin": admin})})
    rt.config = dataclasses.replace(rt.config, model=model)

    # The token alone reads but cannot write.
    assert (await client.get("/api/whoami", headers=bearer("tess-token"))).json()["role"] == "viewer"
    r = await client.post("/api/reload", headers=bearer("tess-token"))
    assert r.status_code == 403 and "one-time code" in r.json()["detail"]
    r = await client.post("/api/login", json={"token": "tess-token"})
    assert r.status_code == 401 and r.json()["otp_required"] is True
    r = await client.post("/api/login", json={"token": "tess-token", "otp": "000000"})
    assert r.status_code == 401
    code = pyotp.TOTP(secret).now()
    r = await client.post("/api/login", json={"token": "tess-token", "otp": code})
    assert r.status_code == 200 and r.json()["role"] == "editor"
    session = r.json()["session"]
    assert (await client.get("/api/whoami", headers=bearer(session))).json()["role"] == "editor"
    r = await client.post("/api/login", json={"token": "tess-token", "otp": code})
    assert r.status_code == 401, "a one-time code works once"


async def test_get_routes_yaml_and_json(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    assert etag == f'"{rt.config.version}"' and text == rt.config.source.text
    r = await client.get("/api/routes", headers=bearer(VIEWER))
    body = r.json()
    assert r.headers["etag"] == etag and body["version"] == rt.config.version
    assert body["routes"][0]["name"] == "events" and body["routes"][0]["targets"] == ["out"]
    assert body["document"]["routes"][0]["match"] == {"subject": "/events/**"}
    cfg = (await client.get("/api/config", headers=bearer(VIEWER))).json()
    assert cfg["version"] == rt.config.version and cfg["last_reload"]["outcome"] == "startup"
    assert cfg["history"][0]["by"] == "startup"


async def test_put_validates_saves_atomically_and_applies(gw: Any, caplog: pytest.LogCaptureFixture) -> None:
    rt, client, api = gw
    path = Path(rt.config_path)
    text, etag = await get_yaml(client)
    out_before = rt.slots["out"].connector
    new_text = text.replace('"/events/**"', '"/orders/**"')
    caplog.set_level(logging.INFO, logger="gateway.reload")
    r = await put_yaml(client, new_text, etag)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["outcome"] == "applied" and result["restarted"] == [] and result["by"] == "alice"
    assert r.headers["etag"] == f'"{result["version"]}"'
    assert path.read_text() == new_text, "the file on disk is the new version, comments included"
    assert rt.config.version == result["version"]
    assert rt.slots["out"].connector is out_before, "an unchanged connector is not restarted"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    applied = [r for r in caplog.records if r.getMessage() == "config.applied"]
    assert applied and applied[-1].fields["by"] == "alice"  # type: ignore[attr-defined]
    # The new routes take effect.
    async with httpx.AsyncClient() as c:
        assert (await c.post(f"http://127.0.0.1:{api}/orders/1", json={"tag": "a"})).status_code == 202
        assert (await c.post(f"http://127.0.0.1:{api}/events/1", json={"tag": "a"})).status_code == 404
    # The same text again changes nothing.
    r = await put_yaml(client, new_text, r.headers["etag"])
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged"


async def test_put_needs_if_match_and_refuses_a_stale_base(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    assert (await put_yaml(client, text + "\n", None)).status_code == 428
    r = await put_yaml(client, text.replace("all events", "first"), etag)
    assert r.status_code == 200
    live = rt.config.version
    r = await put_yaml(client, text.replace("all events", "second, from the old version"), etag)
    assert r.status_code == 409
    assert r.json()["running"] == live and "based on" in r.json()["detail"]
    assert rt.config.version == live and "second" not in Path(rt.config_path).read_text()


async def test_concurrent_edits_one_wins_one_gets_409(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    a, b = await asyncio.gather(put_yaml(client, text.replace("all events", "edit A"), etag),
                                put_yaml(client, text.replace("all events", "edit B"), etag))
    assert sorted([a.status_code, b.status_code]) == [200, 409]
    winner = "edit A" if a.status_code == 200 else "edit B"
    assert winner in Path(rt.config_path).read_text() and winner in rt.config.source.text


async def test_put_refuses_when_the_file_on_disk_has_unapplied_changes(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    Path(rt.config_path).write_text(text + "# a hand edit not yet reloaded\n")
    r = await put_yaml(client, text.replace("all events", "from the editor"), etag)
    assert r.status_code == 409 and "not live" in r.json()["detail"]
    assert "hand edit" in Path(rt.config_path).read_text()


async def test_invalid_config_is_refused_with_lines_and_counted(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    before, invalid_before = rt.config.version, metric(rt, "invalid")
    broken = text.replace("- connector: out", "- connector: outt")
    r = await put_yaml(client, broken, etag)
    assert r.status_code == 422
    errors = r.json()["errors"]
    line = broken.splitlines().index("      - connector: outt") + 1
    assert errors == [{"file": rt.config_path, "line": line, "path": "routes[0].to[0].connector",
                       "message": "unknown connector 'outt' (did you mean 'out'?)"}]
    assert rt.config.version == before and Path(rt.config_path).read_text() == text
    assert metric(rt, "invalid") == invalid_before + 1
    cfg = (await client.get("/api/config", headers=bearer(VIEWER))).json()
    assert cfg["last_reload"]["outcome"] == "invalid" and cfg["last_reload"]["by"] == "alice"
    r = await put_yaml(client, "routes: [unclosed\n", etag)
    assert r.status_code == 422 and r.json()["errors"][0]["line"] == 1  # the line of the unclosed '['


async def test_json_put_merges_round_trip_keeping_comments(gw: Any) -> None:
    rt, client, _ = gw
    doc = (await client.get("/api/routes", headers=bearer(VIEWER))).json()["document"]
    routes = doc["routes"]
    routes[0]["match"]["subject"] = "/json/**"
    r = await client.put("/api/routes", json={"routes": routes},
                         headers={**bearer(EDITOR), "If-Match": f'"{rt.config.version}"'})
    assert r.status_code == 200, r.text
    saved = Path(rt.config_path).read_text()
    assert "# the REST front door" in saved and "# all events" in saved and "/json/**" in saved
    assert rt.config.router.routes[0].subjects == ["/json/**"]
    r = await client.put("/api/routes", json={"bogus": 1}, headers={**bearer(EDITOR), "If-Match": r.headers["etag"]})
    assert r.status_code == 422


async def test_validate_returns_errors_and_a_diff(gw: Any) -> None:
    rt, client, _ = gw
    text, _ = await get_yaml(client)
    r = await client.post("/api/routes/validate", content=text.replace("from: api", "from: apii"),
                          headers={**bearer(VIEWER), "Content-Type": "application/yaml"})
    body = r.json()
    assert r.status_code == 200 and body["valid"] is False
    line = text.count("\n", 0, text.index("from: api")) + 1
    assert body["errors"][0]["path"] == "routes[0].from" and body["errors"][0]["line"] == line
    assert "-    from: api\n+    from: apii\n" in body["diff"]
    r = await client.post("/api/routes/validate", json={"yaml": text}, headers=bearer(VIEWER))
    assert r.json()["valid"] is True and r.json()["diff"] == "" and r.json()["version"] == rt.config.version
    big = "#" * (rt.config.model.gateway.admin.max_config_bytes + 1)
    r = await client.post("/api/routes/validate", content=big, headers={**bearer(VIEWER), "Content-Type": "text/plain"})
    assert r.status_code == 413


async def test_dry_run_against_a_candidate_sends_nothing(gw: Any, tmp_path: Path) -> None:
    rt, client, _ = gw
    text, _ = await get_yaml(client)
    candidate = text.replace('x-tag: "{{ data.tag }}"', 'x-tag: "tagged {{ data.tag }}"')
    r = await client.post("/api/routes/test", headers=bearer(VIEWER), json={
        "config": candidate,
        "messages": [{"source": "api", "subject": "/events/a", "json": {"tag": "t1"}},
                     "source: api\nsubject: /other\nbody: hi\n",
                     {"source": "api", "subject": "/events/b", "json": {"no_tag": 1}}]})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert r.json()["sent"] is False and r.json()["version"] != rt.config.version
    assert res[0]["routes"][0]["route"] == "events"
    assert res[0]["routes"][0]["targets"][0]["headers"]["x-tag"] == "tagged t1"
    assert res[1]["unmatched"] is True and res[1]["unmatched_policy"] == "reject"
    assert "missing value" in res[2]["routes"][0]["targets"][0]["error"]
    assert not (tmp_path / "out.jsonl").exists(), "a dry run sends nothing"
    # Against the running config when none is given; route tests too.
    r = await client.post("/api/routes/test", headers=bearer(VIEWER), json={"tests": [
        {"name": "events go to the file", "message": {"source": "api", "subject": "/events/x", "json": {"tag": "q"}},
         "expect": {"routes": ["events"], "targets": [{"connector": "out", "headers": {"x-tag": "q"}}]}},
        {"name": "wrong expectation", "message": {"source": "api", "subject": "/x"},
         "expect": {"routes": ["events"]}}]})
    tests = r.json()["tests"]
    assert [t["ok"] for t in tests] == [True, False]
    # Failures: invalid candidate, bad sample.
    r = await client.post("/api/routes/test", headers=bearer(VIEWER), json={"config": "routes: 1\n", "message": {}})
    assert r.status_code == 422 and r.json()["errors"]
    r = await client.post("/api/routes/test", headers=bearer(VIEWER), json={"message": {"source": "nope"}})
    assert r.status_code == 422 and "nope" in r.json()["detail"]
    r = await client.post("/api/routes/test", headers=bearer(VIEWER), json={"message": "a: [b"})
    assert r.status_code == 422


async def test_history_diff_and_rollback(gw: Any) -> None:
    rt, client, _ = gw
    text, etag = await get_yaml(client)
    v1 = rt.config.version
    r = await put_yaml(client, text.replace("all events", "version two"), etag)
    v2 = r.json()["version"]
    hist = (await client.get("/api/history", headers=bearer(VIEWER))).json()
    assert [(e["version"], e["by"]) for e in hist["entries"]][:2] == [(v2, "alice"), (v1, "startup")]
    d = (await client.get(f"/api/history/diff?from={v1}&to={v2}", headers=bearer(VIEWER))).json()["diff"]
    assert "-  - name: events            # all events\n" in d and "+  - name: events            # version two\n" in d
    old = await client.get(f"/api/history/{v1}", headers=bearer(VIEWER))
    assert old.text == text
    assert (await client.get("/api/history/ffffffffffff", headers=bearer(VIEWER))).status_code == 404
    assert (await client.get("/api/history/..%2f..%2fetc", headers=bearer(VIEWER))).status_code == 404
    # Rollback: If-Match needed, stale refused, then applied with the old text byte for byte.
    assert (await client.post(f"/api/history/{v1}/rollback", headers=bearer(EDITOR))).status_code == 428
    r = await client.post(f"/api/history/{v1}/rollback", headers={**bearer(EDITOR), "If-Match": f'"{v1}"'})
    assert r.status_code == 409
    assert (await client.post(f"/api/history/{v1}/rollback",
                              headers={**bearer(VIEWER), "If-Match": f'"{v2}"'})).status_code == 403
    r = await client.post(f"/api/history/{v1}/rollback", headers={**bearer(EDITOR), "If-Match": f'"{v2}"'})
    assert r.status_code == 200 and r.json()["version"] == v1
    assert Path(rt.config_path).read_text() == text and rt.config.version == v1
    hist = (await client.get("/api/history", headers=bearer(VIEWER))).json()
    assert hist["entries"][0] == {**hist["entries"][0], "version": v1, "by": "alice", "note": f"rollback to {v1}"}


async def test_reload_endpoint_reads_the_file(gw: Any) -> None:
    rt, client, _ = gw
    path = Path(rt.config_path)
    text = path.read_text()
    path.write_text(text.replace("from: api", "from: nowhere"))
    r = await client.post("/api/reload", headers=bearer(EDITOR))
    assert r.status_code == 422 and r.json()["errors"][0]["path"] == "routes[0].from"
    path.write_text(text.replace("all events", "reloaded"))
    r = await client.post("/api/reload", headers=bearer(EDITOR))
    assert r.status_code == 200 and r.json()["outcome"] == "applied" and "reloaded" in rt.config.source.text
    r = await client.post("/api/reload", headers=bearer(EDITOR))
    assert r.json()["outcome"] == "unchanged"


async def test_overview_live_and_recorded_samples(gw: Any) -> None:
    rt, client, api = gw
    async with httpx.AsyncClient() as c:
        r = await c.post(f"http://127.0.0.1:{api}/events/7", json={"tag": "live"})
        assert r.status_code == 202
        env_id = r.json()["id"]
        assert (await c.post(f"http://127.0.0.1:{api}/nothing", json={})).status_code == 404

    async def delivered() -> bool:
        o = (await client.get("/api/overview", headers=bearer(VIEWER))).json()
        return bool(o["routes"][0]["delivered"] == 1)

    await wait_for(delivered, timeout=10, what="the delivered counter")
    o = (await client.get("/api/overview", headers=bearer(VIEWER))).json()
    assert o["routes"][0]["matched"] == 1 and o["unmatched"] == 1
    assert o["connectors"]["api"]["received"] == 2 and o["connectors"]["out"]["sent"] == 1
    assert o["connectors"]["api"]["up"] is True
    live = (await client.get("/api/live", headers=bearer(VIEWER))).json()
    item = live["routes"]["events"][0]
    assert item["id"] == env_id and item["outcome"] == "accepted" and item["targets"] == ["out"]
    assert item["version"] == rt.config.version
    assert live["routes"][""][0]["outcome"] == "rejected"
    assert (await client.get(f"/api/live/{env_id}/sample", headers=bearer(VIEWER))).status_code == 403
    sample = (await client.get(f"/api/live/{env_id}/sample", headers=bearer(EDITOR))).json()
    assert sample["subject"] == "/events/7" and json.loads(sample["body"]) == {"tag": "live"}
    assert (await client.get("/api/live/nope/sample", headers=bearer(EDITOR))).status_code == 404
    schema = (await client.get("/api/schema", headers=bearer(VIEWER))).json()
    assert "routes" in schema["properties"]


async def test_editor_files_are_served_offline_with_a_strict_policy(gw: Any) -> None:
    _, client, _ = gw
    r = await client.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    for name, ctype in (("", "text/html"), ("app.js", "text/javascript"), ("style.css", "text/css")):
        r = await client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text and "https://" not in r.text, "nothing is loaded from elsewhere"
    for bad in ("../admin.py", "..%2fadmin.py", ".hidden.js", "missing.js", "x.py"):
        assert (await client.get(f"/ui/{bad}")).status_code == 404


async def test_loopback_without_tokens_and_no_config_file(tmp_path: Path) -> None:
    api = free_port()
    yaml_text = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  console: {{type: log}}
routes:
  - {{name: r, from: api, to: [{{connector: console}}]}}
"""
    async with running_gateway(tmp_path, yaml_text) as rt:
        admin = rt.config.model.gateway.admin.listen
        async with httpx.AsyncClient(base_url=f"http://{admin}") as client:
            assert (await client.get("/api/whoami")).json() == {"name": "local", "role": "editor", "via": "loopback"}
            rt.config_path = None
            text = rt.config.source.text
            r = await client.put("/api/routes", content=text + "\n", headers={"If-Match": rt.config.version})
            assert r.status_code == 409 and "without a config file" in r.json()["detail"]


async def test_a_hand_edit_on_disk_is_replaced_through_the_api(gw: Any) -> None:
    rt, client, _ = gw
    path = Path(rt.config_path)
    running = rt.config.source.text
    path.write_text(running.replace("all events", "edited by hand"))
    r = await client.get("/api/config/file", headers=bearer(VIEWER))
    on_disk = r.json()["version"]
    assert r.status_code == 200 and r.json()["differs"] and r.json()["valid"]
    headers = {**bearer(EDITOR), "Content-Type": "application/yaml"}
    r = await client.put("/api/config/file", content=running, headers={**headers, "If-Match": '"stale"'})
    assert r.status_code == 409 and "changed again" in r.json()["detail"]
    r = await client.put("/api/config/file", content=running, headers={**headers, "If-Match": f'"{on_disk}"'})
    assert r.status_code == 200 and r.json() == {"outcome": "restored", "version": rt.config.version}
    assert path.read_text() == running
    # replaced by an edit of its own: validated, saved and applied like any other
    path.write_text(running.replace("all events", "edited by hand again"))
    on_disk = (await client.get("/api/config/file", headers=bearer(VIEWER))).json()["version"]
    edited = running.replace("all events", "edited in the editor")
    r = await client.put("/api/config/file", content=edited, headers={**headers, "If-Match": f'"{on_disk}"'})
    assert r.status_code == 200 and r.json()["outcome"] == "applied", r.text
    assert path.read_text() == edited and rt.config.source.text == edited
