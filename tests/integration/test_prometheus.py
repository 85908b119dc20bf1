"""A real Prometheus (Debian package) scrapes a running gateway with our alert rules loaded."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.gwtest import free_port, running_gateway, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_prometheus_scrapes_counts_and_loads_the_alert_rules(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: scripts/peers.sh installs the Debian package 'prometheus'"
    api, admin, prom_port = free_port(), free_port(), free_port()
    cfg = f"""
gateway:
  admin: {{listen: "127.0.0.1:{admin}"}}
  spool: {{path: "{tmp_path / 'spool.db'}"}}
connectors:
  api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
  sink: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - {{name: all, from: api, to: [{{connector: sink}}]}}
"""
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{ROOT / 'deploy' / 'monitoring' / 'alerts.yml'}"]
scrape_configs:
  - job_name: gateway
    static_configs: [{{targets: ["127.0.0.1:{admin}"]}}]
""")
    check = subprocess.run(["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    async with running_gateway(tmp_path, cfg), httpx.AsyncClient() as http:
        for i in range(3):
            r = await http.post(f"http://127.0.0.1:{api}/e/{i}", json={"i": i})
            assert r.status_code == 202
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{prom_port}"

            async def target_up() -> bool:
                try:
                    targets = (await http.get(f"{base}/api/v1/targets")).json()["data"]["activeTargets"]
                except (httpx.TransportError, ValueError, KeyError):
                    return False
                return any(t["health"] == "up" for t in targets)

            await wait_for(target_up, timeout=30, interval=0.5, what="Prometheus to scrape the gateway")

            async def counted() -> bool:
                q = await http.get(f"{base}/api/v1/query",
                                   params={"query": 'gateway_messages_received_total{connector="api"}'})
                result = q.json()["data"]["result"]
                return bool(result) and result[0]["value"][1] == "3"

            await wait_for(counted, timeout=30, interval=0.5, what="gateway_messages_received_total == 3")
            rules = (await http.get(f"{base}/api/v1/rules")).json()["data"]["groups"]
            names = {r["name"] for g in rules for r in g["rules"]}
            assert {"GatewayConnectorDown", "GatewayDeadLettersRising", "GatewaySpoolGrowing"} <= names
            up = await http.get(f"{base}/api/v1/query", params={"query": "gateway_ready"})
            assert up.json()["data"]["result"][0]["value"][1] == "1"
        finally:
            proc.terminate()
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, 20)
