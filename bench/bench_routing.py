"""Per-message cost of select + reshape with 10, 1,000 and 10,000 routes, side by side.

    .venv/bin/python -m bench.bench_routing

Each route reads from one REST source with its own path pattern and a `when:` condition, and
renders a body template; the message matches exactly one route. The baseline is the 10-route
config measured in the same run; the target is 10,000 routes ≤ 2× the 10-route cost.
"""

from __future__ import annotations

import json
import statistics
import time

from gateway.config.loader import load_config_text
from gateway.envelope import Envelope
from gateway.routing.router import Planned

HEADER = """
connectors:
  api: {type: rest, listen: "127.0.0.1:1", auth: {type: none}}
  out: {type: file, path: /dev/null}
routes:
"""


def config_text(n: int) -> str:
    routes = [
        f"""  - name: r{i}
    from: api
    match: {{subject: "/site/{i}/*/alert", when: "data.temperature > 90"}}
    to:
      - connector: out
        body: "Site {{{{ data.site }}}} at {{{{ data.temperature }}}} C"
"""
        for i in range(n)
    ]
    return HEADER + "".join(routes)


def measure(n: int, messages: int = 20_000, rounds: int = 5) -> tuple[float, float]:
    t0 = time.perf_counter()
    cfg = load_config_text(config_text(n), env={})
    compile_s = time.perf_counter() - t0
    router = cfg.router
    body = json.dumps({"temperature": 97, "site": "north", "pad": "x" * 150}).encode()
    envs = [Envelope(source="api", protocol="rest", subject=f"/site/{(i * 7919) % n}/boiler/alert", body=body,
                     content_type="application/json") for i in range(1000)]
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(messages):
            env = envs[i % len(envs)].evolve()  # a fresh envelope: its parsed view is not cached yet
            for sel in router.select(env):
                for plan in router.reshape(env, sel.route):
                    assert isinstance(plan, Planned)
        per_round.append((time.perf_counter() - start) / messages * 1e6)
    return statistics.median(per_round), compile_s


def main() -> None:
    results = {n: measure(n) for n in (10, 1_000, 10_000)}
    base = results[10][0]
    print(f"{'routes':>8} {'µs/message':>12} {'× 10 routes':>12} {'load+compile s':>16}")
    for n, (us, comp) in results.items():
        print(f"{n:>8} {us:>12.2f} {us / base:>12.2f} {comp:>16.2f}")
    ratio = results[10_000][0] / base
    print(f"target: 10,000 routes ≤ 2.00× the cost of 10 → {'met' if ratio <= 2 else 'NOT met'} ({ratio:.2f}×)")


if __name__ == "__main__":
    main()
