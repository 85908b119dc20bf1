"""The gateway as a user runs it: the real command, real signals, real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.gwtest import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "samples" / "config"


def gateway(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, input=stdin, check=False)


def test_validate_accepts_the_default_routes_yaml() -> None:
    r = gateway("validate", "routes.yaml")
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout


def test_validate_lists_every_problem_with_file_and_line() -> None:
    r = gateway("validate", str(SAMPLES / "bad_expression.yaml"))
    assert r.returncode == 1
    assert "bad_expression.yaml:13: routes[1].match.when: unknown name 'dta' (did you mean 'data'?)" in r.stderr
    assert "3 problem(s) found" in r.stderr
    j = gateway("validate", "--json", str(SAMPLES / "bad_unknown_connector.yaml"))
    assert j.returncode == 1
    body = json.loads(j.stdout)
    assert body["valid"] is False
    assert body["errors"][0]["line"] == 14 and body["errors"][0]["path"] == "routes[2].to[0].connector"


def test_schema_is_json_schema_with_every_connector_kind() -> None:
    r = gateway("schema")
    assert r.returncode == 0
    schema = json.loads(r.stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    refs = schema["properties"]["connectors"]["additionalProperties"]["oneOf"]
    kinds = {ref["$ref"].rsplit("_", 1)[-1] for ref in refs}
    assert {"rest", "file", "log"} <= kinds
    assert "path" in schema["$defs"]["connector_file"]["properties"]


def test_route_tests_pass_and_a_wrong_expectation_fails(tmp_path: Path) -> None:
    ok = gateway("routes", "test", "routes.yaml", "--tests", "examples/route-tests.yaml")
    assert ok.returncode == 0, ok.stdout
    assert "6 passed, 0 failed" in ok.stdout
    bad = tmp_path / "t.yaml"
    bad.write_text("tests:\n  - name: wrong\n    message: {source: api, subject: /events/x, json: {}}\n"
                   "    expect: {routes: [urgent-events-to-log]}\n")
    r = gateway("routes", "test", "routes.yaml", "--tests", str(bad))
    assert r.returncode == 1
    assert "FAIL  wrong" in r.stdout and "expected ['urgent-events-to-log'], got ['events-to-file']" in r.stdout


def test_dry_run_of_a_sample_message_shows_rendered_targets() -> None:
    r = gateway("routes", "test", "routes.yaml", "--message", "examples/sample-message.yaml")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert [x["route"] for x in out["routes"]] == ["urgent-events-to-log", "events-to-file"]
    assert out["routes"][0]["targets"][0]["options"]["message"] == "critical event from /events/boiler"


def test_token_hash() -> None:
    r = gateway("token", "hash", stdin="s3cret\n")
    assert r.returncode == 0 and len(r.stdout.strip()) == 64


def readme_first_curl() -> str:
    text = (ROOT / "README.md").read_text()
    walkthrough = text[text.index("## Walkthrough"):]
    block = walkthrough[walkthrough.index("```sh") + 5:]
    block = block[: block.index("```")].strip()
    assert block.startswith("curl "), block
    return block


def test_run_serves_the_readme_walkthrough_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """The README's first steps, on free ports: POST → 202 → file line → followed with `gateway trace`
    → counted in /metrics."""
    api, admin, smtp = free_port(), free_port(), free_port()
    text = (ROOT / "routes.yaml").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{api}").replace(
        "127.0.0.1:8081", f"127.0.0.1:{admin}").replace("127.0.0.1:2525", f"127.0.0.1:{smtp}").replace(
        "client_id: gateway-plant", f"client_id: gateway-e2e-{os.getpid()}")
    (tmp_path / "templates").mkdir()
    shutil.copy(ROOT / "templates" / "boiler-alert.txt.j2", tmp_path / "templates")
    (tmp_path / "routes.yaml").write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", "routes.yaml"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{admin}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not become ready"
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        # The README's first curl, as written, on this test's port.
        curl = readme_first_curl().replace("localhost:8080", f"127.0.0.1:{api}")
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, check=True)
        head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
        assert head.startswith("HTTP/1.1 202"), done.stdout
        env_id = json.loads(body)["id"]
        out = tmp_path / "var" / "out" / "events.jsonl"
        deadline = time.monotonic() + 10
        while not (out.exists() and env_id in out.read_text()):
            assert time.monotonic() < deadline, "message never reached the file sink"
            time.sleep(0.05)
        # "Follow it": the envelope id of the answer, looked up with `gateway trace` beside the running gateway.
        deadline = time.monotonic() + 10
        while True:
            trace = subprocess.run([sys.executable, "-m", "gateway.cli", "trace", env_id, "--config", "routes.yaml"],
                                   check=False, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)})
            if trace.stdout.count(": ok") == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert trace.returncode == 0, trace.stderr
        assert "received   from api (rest) subject '/events/boiler'  answered accepted" in trace.stdout
        assert "route      urgent-events-to-log: matched" in trace.stdout
        assert "route      events-to-file: matched" in trace.stdout
        assert "attempt 1  events-file via events-to-file (spooled): ok" in trace.stdout, trace.stdout
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics").text
        assert 'gateway_messages_received_total{connector="api"} 1.0' in metrics
        assert 'gateway_messages_delivered_total{connector="events-file",route="events-to-file"} 1.0' in metrics
        health = httpx.get(f"http://127.0.0.1:{admin}/healthz")
        assert health.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    logs = proc.stdout.read() if proc.stdout else ""
    assert code == 0, logs
    events = [json.loads(line)["event"] for line in logs.splitlines() if line.startswith("{")]
    assert "gateway.started" in events and events[-1] == "gateway.stopped"


def test_run_refuses_a_broken_config_with_its_line(tmp_path: Path) -> None:
    r = gateway("run", "--config", str(SAMPLES / "bad_template.yaml"))
    assert r.returncode == 1
    assert "bad_template.yaml:9: routes[0].to[0].body: template syntax error" in r.stderr


def test_run_reports_a_busy_port_and_exits_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = tmp_path / "routes.yaml"
        cfg.write_text(f"gateway: {{admin: {{listen: \"127.0.0.1:{port}\"}}, spool: {{path: {tmp_path}/s.db}}}}\n")
        r = gateway("run", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stdout + r.stderr
