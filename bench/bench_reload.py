"""What a reload costs, and what the editor's live view costs per message.

    .venv/bin/python -m bench.bench_reload

1. Reload: validate (the baseline: what `gateway validate` does) and then validate + apply a
   route-only change to a running gateway, for 10 and 1,000 routes. Apply adds the swap, the
   history write (fsync) and the metrics; no connector restarts.
2. Live view: messages per second through ``Delivery.deliver`` (a direct route to a log
   connector) without (baseline) and with the live view's wrapper, which selects the routes a
   second time to record them.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
from pathlib import Path

from gateway.admin import LiveLog
from gateway.config.loader import load_config, load_config_text
from gateway.envelope import Envelope
from gateway.runtime import Runtime
from tests.ports import free_port


def config_text(tmp: Path, n: int, tag: str) -> str:
    head = f"""
gateway:
  admin: {{listen: "127.0.0.1:{free_port()}"}}
  spool: {{path: "{tmp / 'spool.db'}", min_free_bytes: 0}}
  state_dir: "{tmp / 'state'}"
connectors:
  api: {{type: rest, listen: "127.0.0.1:{free_port()}", auth: {{type: none}}}}
  console: {{type: log, level: debug}}
routes:
"""
    routes = "".join(f"""  - name: r{i}
    from: api
    mode: direct
    match: {{subject: "/site/{i}/*", when: "data.t > 90"}}
    to: [{{connector: console, message: "{tag} {{{{ data.t }}}}"}}]
""" for i in range(n))
    return head + routes


async def reload_times(n: int, rounds: int = 5) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = tmp / "routes.yaml"
        path.write_text(config_text(tmp, n, "v0"))
        rt = Runtime(load_config(str(path)), config_path=str(path))
        await rt.start()
        validate, apply = [], []
        try:
            for k in range(1, rounds + 1):
                text = path.read_text().replace(f"v{k - 1} ", f"v{k} ")
                started = time.perf_counter()
                load_config_text(text, file=str(path), base_dir=d)
                validate.append(time.perf_counter() - started)
                started = time.perf_counter()
                result = await rt.reloader.save_and_apply(text, base=rt.config.version, by="bench")
                apply.append(time.perf_counter() - started)
                assert result["outcome"] == "applied" and not result["restarted"]
        finally:
            await rt.stop()
    return statistics.median(validate), statistics.median(apply)


async def deliver_rate(wrapped: bool, messages: int = 20_000) -> float:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = tmp / "routes.yaml"
        path.write_text(config_text(tmp, 100, "v0"))
        rt = Runtime(load_config(str(path)), config_path=str(path))
        deliver = rt.delivery.deliver
        if wrapped:
            deliver = LiveLog().wrap(rt, deliver)
        await rt.start()
        envs = [Envelope(source="api", protocol="rest", subject=f"/site/{i % 100}/x", body=b'{"t": 95}',
                         content_type="application/json") for i in range(messages)]
        try:
            started = time.perf_counter()
            for env in envs:
                await deliver(env)
            return messages / (time.perf_counter() - started)
        finally:
            await rt.stop()


async def main() -> None:
    logging.disable(logging.WARNING)
    print("reload (median of 5)         validate only (baseline)   validate + save + apply")
    for n in (10, 1000):
        v, a = await reload_times(n)
        print(f"  {n:>5} routes               {v * 1000:>10.1f} ms              {a * 1000:>10.1f} ms")
    base = await deliver_rate(False)
    live = await deliver_rate(True)
    print("deliver, 100 routes, direct   without live view (baseline)   with live view")
    print(f"                              {base:>10.0f} msg/s              {live:>10.0f} msg/s "
          f"({(base / live - 1) * 100:+.0f} % per message)")


if __name__ == "__main__":
    asyncio.run(main())
