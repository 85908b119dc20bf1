"""The supervisor: a connector that fails to start is retried with backoff, reported down, and
does not take the others with it; its messages wait in the spool until it is up."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import httpx
import pytest

from gateway.contract import Connector, ConnectorConfig, Health, Reply, Target, TargetOptions, TransientError
from gateway.envelope import Envelope
from gateway.registry import Registry
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration


class FlakyConfig(ConnectorConfig):
    type: Literal["flaky"] = "flaky"
    failures: int = 2


class Flaky(Connector):
    """Fails to open ``failures`` times, then records what it is sent."""

    kind = "flaky"
    Config = FlakyConfig
    Options = TargetOptions
    supports_outbound = True
    opened: ClassVar[int] = 0
    attempts: ClassVar[int] = 0
    sent: ClassVar[list[Envelope]] = []

    async def open(self) -> None:
        assert isinstance(self.config, FlakyConfig)
        type(self).attempts += 1
        if type(self).attempts <= self.config.failures:
            raise TransientError(f"peer not there yet (attempt {type(self).attempts})")
        type(self).opened += 1

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        if not type(self).opened:
            raise TransientError("not open")
        type(self).sent.append(env)
        return None

    def health(self) -> Health:
        return Health(bool(type(self).opened), "" if type(self).opened else "not open")


async def test_failing_connector_is_retried_and_others_keep_working(tmp_path: Path) -> None:
    Flaky.attempts, Flaky.opened, Flaky.sent = 0, 0, []
    port = free_port()
    registry = Registry({"flaky": Flaky})
    cfg = f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{port}", auth: {{type: none}}}}
  flaky: {{type: flaky, failures: 2}}
  sink: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - name: to-flaky
    from: api
    match: {{subject: /flaky}}
    on_failure: {{retry: {{attempts: 50, initial: 100ms, max: 300ms}}}}
    to: [{{connector: flaky}}]
  - name: to-sink
    from: api
    to: [{{connector: sink}}]
"""
    async with running_gateway(tmp_path, cfg, registry=registry, wait_ready=False) as rt, \
            httpx.AsyncClient() as http:
        # flaky is an outbound target: its being down keeps no message out, so the pod is ready
        # as soon as its REST listener is, and /readyz?verbose shows flaky down.
        await wait_for(lambda: rt.readiness()[0], what="ready with flaky down")
        admin = rt.config.model.gateway.admin.listen
        verbose = await http.get(f"http://{admin}/readyz?verbose")
        assert verbose.status_code == 200
        flaky = verbose.json()["connectors"]["flaky"]
        assert (flaky["state"], flaky["up"]) == ("down", False)
        assert "peer not there yet" in flaky["detail"]
        brief = (await http.get(f"http://{admin}/readyz")).json()
        assert brief["ready"] and brief["inbound"] == {"api": "up"} and "connectors" not in brief
        # The REST connector and the file sink work while flaky is down.
        r = await http.post(f"http://127.0.0.1:{port}/other", json={"n": 1})
        assert r.status_code == 202
        await wait_for((tmp_path / "out.jsonl").exists, what="sink line")
        # A message for the down connector is accepted into the spool, not lost.
        r = await http.post(f"http://127.0.0.1:{port}/flaky", json={"n": 2})
        assert r.status_code == 202
        await wait_for(lambda: rt.readiness()[1]["connectors"]["flaky"]["up"], timeout=15, what="flaky to come up")
        assert Flaky.attempts == 3 and Flaky.opened == 1
        await wait_for(lambda: len(Flaky.sent) == 1, timeout=10, what="spooled message delivered")
        assert Flaky.sent[0].id == r.json()["id"]
        metrics = rt.metrics.exposition().decode()
        assert 'gateway_connector_up{connector="flaky"} 1.0' in metrics
