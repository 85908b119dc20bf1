"""A real Prometheus (Debian package) scrapes a running gateway with our alert rules loaded.

The counter series a config makes knowable are exported at 0 from the start, so an alert on
``increase()`` fires on the first event: one dead letter fires GatewayDeadLettersRising.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faultproxy import HttpSink
from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_prometheus_scrapes_counts_and_fires_an_alert_on_the_first_dead_letter(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: scripts/peers.sh installs the Debian package 'prometheus'"
    api, admin, prom_port = free_port(), free_port(), free_port()
    async with HttpSink() as refusing:
        refusing.status = 400  # a permanent failure: dead-lettered at the first attempt
        cfg = f"""
gateway:
  admin: {{listen: "127.0.0.1:{admin}"}}
  spool: {{path: "{tmp_path / 'spool.db'}"}}
  state_dir: "{tmp_path / 'state'}"
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  sink: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
  erp: {{type: rest, base_url: "{refusing.url}"}}
routes:
  - {{name: all, from: api, match: {{subject: "/e/**"}}, to: [{{connector: sink}}]}}
  - {{name: orders, from: api, match: {{subject: "/orders/**"}}, to: [{{connector: erp, path: /orders}}]}}
"""
        # Evaluated every second, so the alert is seen within the test's patience.
        (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{ROOT / 'deploy' / 'monitoring' / 'alerts.yml'}"]
scrape_configs:
  - job_name: gateway
    static_configs: [{{targets: ["127.0.0.1:{admin}"]}}]
""")
        check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        async with running_gateway(tmp_path, cfg) as rt, httpx.AsyncClient() as http:
            for i in range(3):
                r = await http.post(f"http://127.0.0.1:{api}/e/{i}", json={"i": i})
                assert r.status_code == 202
            proc = subprocess.Popen(
                [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                base = f"http://127.0.0.1:{prom_port}"

                async def query(promql: str) -> list[dict[str, Any]]:
                    try:
                        answer = (await http.get(f"{base}/api/v1/query", params={"query": promql})).json()
                    except (httpx.TransportError, ValueError):
                        return []
                    result: list[dict[str, Any]] = answer.get("data", {}).get("result", [])
                    return result

                async def value_is(promql: str, expected: str) -> bool:
                    result = await query(promql)
                    return bool(result) and result[0]["value"][1] == expected

                dead = 'gateway_messages_dead_lettered_total{route="orders", reason="permanent"}'
                # Scraped at 0 before anything was dead-lettered: the base increase() needs.
                await wait_for(lambda: value_is(dead, "0"), timeout=30, interval=0.5,
                               what="Prometheus to scrape the dead-letter series at 0")
                await wait_for(lambda: value_is('gateway_messages_received_total{connector="api"}', "3"),
                               timeout=30, interval=0.5, what="gateway_messages_received_total == 3")
                rules = (await http.get(f"{base}/api/v1/rules")).json()["data"]["groups"]
                names = {r["name"] for g in rules for r in g["rules"]}
                assert {"GatewayConnectorDown", "GatewayDeadLettersRising", "GatewaySpoolGrowing"} <= names
                assert await value_is("gateway_ready", "1")
                assert not await query('ALERTS{alertname="GatewayDeadLettersRising"}')

                r = await http.post(f"http://127.0.0.1:{api}/orders/1", json={"order": 1})
                assert r.status_code == 202
                await wait_for(rt.spool.count_dead_letters, what="the order dead-lettered")

                async def firing() -> bool:
                    alerts = await query('ALERTS{alertname="GatewayDeadLettersRising", alertstate="firing"}')
                    return any(a["metric"].get("route") == "orders" for a in alerts)

                await wait_for(firing, timeout=30, interval=0.5, what="GatewayDeadLettersRising firing")
                assert await value_is(dead, "1")
            finally:
                proc.terminate()
                await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)


async def test_series_start_at_zero_and_follow_a_reload(tmp_path: Path) -> None:
    """Every counter series of the config's routes and connectors is exported before any
    message; a reload adds those of a new route and removes those of a removed one."""
    api = free_port()

    def cfg(route: str) -> str:
        return f"""
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  sink: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - {{name: {route}, from: api, to: [{{connector: sink}}]}}
"""

    async with running_gateway(tmp_path, cfg("first")) as rt:
        text = rt.metrics.exposition().decode()
        for series in ('gateway_messages_received_total{connector="api"} 0.0',
                       'gateway_inbound_outcomes_total{connector="api",outcome="accepted"} 0.0',
                       'gateway_messages_routed_total{outcome="matched",route="first"} 0.0',
                       'gateway_messages_delivered_total{connector="sink",route="first"} 0.0',
                       'gateway_delivery_failures_total{connector="sink",outcome="permanent",route="first"} 0.0',
                       'gateway_messages_dead_lettered_total{reason="attempts",route="first"} 0.0',
                       'gateway_messages_dead_lettered_total{reason="unmatched",route=""} 0.0',
                       'gateway_config_reloads_total{outcome="invalid"} 0.0'):
            assert series in text, series
        routes = tmp_path / "routes.yaml"
        routes.write_text(routes.read_text().replace("name: first", "name: second"))
        result = await rt.reload_from_file(by="test")
        assert result["outcome"] == "applied"
        text = rt.metrics.exposition().decode()
        assert 'gateway_messages_dead_lettered_total{reason="permanent",route="second"} 0.0' in text
        assert 'route="first"' not in text
        assert 'gateway_config_reloads_total{outcome="applied"} 1.0' in text
