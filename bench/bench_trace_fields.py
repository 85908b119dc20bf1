"""What carrying the W3C trace context costs each outbound message, per protocol mapping.

    .venv/bin/python -m bench.bench_trace_fields [--count 100000] [--rounds 3]

Once the delivery gives every attempt its own context, every message sent carries a
``traceparent`` that differs from the previous message's. For each protocol this measures the
outbound mapping (envelope → what goes on the wire, no socket) of a message *with* a context
beside the same message *without* one, interleaved A/B in the same process, for ``--rounds``
rounds; figures are CPU µs per message of this process (from /proc, one thread).

MQTT 5 is the case that needed care: its PUBLISH properties are packed once per distinct set
and shared, and a per-message user property would make every set distinct. The connector
appends the trace user properties to the shared packed bytes; the "paho Properties per message"
line is what building them the ordinary way costs, for comparison.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from connectors.amqp.config import AmqpTarget
from connectors.amqp.mapping import to_publish as amqp_publish
from connectors.mail_common import MailOptions, build_mail
from connectors.mqtt.config import MqttConfig, MqttTarget
from connectors.mqtt.mapping import to_publish as mqtt_publish
from connectors.mqtt.outbound import MqttOutbound
from connectors.rest.mapping import request_headers
from gateway.contract import ConnectorContext
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.tracecontext import new_trace, with_context

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """This process's user + system CPU time, from /proc (as the other benchmarks read it)."""
    with open(f"/proc/{os.getpid()}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def measure(fn: Callable[[Envelope], object], envs: list[Envelope]) -> float:
    start = cpu_seconds()
    for env in envs:
        fn(env)
    return (cpu_seconds() - start) / len(envs) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = Envelope(source="plant", protocol="mqtt", subject="plant/7/alert", body=b'{"t": 95}',
                    content_type="application/json", headers={"site": "7"})
    trace = new_trace()
    plain = [base.evolve() for _ in range(args.count)]
    traced = [with_context(e, trace.child()) for e in plain]  # a new span id per message, as each attempt

    ctx = ConnectorContext(name="bench", logger=logging.getLogger("bench"), http=HttpHub(logging.getLogger("bench")),
                           state_dir=tempfile.mkdtemp())
    outbound = MqttOutbound(MqttConfig.model_validate({"type": "mqtt"}), ctx)
    mqtt_target = MqttTarget(topic="plant/7/alert")

    def mqtt_out(env: Envelope) -> object:
        return outbound._properties(mqtt_publish(env, mqtt_target, 1, 1 << 20))

    def mqtt_paho(env: Envelope) -> object:
        out = mqtt_publish(env, mqtt_target, 1, 1 << 20)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ContentType = out.content_type
        props.UserProperty = out.user_properties + out.trace
        return props.pack()  # type: ignore[no-untyped-call]

    amqp_target = AmqpTarget(exchange="ex")
    mail = MailOptions(to="ops@example.com", sender="gw@example.com", subject="alert", text="hot")
    cases: list[tuple[str, Callable[[Envelope], object]]] = [
        ("MQTT 5 properties (shared, trace appended)", mqtt_out),
        ("AMQP publish properties", lambda e: amqp_publish(e, amqp_target, persistent=True, mandatory=True,
                                                           max_body=1 << 20)),
        ("REST request headers", lambda e: request_headers(e, {})),
        ("mail (built message)", lambda e: build_mail(e, mail, route="r", default_sender=None)),
    ]
    n = min(args.count, 5_000)
    print(f"{args.count} messages per case and round ({n} for mail), {args.rounds} rounds, A/B interleaved; "
          "CPU µs per message")
    print(f"{'mapping':45} {'no context':>12} {'with context':>14} {'added':>8}")
    for name, fn in cases:
        count = n if name.startswith("mail") else args.count
        without, with_ = [], []
        for _ in range(args.rounds):
            without.append(measure(fn, plain[:count]))
            with_.append(measure(fn, traced[:count]))
        lo, hi = min(without), max(without)
        wlo, whi = min(with_), max(with_)
        added = sorted(w - o for w, o in zip(with_, without, strict=True))
        print(f"{name:45} {lo:5.1f}–{hi:<5.1f} {wlo:7.1f}–{whi:<5.1f} {added[len(added) // 2]:+7.1f}")
    paho = [measure(mqtt_paho, traced) for _ in range(args.rounds)]
    print(f"{'MQTT 5: paho Properties per message':45} {'':>12} {min(paho):7.1f}–{max(paho):<5.1f}")


if __name__ == "__main__":
    main()
