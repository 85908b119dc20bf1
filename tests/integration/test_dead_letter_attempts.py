"""A dead letter counts the sends that were made: a permanent refusal at the first send is one attempt."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.faultproxy import HttpSink
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration


async def test_a_permanent_failure_is_dead_lettered_with_the_attempt_it_took(tmp_path: Path) -> None:
    api = free_port()
    async with HttpSink() as peer:
        peer.status = 400  # the target refuses the message for good
        cfg = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  erp: {{type: rest, base_url: "{peer.url}"}}
routes:
  - {{name: orders, from: api, to: [{{connector: erp, path: /orders}}]}}
"""
        async with running_gateway(tmp_path, cfg) as rt, httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{api}/orders/1", json={"order": 1})
            assert r.status_code == 202
            await wait_for(rt.spool.count_dead_letters, what="the order dead-lettered")
            listing = (await http.get(f"http://{rt.config.model.gateway.admin.listen}/api/dead-letters")).json()
            (dead,) = listing["dead_letters"]
            assert (dead["reason"], dead["attempts"]) == ("permanent", 1)
            assert peer.requests == 1
