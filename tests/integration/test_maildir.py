"""The maildir outbound, through a real gateway: mail from swaks and alerts from REST end up as
files any mail client (here: the stdlib ``mailbox`` reader) reads; bad folders and injected
headers go to the dead letters and leave nothing behind."""

from __future__ import annotations

import json
import mailbox
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from connectors.mail_common import parse_message
from gateway.config.loader import load_config
from tests.gwtest import free_port, running_gateway, wait_for
from tests.integration.test_smtp_peers import swaks

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: What the default routes.yaml holds (README, "Mail: SMTP in, SMTP out, Maildir"): SMTP on 2525 into a local Maildir.
DEFAULT_SNIPPET = """
connectors:
  mail-in:
    type: smtp
    listen: "127.0.0.1:2525"
    # Loopback only and no TLS for the local demo. The recipients are the mailboxes it
    # accepts; anything else is refused (550 5.7.1): never an open relay.
    recipients: ["localhost", "example.com"]
  mailbox:
    type: maildir
    path: var/mail/Maildir
routes:
  - name: mail-to-maildir
    from: mail-in
    to:
      - connector: mailbox
"""


def test_the_default_config_has_the_mail_snippet() -> None:
    """The README's `swaks --server 127.0.0.1:2525` works right after `make run`."""
    loaded = load_config(str(ROOT / "routes.yaml"))
    snippet = yaml.safe_load(DEFAULT_SNIPPET)
    for name, raw in snippet["connectors"].items():
        assert loaded.kinds[name].kind == raw["type"]
        assert loaded.connectors[name] == loaded.kinds[name].Config.model_validate(raw)
    route = loaded.router.route_named("mail-to-maildir")
    assert route is not None and route.sources == ["mail-in"] and route.targets[0].connector == "mailbox"


async def test_swaks_into_the_default_maildir(tmp_path: Path) -> None:
    port = free_port()
    snippet = DEFAULT_SNIPPET.replace("127.0.0.1:2525", f"127.0.0.1:{port}").replace(
        "var/mail/Maildir", str(tmp_path / "Maildir"))
    async with running_gateway(tmp_path, snippet):
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--from", "me@laptop.test", "--to", "ops@example.com",
                              "--header", "Subject: hello maildir", "--body", "first line\nsecond line")
        assert rc == 0 and "250 2.0.0 OK" in out, out
        rc, out = await swaks("--server", f"127.0.0.1:{port}", "--from", "me@laptop.test", "--to", "x@elsewhere.test")
        assert rc != 0 and "550 5.7.1" in out
        box = mailbox.Maildir(str(tmp_path / "Maildir"), factory=None, create=False)
        await wait_for(lambda: len(box) == 1, what="one message in the Maildir")
    key, message = next(iter(box.items()))
    assert message["Subject"] == "hello maildir" and message["To"] == "ops@example.com"
    assert message.get_payload().startswith("first line\nsecond line")
    data = (tmp_path / "Maildir" / "new" / key).read_bytes()
    assert b"\r\n" not in data  # Maildir files use local line endings
    assert b"X-Mailer: swaks" in data and b"\n\nfirst line\nsecond line\n" in data


async def test_alerts_are_built_into_folders(tmp_path: Path) -> None:
    rest = free_port()
    config = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{rest}", auth: {{type: none}}, endpoints: [{{path: "/alerts/**"}}]}}
  mailbox: {{type: maildir, path: "{tmp_path / 'Maildir'}", sender: "Gateway <gw@example.com>"}}
routes:
  - name: alerts
    from: api
    to:
      - connector: mailbox
        folder: "Alerts.Site{{{{ data.site }}}}"
        to: ["ops@example.com"]
        subject: "{{{{ data.title }}}} at site {{{{ data.site }}}}"
        text: "Temperature {{{{ data.temperature }}}} °C"
        html: "<p>Temperature <b>{{{{ data.temperature }}}}</b> °C</p>"
        attachments: [{{filename: "reading.json"}}]
    on_failure: {{retry: {{attempts: 3, initial: 0.05s}}}}
"""
    async with running_gateway(tmp_path, config) as rt:
        async with httpx.AsyncClient(timeout=10) as client:
            for payload in ({"site": "7", "title": "Boiler hot", "temperature": 93.5},
                            {"site": "../../etc", "title": "path trick", "temperature": 1},
                            {"site": "7", "title": "x\r\nBcc: victim@attacker.test", "temperature": 2}):
                r = await client.post(f"http://127.0.0.1:{rest}/alerts/boiler", json=payload)
                assert r.status_code == 202, r.text
        await wait_for(lambda: _dead(rt, 2), what="two dead letters")
        dead = sorted(d.last_error for d in await rt.spool.dead_letters())
        root = mailbox.Maildir(str(tmp_path / "Maildir"), factory=None, create=False)
        await wait_for(lambda: "Alerts.Site7" in root.list_folders(), what="the folder")
        folder = root.get_folder("Alerts.Site7")
        await wait_for(lambda: len(folder) == 1, what="the alert in its folder")
    assert sorted("header injection refused" in e for e in dead) == [False, True]
    assert sorted("not a valid Maildir++ folder" in e for e in dead) == [False, True]
    assert root.list_folders() == ["Alerts.Site7"] and len(root) == 0
    view = parse_message(next(iter(folder.values())).as_bytes())
    assert view["subject"] == "Boiler hot at site 7"
    assert view["headers"]["from"] == "Gateway <gw@example.com>" and view["to"] == ["ops@example.com"]
    assert view["text"] == "Temperature 93.5 °C\n"
    assert view["html"].strip() == "<p>Temperature <b>93.5</b> °C</p>"
    body = json.dumps({"site": "7", "title": "Boiler hot", "temperature": 93.5}, separators=(",", ":"))
    assert view["attachments"] == [{"filename": "reading.json", "content_type": "application/json",
                                    "size": len(body), "disposition": "attachment"}]
    assert view["headers"]["auto-submitted"] == "auto-generated"
    # nothing outside the Maildir
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("Maildir")) == ["Maildir"]


async def _dead(rt: Any, n: int) -> bool:
    return len(await rt.spool.dead_letters()) == n
