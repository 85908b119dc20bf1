"""Follow a message in the editor, in a real headless Chromium against a real ``gateway run``: a
dead letter's "Follow this message" opens its timeline (received, route, the attempt with the
peer's answer, the dead letter), and the search box finds it by its Idempotency-Key too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.browser import until
from tests.e2e.test_flow import Page, gateway, hook  # noqa: F401  (the fixtures)

pytestmark = pytest.mark.e2e


def test_a_dead_letter_is_followed_from_its_detail_and_by_its_idempotency_key(
    gateway: tuple[str, int, Path], browser: Any,  # noqa: F811
) -> None:
    base, api, _ = gateway
    p = Page(browser, base)
    p.login()
    r = httpx.post(f"http://127.0.0.1:{api}/alerts/f1", json={"id": "f1"}, headers={"Idempotency-Key": "alert-f1"})
    assert r.status_code == 202
    envelope_id = r.json()["id"]
    until("the dead-letter count on the tab", lambda: p.css("#dl-count").text == "1", 30)
    p.tab("deadletters")
    until("the list", lambda: len(p.all("#dl-table tr.dl-row")) == 1)
    p.css("#dl-table tr.dl-row td:nth-child(3)").click()
    until("the detail", lambda: p.all("#dl-detail button.dl-follow"))
    p.css("#dl-detail button.dl-follow").click()

    def timeline() -> list[list[str]]:
        return [[td.text for td in tr.find_elements(p.by.CSS_SELECTOR, "td")] for tr in
                p.all("#follow-result tbody tr")]

    until("the timeline", lambda: len(timeline()) == 4)
    assert p.shown("#tab-follow") and envelope_id in p.css("#follow-result h3").text
    kinds = [row[1] for row in timeline()]
    assert kinds == ["received", "route", "attempt 1", "dead letter"]
    received, _, attempt, dead = timeline()
    assert "from api (rest), subject /alerts/f1; answered accepted" in received[2]
    assert "idempotency_key alert-f1" in received[2]
    assert "hooks via alerts-to-hook (spooled): permanent" in attempt[2] and "hook says no" in attempt[3]
    assert "alerts-to-hook → hooks: permanent" in dead[2]
    p.shot("follow-a-message", docs=True)

    p.js("document.getElementById('follow-result').replaceChildren()")
    p.css("#follow-id").clear()
    p.css("#follow-id").send_keys("alert-f1")
    p.css("#follow-btn").click()
    until("the timeline by the key", lambda: len(timeline()) == 4)
    assert envelope_id in p.css("#follow-result h3").text
    p.css("#follow-id").clear()
    p.css("#follow-id").send_keys("no-such-message")
    p.css("#follow-btn").click()
    until("nothing known", lambda: "no message known" in p.css("#follow-result").text)
