"""The flow picture, dead letters and the editor's guards, in a real headless Chromium against a
real `gateway run` process and a real HTTP peer:

- the picture shows every source, route and target, the storm controls as badges and connector
  health; its counts move when messages flow; a click on a route selects its lines;
- a pending edit shows its added, changed and removed routes before Apply;
- a dead letter is found with the filters, inspected (its last answer) and replayed from the page;
- a rollback from a History list loaded before another editor's change is refused, so that
  change stays; a validation answer that arrives late never shows against newer text;
- nothing of the app shows before login (a token with a second factor is used);
- an invalid hand edit of routes.yaml on disk is shown with its lines and replaced from the page.

Screenshots go to test-output/flow/; with GATEWAY_DOCS_SCREENSHOTS=1 those of the picture also
replace the ones in docs/images/ that the docs show (a test run never changes the repository).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin import TOTP_STEP, totp_code
from tests.e2e.browser import until
from tests.gwtest import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "docs" / "images" if os.environ.get("GATEWAY_DOCS_SCREENSHOTS") == "1" else None
SHOTS = ROOT / "test-output" / "flow"
TOKEN = "e2e-flow-editor-token-0123456789"
OTHER = "e2e-flow-second-editor-0123456789"
TOTP = base64.b32encode(b"flow-e2e-totp-secret").decode().rstrip("=")


def config(tmp: Path, api: int, admin: int, hook: int, closed: int) -> str:
    sha = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    return f"""\
# routes for the flow picture test
gateway:
  admin:
    listen: "127.0.0.1:{admin}"
    tokens:
      - {{name: erin, sha256: "{sha(TOKEN)}", role: editor, totp: "${{E2E_TOTP}}"}}
      - {{name: olga, sha256: "{sha(OTHER)}", role: editor}}
  spool: {{path: "{tmp / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp / 'state'}"
  drain: 2s
connectors:
  api:
    type: rest
    listen: "127.0.0.1:{api}"
    auth: {{type: none}}
  events-file:
    type: file
    path: "{tmp / 'events.jsonl'}"
  hooks:
    type: rest
    base_url: "http://127.0.0.1:{hook}"
  console:
    type: log
  bus:
    type: amqp
    url: "amqp://127.0.0.1:{closed}/"
    username: guest
    password: "${{E2E_AMQP_PASSWORD:-guest}}"
routes:
  - name: events-to-file
    from: api
    match: {{subject: "/events/**"}}
    to:
      - connector: events-file
  - name: alerts-to-hook
    from: api
    match: {{subject: "/alerts/**"}}
    dedupe: {{key: "{{{{ data.id }}}}", window: 1m}}
    throttle: {{limit: 100, window: 1m}}
    on_failure: {{retry: {{attempts: 1}}}}
    to:
      - connector: hooks
        path: /hook
  - name: boiler-alarm
    from: api
    match: {{subject: "/boilers/**"}}
    alarm: {{raise_when: "data.temperature > 90", clear_when: "data.temperature < 80"}}
    digest: {{window: 5m}}
    to:
      - connector: console
  - name: ops-to-bus
    from: api
    match: {{subject: "/ops/**"}}
    to:
      - connector: bus
        exchange: ops
"""


class Hook(http.server.BaseHTTPRequestHandler):
    """The peer of the hooks connector: refuses with 400 until ``accept`` is set."""

    accept = False
    received: list[bytes] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if Hook.accept:
            Hook.received.append(body)
            self.send_response(200)
            self.end_headers()
            return
        answer = b'{"error": "hook says no: unknown alert kind"}'
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[int]:
    Hook.accept, Hook.received = False, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def gateway(tmp_path: Path, hook: int) -> Iterator[tuple[str, int, Path]]:
    api, admin = free_port(), free_port()
    path = tmp_path / "routes.yaml"
    path.write_text(config(tmp_path, api, admin, hook, free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path)], cwd=ROOT,
                            env={**os.environ, "E2E_TOTP": TOTP},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{admin}"
    try:
        end = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise AssertionError("gateway did not answer /healthz in 30 s")
            time.sleep(0.1)
        yield base, api, path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Page:
    """The admin page in the browser, with the few moves every step here makes."""

    def __init__(self, driver: Any, base: str):
        from selenium.webdriver.common.by import By

        self.d, self.base, self.by = driver, base, By

    def css(self, sel: str) -> Any:
        return self.d.find_element(self.by.CSS_SELECTOR, sel)

    def all(self, sel: str) -> list[Any]:
        return list(self.d.find_elements(self.by.CSS_SELECTOR, sel))

    def shown(self, sel: str) -> bool:
        found = self.all(sel)
        return bool(found) and found[0].is_displayed()

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def tab(self, name: str) -> None:
        self.css(f'button[data-tab="{name}"]').click()

    def editor_text(self) -> str:
        return str(self.js("return document.getElementById('editor').value"))

    def set_editor(self, text: str) -> None:
        self.js("const t = document.getElementById('editor'); t.value = arguments[0];"
                "t.dispatchEvent(new Event('input'));", text)

    def caret_line(self) -> int:
        return int(self.js("const t = document.getElementById('editor');"
                           "return t.value.slice(0, t.selectionStart).split('\\n').length"))

    def status(self) -> str:
        return str(self.css("#status").text)

    def shot(self, name: str, sel: str | None = None, docs: bool = False) -> None:
        folder = IMAGES if docs and IMAGES is not None else SHOTS
        folder.mkdir(parents=True, exist_ok=True)
        if sel:
            self.css(sel).screenshot(str(folder / f"{name}.png"))
        else:
            self.d.save_screenshot(str(folder / f"{name}.png"))

    def login(self) -> None:
        self.d.get(self.base + "/ui/")
        self.css("#token").send_keys(TOKEN)
        self.css("#login-btn").click()
        until("the one-time code field", lambda: self.shown("#otp-label"))
        self.css("#otp").send_keys(totp_code(TOTP, int(time.time() // TOTP_STEP)))
        self.css("#login-btn").click()
        until("the app", lambda: self.shown("#app"))


def line_of(text: str, needle: str) -> int:
    return text.splitlines().index(needle) + 1


def test_the_flow_picture_moves_with_the_messages_and_opens_a_route_at_its_lines(
    gateway: tuple[str, int, Path], browser: Any,
) -> None:
    base, api, path = gateway
    p = Page(browser, base)
    p.d.get(base + "/ui/")
    # Before login only the login form shows: no tabs, no "Log out", no code field.
    until("the login form", lambda: p.shown("#token"))
    assert not p.shown("#tabs") and not p.shown("#logout-btn") and not p.shown("#otp-label")
    p.login()

    # Every source, route and target, with storm badges and health.
    route = lambda name: f'#flow g.route[data-route="{name}"]'  # noqa: E731
    until("the picture", lambda: p.all(route("ops-to-bus")))
    for name in ("events-to-file", "alerts-to-hook", "boiler-alarm"):
        assert p.all(route(name)), name
    assert p.all('#flow g.connector[data-connector="api"][data-side="source"]')
    for name in ("events-file", "hooks", "console", "bus"):
        assert p.all(f'#flow g.connector[data-connector="{name}"][data-side="target"]'), name
    badges = {b.get_attribute("data-storm") for b in p.all(route("alerts-to-hook") + " g.storm")}
    assert badges == {"dedupe", "throttle"}
    badges = {b.get_attribute("data-storm") for b in p.all(route("boiler-alarm") + " g.storm")}
    assert badges == {"alarm", "digest"}
    assert len(p.all('#flow path.edge[data-from="api"]')) == 4
    until("the unreachable broker shown down",
          lambda: "health-down" in p.css('#flow g.connector[data-connector="bus"]').get_attribute("class"), 30)
    until("the file sink shown up",
          lambda: "health-up" in p.css('#flow g.connector[data-connector="events-file"]').get_attribute("class"))

    # Messages flow: the route's count and its edge's label move, with a rate.
    for i in range(5):
        assert httpx.post(f"http://127.0.0.1:{api}/events/{i}", json={"n": i}).status_code == 202
    until("5 matched on the route", lambda: "5 matched" in p.css(route("events-to-file")).text)
    label = '#flow g.edge-label[data-from="events-to-file"][data-to="events-file"]'
    until("5 sent on the edge", lambda: p.css(label).text.startswith("5 sent"))
    assert "/s" in p.css(label).text or "/s" in p.css(route("events-to-file")).text
    stop = threading.Event()

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            httpx.post(f"http://127.0.0.1:{api}/events/t{i}", json={"n": i})
            i += 1
            time.sleep(0.2)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        until("a rate on the edge", lambda: "/s" in p.css(label).text)
        until("the counter to keep moving", lambda: int(p.css(label).text.split()[0]) >= 10, 20)
        p.js("window.scrollTo(0, 0)")
        p.shot("flow-running", "#flow", docs=True)
        p.shot("flow-page", docs=True)
    finally:
        stop.set()
        feeder.join()

    # A click on a route lands on its lines in the editor.
    p.css(route("alerts-to-hook")).click()
    until("the editor", lambda: p.shown("#editor"))
    text = path.read_text()
    assert p.editor_text() == text
    until("the route's first line", lambda: p.caret_line() == line_of(text, "  - name: alerts-to-hook"))
    selected = p.js("const t = document.getElementById('editor');"
                    "return t.value.slice(t.selectionStart, t.selectionEnd)")
    assert selected.startswith("  - name: alerts-to-hook") and "path: /hook" in selected
    assert "boiler-alarm" not in selected

    # A pending edit: the picture of the editor's text marks what it adds, changes and removes.
    edited = (text.replace("      - connector: console\n", "      - connector: events-file\n")
              .replace("  - name: ops-to-bus\n    from: api\n    match: {subject: \"/ops/**\"}\n    to:\n"
                       "      - connector: bus\n        exchange: ops\n", "")
              + "  - name: audit-copy\n    from: api\n    continue: true\n    to:\n      - connector: console\n")
    assert "ops-to-bus" not in edited
    p.set_editor(edited)
    cand = lambda name: f'#candidate-flow g.route[data-route="{name}"]'  # noqa: E731
    until("the added route", lambda: "added" in p.css(cand("audit-copy")).get_attribute("class"))
    assert "changed" in p.css(cand("boiler-alarm")).get_attribute("class")
    assert "removed" in p.css(cand("ops-to-bus")).get_attribute("class")
    assert p.css(cand("events-to-file")).get_attribute("class").strip() == "route"
    assert "1 added, 1 changed, 1 removed" in p.css("#candidate-summary").text
    p.js("document.getElementById('candidate-flow').scrollIntoView()")
    p.shot("flow-pending-edit", "#candidate-flow", docs=True)
    # A click on the added route selects its lines in the edited text.
    p.css(cand("audit-copy")).click()
    until("the new route's line", lambda: p.caret_line() == line_of(edited, "  - name: audit-copy"))
    assert path.read_text() == text  # nothing applied
    p.tab("overview")
    until("the note about the pending edit", lambda: "1 added, 1 changed, 1 removed" in p.css("#pending-note").text)


def test_dead_letters_are_found_inspected_and_replayed_from_the_page(
    gateway: tuple[str, int, Path], browser: Any,
) -> None:
    base, api, _ = gateway
    p = Page(browser, base)
    p.login()
    for i in range(3):
        assert httpx.post(f"http://127.0.0.1:{api}/alerts/a{i}", json={"id": f"a{i}"}).status_code == 202
    assert httpx.post(f"http://127.0.0.1:{api}/events/e", json={"n": 1}).status_code == 202
    until("3 dead-lettered on the picture",
          lambda: "3 dead-lettered" in p.css('#flow g.route[data-route="alerts-to-hook"]').text, 30)
    until("the dead-letter count on the tab", lambda: p.css("#dl-count").text == "3", 15)
    p.tab("deadletters")
    until("the list", lambda: len(p.all("#dl-table tr.dl-row")) == 3)

    # Filters: by route and reason (none match another route; all three this one).
    p.js("document.getElementById('dl-route').value = 'events-to-file'")
    p.css("#dl-search-btn").click()
    until("an empty list", lambda: "No dead letters" in p.css("#dl-table").text)
    p.js("document.getElementById('dl-route').value = 'alerts-to-hook'")
    p.css("#dl-search-btn").click()
    until("the route's dead letters", lambda: len(p.all("#dl-table tr.dl-row")) == 3)
    assert "3 dead letter(s) match the filter" in p.css("#dl-total").text

    # Inspect one: the envelope and the peer's answer.
    p.all("#dl-table tr.dl-row")[0].find_elements(p.by.CSS_SELECTOR, "td")[3].click()
    until("the detail", lambda: p.shown("#dl-detail") and "HTTP 400" in p.css("#dl-detail").text)
    detail = p.css("#dl-detail").text
    assert "alerts-to-hook → hooks" in detail and "/alerts/a" in detail and '"id": "a' in detail
    p.shot("dead-letters", docs=True)

    # The peer is fixed; two are replayed as a selection, then the last one alone.
    Hook.accept = True
    boxes = p.all("#dl-table input.dl-pick")
    boxes[0].click()
    boxes[1].click()
    until("two selected", lambda: p.css("#dl-replay-btn").text == "Replay 2 selected")
    p.css("#dl-replay-btn").click()
    until("replayed", lambda: "Replayed 2 dead letter(s)" in p.status())
    until("one left", lambda: len(p.all("#dl-table tr.dl-row")) == 1)
    until("the peer got two", lambda: len(Hook.received) == 2, 20)
    p.css("#dl-table tr.dl-row td:nth-child(3)").click()
    until("its detail", lambda: p.all("#dl-detail button.dl-replay-one"))
    p.css("#dl-detail button.dl-replay-one").click()
    until("the peer got all three", lambda: len(Hook.received) == 3, 20)
    until("none left", lambda: "No dead letters" in p.css("#dl-table").text)
    assert sorted(json.loads(b)["id"] for b in Hook.received) == ["a0", "a1", "a2"]


def test_two_editors_racing_on_rollback_never_lose_a_change(gateway: tuple[str, int, Path], browser: Any) -> None:
    base, _, path = gateway
    p = Page(browser, base)
    p.login()
    start = until("the version", lambda: p.css("#version").text.strip("–") or None)
    p.tab("editor")
    until("the running text", p.editor_text)
    first = path.read_text().replace("exchange: ops", "exchange: ops-v2")
    p.set_editor(first)
    until("valid", lambda: "valid (" in p.css("#validity").text)
    p.css("#apply-btn").click()
    status = until("applied", lambda: "Applied version" in p.status() and p.status())
    v2 = status.split("Applied version ")[1].split()[0]

    # Erin opens the History list; then Olga applies a change through the API.
    p.tab("history")
    until("the history", lambda: p.all(f'button.history-rollback[data-version="{start}"]'))
    olga = {"Authorization": f"Bearer {OTHER}"}
    theirs = path.read_text().replace("exchange: ops-v2", "exchange: ops-olga")
    r = httpx.put(f"{base}/api/routes", content=theirs, headers={**olga, "Content-Type": "application/yaml",
                                                                  "If-Match": f'"{v2}"'})
    assert r.status_code == 200, r.text
    until("the page to poll the new version", lambda: p.css("#version").text == r.json()["version"])
    # Erin rolls back from the list she loaded before Olga's change: refused, Olga's change stays.
    p.css(f'button.history-rollback[data-version="{start}"]').click()
    until("the refusal", lambda: "was applied after this list was loaded" in p.status())
    assert path.read_text() == theirs
    # With the list reloaded she sees Olga's version and can roll back knowingly.
    until("Olga's version in the list", lambda: p.all(f'tr[data-version="{r.json()["version"]}"]'))
    p.css(f'button.history-rollback[data-version="{start}"]').click()
    until("rolled back", lambda: f"version {start} is running" in p.status())


def test_a_late_validation_answer_never_shows_against_newer_text(
    gateway: tuple[str, int, Path], browser: Any,
) -> None:
    base, _, _ = gateway
    p = Page(browser, base)
    p.login()
    p.tab("editor")
    text = until("the running text", p.editor_text)
    # The network answers the validation of text marked SLOW two seconds late.
    p.js("""const real = window.fetch;
      window.fetch = async (url, init) => {
        const resp = await real(url, init);
        if (String(url).includes('/validate') && init && String(init.body).includes('# SLOW'))
          await new Promise((ok) => setTimeout(ok, 2000));
        return resp; };""")
    p.set_editor(text.replace("- connector: events-file", "- connector: events-fil") + "# SLOW\n")
    time.sleep(0.8)  # its validation is on the way
    p.set_editor(text + "# fixed\n")
    until("valid", lambda: "valid (" in p.css("#validity").text)
    time.sleep(2.5)  # the late answer about the broken text has arrived by now
    assert "valid (" in p.css("#validity").text
    assert p.css("#errors").text == ""


def test_an_invalid_hand_edit_on_disk_is_shown_and_replaced_from_the_page(
    gateway: tuple[str, int, Path], browser: Any,
) -> None:
    base, _, path = gateway
    p = Page(browser, base)
    p.login()
    p.tab("editor")
    running = until("the running text", p.editor_text)
    broken = running.replace("    to:\n      - connector: console\n", "    to:\n      - connector: consol\n")
    path.write_text(broken)
    bad_line = line_of(broken, "      - connector: consol")
    # An edit is refused while the file is not the running version: the page shows why and where.
    p.set_editor(running.replace("exchange: ops", "exchange: ops2"))
    until("valid", lambda: "valid (" in p.css("#validity").text)
    p.css("#apply-btn").click()
    until("the file pane", lambda: p.shown("#file-pane"))
    assert f"line {bad_line}:" in p.css("#file-errors").text and "consol" in p.css("#file-errors").text
    assert "routes.yaml on disk" in p.status()
    p.shot("file-on-disk", "#tab-editor")
    # Replace the file with the running version: then the edit applies.
    p.css("#file-running-btn").click()
    until("restored", lambda: "holds the running version" in p.status())
    assert path.read_text() == running
    until("the pane gone", lambda: not p.shown("#file-pane"))
    p.set_editor(running.replace("exchange: ops", "exchange: ops2"))
    until("valid", lambda: "valid (" in p.css("#validity").text)
    p.css("#apply-btn").click()
    until("applied", lambda: "Applied version" in p.status())
    assert "exchange: ops2" in path.read_text()
