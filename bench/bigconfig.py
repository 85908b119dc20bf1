"""A large routes.yaml, as a site with thousands of devices writes one: the generator behind
``bench/bench_bigconfig.py`` and the 10,000-route tests.

    .venv/bin/python -m bench.bigconfig 10000 > routes.yaml

Every route is its own (its name, subject pattern, condition and templates name its site and
device), so nothing is shared that a real config would not share: a cache of compiled templates
or conditions finds no twins. Four shapes take turns:

- REST in (``/sites/<site>/<device>/*``, a condition on ``data``) to a file and a log line with
  a template;
- REST in with a JSON body template and a templated header, to a file;
- MQTT in (``plant/<site>/<device>/+``) to AMQP with a templated routing key (``peers=True``) or
  to a file;
- REST in with a throttle (storm control) to a log line.

With 10,000 routes the file is about 2.4 MB. Without ``peers`` only REST, file and log
connectors are used, so a gateway runs it with no broker.
"""

from __future__ import annotations

import sys


def big_config(routes: int, *, api: str = "127.0.0.1:8080", admin: str = "127.0.0.1:8081",
               var: str = "var", peers: bool = False, tag: str = "v0") -> str:
    """routes.yaml text with ``routes`` routes; ``tag`` goes into one template of every route, so
    two tags make two versions that differ in every route (a reload recompiles them all)."""
    head = [
        "gateway:",
        f'  admin: {{listen: "{admin}"}}',
        f'  spool: {{path: "{var}/spool.db", min_free_bytes: 0}}',
        f'  state_dir: "{var}/state"',
        "  unmatched: drop",
        "connectors:",
        f'  api: {{type: rest, listen: "{api}", auth: {{type: none}}, endpoints: [{{path: "/sites/**"}}]}}',
        f'  archive: {{type: file, path: "{var}/archive.jsonl", fsync: false}}',
        f'  events: {{type: file, path: "{var}/events.jsonl", fsync: false}}',
        "  console: {type: log, level: debug}",
    ]
    if peers:
        head += [
            '  plant: {type: mqtt, url: "mqtt://127.0.0.1:1883", subscribe: ["plant/#"], qos: 1}',
            '  bus: {type: amqp, url: "amqp://127.0.0.1:5672/", username: guest, password: guest, '
            "exchanges: [{name: plant.events, type: topic}]}",
        ]
    head.append("routes:")
    body = [_route(i, peers, tag) for i in range(routes)]
    return "\n".join(head) + "\n" + "".join(body)


def _route(i: int, peers: bool, tag: str) -> str:
    site, device = f"s{i // 20:04d}", f"d{i % 20:02d}"
    shape = i % 4
    if shape == 0:
        return f"""  - name: r{i}-readings
    from: api
    match: {{subject: "/sites/{site}/{device}/*", when: "data.t > {50 + i % 40}"}}
    to:
      - {{connector: archive}}
      - {{connector: console, message: "{tag} hot {site}/{device}: {{{{ data.t }}}}"}}
"""
    if shape == 1:
        return f"""  - name: r{i}-json
    from: api
    match: {{subject: "/sites/{site}/{device}/status", when: 'data.state != "ok"'}}
    to:
      - connector: events
        format: body
        content_type: application/json
        headers: {{x-route: "r{i}", x-site: "{{{{ subject }}}}"}}
        body: '{{"tag": "{tag}", "site": "{site}", "device": "{device}", "state": {{{{ data.state | tojson }}}}}}'
"""
    if shape == 2:
        source = "plant" if peers else "api"
        pattern = f"plant/{site}/{device}/+" if peers else f"/sites/{site}/{device}/alarm/*"
        target = (f'{{connector: bus, exchange: plant.events, routing_key: "{tag}.{site}.{{{{ data.level }}}}"}}'
                  if peers else f'{{connector: events, headers: {{x-level: "{tag} {{{{ data.level }}}}"}}}}')
        return f"""  - name: r{i}-alarm
    from: {source}
    match: {{subject: "{pattern}", when: 'data.level in ["high", "critical"]'}}
    to: [{target}]
"""
    return f"""  - name: r{i}-storm
    from: api
    match: {{subject: "/sites/{site}/{device}/noise"}}
    throttle: {{key: "{{{{ subject }}}}", limit: 1, window: 1m}}
    to: [{{connector: console, message: "{tag} noisy {site}/{device}"}}]
"""


if __name__ == "__main__":
    sys.stdout.write(big_config(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
