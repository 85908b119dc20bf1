"""The web editor in a real headless Chromium (Debian's) against a real `gateway run` process:
log in, break a route and see the error at its line, fix it, dry-run a sample, see the diff,
apply, see the live counter move, roll back. Screenshots go to test-output/editor/."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import until
from tests.gwtest import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "editor"
TOKEN = "e2e-editor-token-0123456789"


def config(tmp_path: Path, api: int, admin: int) -> str:
    return f"""\
# routes for the editor test
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens:
      - {{name: erin, sha256: "{hashlib.sha256(TOKEN.encode()).hexdigest()}", role: editor}}
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp_path / 'state'}"
  drain: 2s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
  events-file:
    type: file
    path: "{tmp_path / 'events.jsonl'}"
routes:
  - name: events-to-file
    from: api
    match: {{subject: "/events/**"}}
    to:
      - connector: events-file
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    api, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(config(tmp_path, api, admin))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{admin}"
    try:
        end = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise AssertionError("gateway did not get ready in 20 s")
            time.sleep(0.1)
        yield base, api, path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_edit_validate_try_apply_watch_and_roll_back(gateway: tuple[str, int, Path], browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, api, path = gateway
    d = browser
    SHOTS.mkdir(parents=True, exist_ok=True)
    css = lambda sel: d.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    shot = lambda name: d.save_screenshot(str(SHOTS / f"{name}.png"))  # noqa: E731

    def set_editor(text: str) -> None:
        d.execute_script("const t = document.getElementById('editor'); t.value = arguments[0];"
                         "t.dispatchEvent(new Event('input'));", text)

    # Log in: a wrong token is refused, the right one opens the app.
    d.get(base + "/ui/")
    css("#token").send_keys("wrong-token")
    css("#login-btn").click()
    until("the login error", lambda: "invalid token" in css("#login-error").text)
    css("#token").clear()
    css("#token").send_keys(TOKEN)
    css("#login-btn").click()
    until("the app", lambda: css("#app").is_displayed())
    until("the overview", lambda: css('#routes-table tr[data-route="events-to-file"]'))
    running = until("the version", lambda: css("#version").text.strip("–") or None)
    assert "erin (editor)" in css("#who").text
    shot("1-overview")

    # Break a route: the error shows at its line, in the list and in the gutter.
    css('button[data-tab="editor"]').click()
    original = until("the running text", lambda: d.execute_script("return document.getElementById('editor').value"))
    assert original == path.read_text()
    broken = original.replace("- connector: events-file", "- connector: events-fil")
    line = broken.splitlines().index("      - connector: events-fil") + 1
    set_editor(broken)
    until("the error list", lambda: f"line {line}:" in css("#errors").text)
    assert "unknown connector 'events-fil' (did you mean 'events-file'?)" in css("#errors").text
    gutter = css(f'#gutter span[data-line="{line}"]')
    assert "err" in gutter.get_attribute("class") and "events-fil" in gutter.get_attribute("title")
    assert "error" in css("#validity").text
    css("#errors li").click()  # jumps to the line
    assert d.execute_script("const t = document.getElementById('editor');"
                            "return t.value.slice(0, t.selectionStart).split('\\n').length") == line
    shot("2-error-at-line")
    # Apply is refused while it is broken; nothing changes on disk.
    css("#apply-btn").click()
    until("the refusal", lambda: "not applied" in css("#status").text)
    assert path.read_text() == original

    # Fix it, with a change worth trying: tag each event with its severity.
    fixed = original.replace("      - connector: events-file\n",
                             "      - connector: events-file\n        headers: {x-severity: \"{{ data.severity }}\"}\n")
    set_editor(fixed)
    until("valid", lambda: "valid" in css("#validity").text and "error" not in css("#validity").text)
    assert css("#errors").text == ""

    # Schema-driven suggestions: Ctrl+Space inside a new route offers the route's keys.
    set_editor(fixed + "  - name: draft\n    ")
    d.execute_script("const t = document.getElementById('editor'); t.focus();"
                     "t.setSelectionRange(t.value.length, t.value.length);")
    ActionChains(d).key_down(Keys.CONTROL).send_keys(" ").key_up(Keys.CONTROL).perform()
    keys = until("suggestions", lambda: css("#suggest").is_displayed() and css("#suggest").text.split())
    assert {"from", "match", "to", "mode", "on_failure"} <= set(keys)
    shot("2b-suggestions")
    set_editor(fixed)
    until("valid again", lambda: "valid" in css("#validity").text and "error" not in css("#validity").text)

    # Dry run a sample: the rendered header shows; nothing is written.
    d.execute_script("document.getElementById('sample').value = arguments[0];",
                     "source: api\nsubject: /events/boiler\njson: {severity: critical}\n")
    css("#try-btn").click()
    result = until("the dry run", lambda: "events-to-file → events-file" in css("#try-result").text
                   and css("#try-result").text)
    assert '"x-severity":"critical"' in result.replace(" ", "")
    assert not (path.parent / "events.jsonl").exists()
    shot("3-dry-run")

    # The diff against the running version, then apply.
    css("#diff-btn").click()
    until("the diff", lambda: css("#diff-pane").is_displayed() and "+        headers:" in css("#diff").text)
    shot("4-diff")
    css("#apply-btn").click()
    status = until("applied", lambda: "Applied version" in css("#status").text and css("#status").text)
    new_version = status.split("Applied version ")[1].split()[0]
    assert path.read_text() == fixed
    until("the new version in the header", lambda: css("#version").text == new_version)

    # Messages flow; the live counter moves and the live view shows them under the new version.
    css('button[data-tab="overview"]').click()
    before = int(float(css('tr[data-route="events-to-file"] td.matched').text))
    for i in range(3):
        assert httpx.post(f"http://127.0.0.1:{api}/events/{i}", json={"severity": "high"}).status_code == 202
    cell = lambda name: int(float(css(f'tr[data-route="events-to-file"] td.{name}').text))  # noqa: E731
    until("the counter to move", lambda: cell("matched") == before + 3)
    until("delivered", lambda: cell("delivered") >= before + 3)
    shot("5-counter-moved")
    css('button[data-tab="live"]').click()
    until("the live view", lambda: css('#live div[data-route="events-to-file"]').text.count(new_version) == 3)
    shot("6-live")

    # Roll back to the startup version.
    css('button[data-tab="history"]').click()
    rollback = until("the history", lambda: css(f'button.history-rollback[data-version="{running}"]'))
    rollback.click()
    until("rolled back", lambda: f"version {running} is running" in css("#status").text)
    until("the version label", lambda: css("#version").text == running)
    assert path.read_text() == original
    shot("7-rolled-back")
