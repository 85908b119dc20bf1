"""The delivery engine against a real spool file and scripted connectors.

Each test drives :class:`Delivery` the way an inbound connector does (``deliver(env)``) and
checks the outcome, what reached the scripted targets, and what the spool holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.config.loader import load_config_text
from gateway.contract import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Outcome,
    PermanentError,
    Reply,
    Status,
    Target,
    TargetOptions,
    TransientError,
)
from gateway.delivery.engine import Delivery, DeliveryOptions, RoutingState
from gateway.delivery.spool import Spool
from gateway.delivery.store import DeadLetterFilter, Job, SpoolBackend
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from gateway.registry import Registry
from tests.gwtest import wait_for

Behavior = Callable[[Envelope, Target], Awaitable[Reply | None]]


class FakeConfig(ConnectorConfig):
    pass


class FakeOptions(TargetOptions):
    tag: str = ""


async def _ok(env: Envelope, target: Target) -> Reply | None:
    return None


class Fake(Connector):
    """Records every send; what a send does is the test's ``behavior``."""

    kind = "fake"
    Config = FakeConfig
    Options = FakeOptions
    supports_inbound = True
    supports_outbound = True

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self.behavior: Behavior = _ok
        self.calls: list[tuple[Envelope, Target]] = []
        self.delivered: list[Envelope] = []
        self.active = 0
        self.max_active = 0

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        self.calls.append((env, target))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            reply = await self.behavior(env, target)
        finally:
            self.active -= 1
        self.delivered.append(env)
        return reply


REGISTRY = Registry({"fake": Fake}, use_entry_points=False)
FAST = "on_failure: {retry: {attempts: 4, initial: 0.02, max: 0.05}}"


class Harness:
    def __init__(self, tmp_path: Path, routes: str, *, unmatched: str = "reject", spool: SpoolBackend | None = None,
                 connector_class: type[Fake] | None = None, **options: Any) -> None:
        text = f"""
connectors:
  api: {{type: fake}}
  out: {{type: fake}}
  other: {{type: fake}}
routes:
{routes}
"""
        self.config = load_config_text(text, registry=REGISTRY, env={})
        self.spool: Any = spool or Spool(str(tmp_path / "spool.db"), min_free_bytes=0)
        self.conns: dict[str, Fake] = {}
        for name, cfg in self.config.connectors.items():
            ctx = ConnectorContext(name=name, logger=logging.getLogger(f"test.{name}"), http=None,  # type: ignore[arg-type]
                                   state_dir=str(tmp_path))
            self.conns[name] = (connector_class or Fake)(cfg, ctx)
        self.missing: set[str] = set()
        self.metrics = Metrics()
        self.delivery = Delivery(
            state=RoutingState(self.config.router, unmatched, "v1"), connector=self._connector, spool=self.spool,
            metrics=self.metrics, log=logging.getLogger("test.delivery"), options=DeliveryOptions(**options))

    def _connector(self, name: str) -> Connector | None:
        return None if name in self.missing else self.conns.get(name)

    async def __aenter__(self) -> Harness:
        await self.spool.open()
        await self.delivery.start(list(self.conns))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.delivery.drain(time.monotonic() + 1)
        await self.spool.close()

    def out(self, name: str = "out") -> Fake:
        return self.conns[name]

    async def send(self, body: Any = None, *, subject: str = "/x", source: str = "api", **attributes: Any) -> Outcome:
        raw = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        env = Envelope(source=source, protocol="test", subject=subject, body=raw, content_type="application/json",
                       attributes=attributes)
        return await self.delivery.deliver(env)

    async def depth(self, connector: str = "out") -> int:
        return (await self.spool.depth()).get(connector, (0, 0.0))[0]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def route(to: str = "out", extra: str = FAST, name: str = "r", subject: str | None = None,
          target: str = "") -> str:
    match = f"\n    match: {{subject: \"{subject}\"}}" if subject else ""
    return f"""  - name: {name}
    from: api{match}
    to: [{{connector: {to}{', ' + target if target else ''}}}]
    {extra}
"""


# --- spooled: the happy path, poison, permanent, limits ------------------------------------


async def test_spooled_message_is_stored_acknowledged_then_delivered(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(target='tag: "{{ data.n }}"')) as h:
        outcome = await h.send({"n": 7})
        assert outcome.status is Status.ACCEPTED and outcome.acknowledge
        await wait_for(lambda: h.out().delivered, what="delivery")
        env, target = h.out().calls[0]
        assert env.id == outcome.envelope_id
        assert isinstance(target.options, FakeOptions) and target.options.tag == "7"
        await wait_for(lambda: _zero(h), what="spool emptied")
        assert h.metric("gateway_messages_delivered_total", connector="out", route="r") == 1


async def _zero(h: Harness) -> bool:
    return await h.depth() == 0


async def test_a_poison_message_never_blocks_the_ones_behind_it(tmp_path: Path) -> None:
    async def poison_fails(env: Envelope, target: Target) -> Reply | None:
        if b"poison" in env.body:
            raise TransientError("the peer chokes on this one")
        return None

    async with Harness(tmp_path, route(), concurrency=1) as h:
        h.out().behavior = poison_fails
        poison = await h.send({"poison": True})
        good = [await h.send({"n": i}) for i in range(20)]
        assert all(o.status is Status.ACCEPTED for o in [poison, *good])
        await wait_for(lambda: len(h.out().delivered) == 20, what="the 20 good ones")
        await wait_for(lambda: _zero(h), what="poison dead-lettered")
        [dl] = await h.spool.dead_letters()
        assert (dl.envelope_id, dl.reason, dl.attempts) == (poison.envelope_id, "attempts", 4)
        assert "chokes" in dl.last_error
        assert sum(1 for e, _ in h.out().calls if b"poison" in e.body) == 4
        assert h.metric("gateway_messages_dead_lettered_total", route="r", reason="attempts") == 1
        assert h.metric("gateway_delivery_retries_total", connector="out", route="r") == 3


async def test_permanent_failure_dead_letters_at_once(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("HTTP 400: bad order", code=400)

    async with Harness(tmp_path, route()) as h:
        h.out().behavior = refuse
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.ACCEPTED
        await wait_for(lambda: _dead(h, 1), what="dead letter")
        [dl] = await h.spool.dead_letters()
        assert (dl.reason, dl.attempts, dl.last_error) == ("permanent", 1, "HTTP 400: bad order")
        assert len(h.out().calls) == 1
        assert json.loads(dl.envelope)["id"] == outcome.envelope_id


async def _dead(h: Harness, n: int) -> bool:
    return await h.spool.count_dead_letters() == n


async def test_max_age_dead_letters_with_its_reason(tmp_path: Path) -> None:
    async def down(env: Envelope, target: Target) -> Reply | None:
        raise TransientError("connection refused")

    extra = "on_failure: {retry: {attempts: 1000, initial: 0.02, max: 0.02, max_age: 0.15}}"
    async with Harness(tmp_path, route(extra=extra), breaker_threshold=1000) as h:
        h.out().behavior = down
        await h.send({"n": 1})
        await wait_for(lambda: _dead(h, 1), what="dead letter")
        [dl] = await h.spool.dead_letters()
        assert dl.reason == "max_age" and dl.last_error == "connection refused"
        assert 2 <= dl.attempts < 20


async def test_a_send_that_hangs_times_out_and_is_retried(tmp_path: Path) -> None:
    seen: set[str] = set()

    async def first_hangs(env: Envelope, target: Target) -> Reply | None:
        if env.id not in seen:
            seen.add(env.id)
            await asyncio.sleep(30)
        return None

    extra = "timeout: 0.1s\n    " + FAST
    async with Harness(tmp_path, route(extra=extra), concurrency=1) as h:
        h.out().behavior = first_hangs
        await h.send({"n": 1})
        await h.send({"n": 2})
        await wait_for(lambda: len(h.out().delivered) == 2, timeout=5, what="both delivered")
        assert h.metric("gateway_delivery_failures_total", connector="out", route="r", outcome="transient") == 2


async def test_several_targets_fail_and_succeed_independently(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("no")

    routes = """  - name: fan
    from: api
    to: [{connector: out}, {connector: other}]
"""
    async with Harness(tmp_path, routes) as h:
        h.out("other").behavior = refuse
        assert (await h.send({"n": 1})).status is Status.ACCEPTED
        await wait_for(lambda: _dead(h, 1), what="one dead")
        await wait_for(lambda: h.out().delivered, what="one delivered")
        [dl] = await h.spool.dead_letters()
        assert dl.connector == "other"


# --- the circuit breaker in the engine ------------------------------------------------------


async def test_the_circuit_stops_hammering_a_dead_peer_and_probes_one_at_a_time(tmp_path: Path) -> None:
    outage = True
    half_open_active: list[int] = []

    async def flaky(env: Envelope, target: Target) -> Reply | None:
        if h.delivery.circuit("out") == "half-open":
            half_open_active.append(h.out().active)
        await asyncio.sleep(0.005)
        if outage:
            raise TransientError("503")
        return None

    extra = "on_failure: {retry: {attempts: 1000, initial: 0.01, max: 0.02}}"
    async with Harness(tmp_path, route(extra=extra), breaker_threshold=3, breaker_open=0.2) as h:
        h.out().behavior = flaky
        for i in range(10):
            await h.send({"n": i})
        await wait_for(lambda: h.delivery.circuit("out") == "open", what="circuit open")
        await asyncio.sleep(0.6)
        # Without the breaker, 10 jobs retried every 10-20 ms for 0.6 s would be ~400 sends.
        assert len(h.out().calls) < 30, len(h.out().calls)
        assert h.metric("gateway_circuit_state", connector="out") in (1.0, 2.0)
        outage = False
        await wait_for(lambda: len(h.out().delivered) == 10, timeout=5, what="all delivered after recovery")
        assert h.delivery.circuit("out") == "closed"
        assert half_open_active and max(half_open_active) == 1, half_open_active


# --- direct mode ------------------------------------------------------------------------------


async def test_direct_route_answers_after_the_send(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(extra="mode: direct")) as h:
        assert (await h.send({"n": 1})).status is Status.ACCEPTED
        assert len(h.out().delivered) == 1
        assert await h.depth() == 0


async def test_direct_transient_failure_answers_retry(tmp_path: Path) -> None:
    async def down(env: Envelope, target: Target) -> Reply | None:
        raise TransientError("connection refused")

    async with Harness(tmp_path, route(extra="mode: direct")) as h:
        h.out().behavior = down
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.RETRY and not outcome.acknowledge
        assert await h.spool.count_dead_letters() == 0


async def test_direct_permanent_failure_is_dead_lettered(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("HTTP 422")

    async with Harness(tmp_path, route(extra="mode: direct")) as h:
        h.out().behavior = refuse
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.DEAD_LETTERED and outcome.acknowledge
        [dl] = await h.spool.dead_letters()
        assert dl.reason == "permanent"


async def test_direct_permanent_failure_is_refused_when_dead_letters_are_off(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("HTTP 422")

    async with Harness(tmp_path, route(extra="mode: direct\n    on_failure: {dead_letter: false}")) as h:
        h.out().behavior = refuse
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.REJECTED and outcome.code == 502
        assert await h.spool.count_dead_letters() == 0


async def test_a_hanging_direct_send_bounds_what_is_in_flight(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def blocked(env: Envelope, target: Target) -> Reply | None:
        await gate.wait()
        return None

    async with Harness(tmp_path, route(extra="mode: direct"), max_inflight=1) as h:
        h.out().behavior = blocked
        first = asyncio.ensure_future(h.send({"n": 1}))
        await wait_for(lambda: h.out().active == 1, what="first in flight")
        assert h.delivery.pressure == ["inflight"]
        second = await h.send({"n": 2})
        assert second.status is Status.RETRY
        gate.set()
        assert (await first).status is Status.ACCEPTED
        assert h.delivery.pressure == []
        assert h.metric("gateway_backpressure_refusals_total", connector="api", reason="inflight") == 1


async def test_a_direct_send_cut_by_the_drain_is_answered_retry_and_the_sender_goes_on(tmp_path: Path) -> None:
    async def hangs(env: Envelope, target: Target) -> Reply | None:
        await asyncio.sleep(30)
        return None

    h = Harness(tmp_path, route(extra="mode: direct"))
    await h.__aenter__()
    try:
        h.out().behavior = hangs

        async def sender() -> tuple[Outcome, int]:
            outcome = await h.send({"n": 1})
            await asyncio.sleep(0)  # still running: the drain's cancellation was taken back
            return outcome, asyncio.current_task().cancelling()  # type: ignore[union-attr]

        task = asyncio.ensure_future(sender())
        await wait_for(lambda: h.out().active == 1, what="in flight")
        await h.delivery.drain(time.monotonic() + 0.1)
        outcome, cancelling = await task
        assert outcome.status is Status.RETRY and "shutting down" in outcome.reason
        assert cancelling == 0
    finally:
        await h.spool.close()


async def test_a_direct_send_over_its_timeout_is_answered_retry(tmp_path: Path) -> None:
    async def hangs(env: Envelope, target: Target) -> Reply | None:
        await asyncio.sleep(30)
        return None

    async with Harness(tmp_path, route(extra="mode: direct\n    timeout: 0.1s")) as h:
        h.out().behavior = hangs
        started = time.monotonic()
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.RETRY and "no answer within" in outcome.reason
        assert time.monotonic() - started < 1.0


# --- routing failures and unmatched messages ---------------------------------------------------


async def test_template_failure_is_dead_lettered_with_its_reason(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(target='tag: "{{ data.missing }}"')) as h:
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.DEAD_LETTERED and outcome.acknowledge
        [dl] = await h.spool.dead_letters()
        assert dl.reason == "template" and "missing" in dl.last_error
        assert h.out().calls == []


async def test_template_failure_is_refused_when_dead_letters_are_off(tmp_path: Path) -> None:
    routes = route(target='tag: "{{ data.missing }}"', extra="on_failure: {dead_letter: false}")
    async with Harness(tmp_path, routes) as h:
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.REJECTED and outcome.code == 422
        assert await h.spool.count_dead_letters() == 0 and await h.depth() == 0


@pytest.mark.parametrize(("policy", "status"), [("reject", Status.REJECTED), ("dead_letter", Status.DEAD_LETTERED),
                                                ("drop", Status.DROPPED)])
async def test_unmatched_policies(tmp_path: Path, policy: str, status: Status) -> None:
    async with Harness(tmp_path, route(subject="/only"), unmatched=policy) as h:
        outcome = await h.send({"n": 1}, subject="/elsewhere")
        assert outcome.status is status
        assert await h.spool.count_dead_letters(DeadLetterFilter(reason="unmatched")) == (
            1 if policy == "dead_letter" else 0)


async def test_spooled_failure_on_a_route_without_dead_letters_is_dropped_and_counted(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("no")

    async with Harness(tmp_path, route(extra="on_failure: {dead_letter: false}")) as h:
        h.out().behavior = refuse
        await h.send({"n": 1})
        await wait_for(lambda: h.metric("gateway_delivery_dropped_total", route="r", reason="permanent") == 1,
                       what="drop counted")
        assert await h.spool.count_dead_letters() == 0 and await h.depth() == 0


# --- back pressure -------------------------------------------------------------------------------


async def test_a_full_connector_queue_refuses_new_messages_for_it_only(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def blocked(env: Envelope, target: Target) -> Reply | None:
        await gate.wait()
        return None

    routes = route(subject="/out") + route(name="r2", to="other", subject="/other")
    async with Harness(tmp_path, routes, max_pending=3) as h:
        h.out().behavior = blocked
        assert [(await h.send({"n": i}, subject="/out")).status for i in range(3)] == [Status.ACCEPTED] * 3
        refused = await h.send({"n": 3}, subject="/out")
        assert refused.status is Status.RETRY and not refused.acknowledge
        assert refused.retry_after and "waiting for 'out'" in refused.reason
        assert h.delivery.pressure == ["out"]
        assert (await h.send({"n": 4}, subject="/other")).status is Status.ACCEPTED
        gate.set()
        await wait_for(lambda: h.delivery.pending("out") == 0, what="queue drained")
        assert h.delivery.pressure == []
        assert (await h.send({"n": 5}, subject="/out")).status is Status.ACCEPTED
        assert await h.depth() <= 1
        assert h.metric("gateway_backpressure_refusals_total", connector="api", reason="pending") == 1


async def test_no_disk_space_answers_retry_never_accepted(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool.db"), min_free_bytes=2**62)
    async with Harness(tmp_path, route(), spool=spool) as h:
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.RETRY and outcome.reason == "the spool is full"
        assert await h.depth() == 0 and h.out().calls == []
        assert h.metric("gateway_backpressure_refusals_total", connector="api", reason="disk") == 1


class BrokenSpool(Spool):
    broken = True

    def _commit_batch(self, ops: Sequence[Callable[[sqlite3.Connection], Any]], fsync: bool = True) -> list[Any]:
        if self.broken:
            exc = sqlite3.OperationalError("disk I/O error")
            exc.sqlite_errorcode = 10
            raise exc
        return super()._commit_batch(ops, fsync)


async def test_a_failing_spool_write_answers_retry_and_recovers(tmp_path: Path) -> None:
    spool = BrokenSpool(str(tmp_path / "spool.db"), min_free_bytes=0, probe_interval=0.02)
    async with Harness(tmp_path, route(), spool=spool) as h:
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.RETRY and not spool.healthy
        spool.broken = False
        await wait_for(lambda: spool.healthy, what="probe recovers")
        assert (await h.send({"n": 2})).status is Status.ACCEPTED
        await wait_for(lambda: len(h.out().delivered) == 1, what="delivered")
        assert json.loads(h.out().delivered[0].body) == {"n": 2}


# --- idempotency ---------------------------------------------------------------------------------


async def test_same_idempotency_key_answers_the_first_id_and_delivers_once(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        first = await h.send({"n": 1}, idempotency_key="order-42")
        again = await h.send({"n": 1}, idempotency_key="order-42")
        other_source = await h.send({"n": 1}, idempotency_key="order-42", source="other")
        assert first.status is again.status is Status.ACCEPTED
        assert again.envelope_id == first.envelope_id
        assert other_source.status is Status.REJECTED  # no route from 'other': keys are per source
        await wait_for(lambda: h.out().delivered, what="delivery")
        await asyncio.sleep(0.1)
        assert [e.id for e in h.out().delivered] == [first.envelope_id]
        assert h.metric("gateway_idempotent_duplicates_total", connector="api") == 1


async def test_concurrent_duplicates_are_delivered_once(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        outcomes = await asyncio.gather(*(h.send({"n": 1}, idempotency_key="k") for _ in range(10)))
        assert {o.envelope_id for o in outcomes} == {outcomes[0].envelope_id}
        assert all(o.status is Status.ACCEPTED for o in outcomes)
        await wait_for(lambda: h.out().delivered, what="delivery")
        await asyncio.sleep(0.1)
        assert len(h.out().delivered) == 1


async def test_a_refused_first_try_is_not_remembered(tmp_path: Path) -> None:
    spool = BrokenSpool(str(tmp_path / "spool.db"), min_free_bytes=0, probe_interval=0.02)
    async with Harness(tmp_path, route(), spool=spool) as h:
        first = await h.send({"n": 1}, idempotency_key="k")
        assert first.status is Status.RETRY
        spool.broken = False
        await wait_for(lambda: spool.healthy, what="probe recovers")
        second = await h.send({"n": 1}, idempotency_key="k")
        assert second.status is Status.ACCEPTED and second.envelope_id != first.envelope_id
        await wait_for(lambda: h.out().delivered, what="delivery")


async def test_the_key_is_forgotten_after_the_window(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(), idempotency_window=0.05) as h:
        first = await h.send({"n": 1}, idempotency_key="k")
        await asyncio.sleep(0.1)
        second = await h.send({"n": 1}, idempotency_key="k")
        assert second.envelope_id != first.envelope_id
        await wait_for(lambda: len(h.out().delivered) == 2, what="both delivered")


async def test_dead_lettered_answers_are_remembered_too(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(target='tag: "{{ data.missing }}"')) as h:
        first = await h.send({"n": 1}, idempotency_key="k")
        again = await h.send({"n": 1}, idempotency_key="k")
        assert first.status is again.status is Status.DEAD_LETTERED
        assert again.envelope_id == first.envelope_id
        assert await h.spool.count_dead_letters() == 1


# --- replay, restart, shutdown -------------------------------------------------------------------


async def test_replay_to_the_original_target_and_to_another(tmp_path: Path) -> None:
    async def refuse(env: Envelope, target: Target) -> Reply | None:
        raise PermanentError("down for good")

    async with Harness(tmp_path, route(target='tag: "x{{ data.n }}"')) as h:
        h.out().behavior = refuse
        a = await h.send({"n": 1})
        b = await h.send({"n": 2})
        await wait_for(lambda: _dead(h, 2), what="both dead")
        h.out().behavior = _ok
        by_env = {d.envelope_id: d.id for d in await h.spool.dead_letters()}
        await h.delivery.replayed(await h.spool.replay([by_env[a.envelope_id]]))
        await h.delivery.replayed(await h.spool.replay([by_env[b.envelope_id]], connector="other"))
        await wait_for(lambda: h.out().delivered and h.out("other").delivered, what="replays delivered")
        env_a, target_a = h.out().calls[-1]
        assert env_a.id == a.envelope_id and isinstance(target_a.options, FakeOptions)
        assert target_a.options.tag == "x1"  # the rendered options were kept
        env_b, target_b = h.out("other").calls[-1]
        assert env_b.id == b.envelope_id and target_b.options == FakeOptions()
        assert await h.spool.count_dead_letters() == 0


async def test_jobs_left_by_a_previous_run_are_delivered_on_start(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")

    async def down(env: Envelope, target: Target) -> Reply | None:
        raise TransientError("down")

    async with Harness(tmp_path, route(extra="on_failure: {retry: {initial: 10}}"),
                       spool=Spool(path, min_free_bytes=0)) as h:
        h.out().behavior = down
        ids = [(await h.send({"n": i})).envelope_id for i in range(3)]
        await wait_for(lambda: len(h.out().calls) == 3, what="first attempts")
    # a new process: jobs are due in ~10 s; make them due now, as after a long outage
    with sqlite3.connect(path) as db:
        db.execute("UPDATE jobs SET next_at=0")
    async with Harness(tmp_path, route(), spool=Spool(path, min_free_bytes=0)) as h2:
        await wait_for(lambda: len(h2.out().delivered) == 3, what="delivered after restart")
        assert sorted(e.id for e in h2.out().delivered) == sorted(ids)


async def test_drain_leaves_unfinished_jobs_in_the_spool_and_refuses_new_ones(tmp_path: Path) -> None:
    async def hangs(env: Envelope, target: Target) -> Reply | None:
        await asyncio.sleep(30)
        return None

    h = Harness(tmp_path, route())
    await h.__aenter__()
    try:
        h.out().behavior = hangs
        await h.send({"n": 1})
        await wait_for(lambda: h.out().active == 1, what="in flight")
        started = time.monotonic()
        await h.delivery.drain(time.monotonic() + 0.2)
        assert time.monotonic() - started < 1.0
        assert await h.depth() == 1
        outcome = await h.send({"n": 2})
        assert outcome.status is Status.RETRY and "shutting down" in outcome.reason
    finally:
        await h.spool.close()


# --- damaged or orphaned jobs ---------------------------------------------------------------------


async def test_an_unreadable_job_is_dead_lettered_without_blocking(tmp_path: Path) -> None:
    async with Harness(tmp_path, route(), concurrency=1) as h:
        await h.spool.put([Job(envelope_id="broken", route="r", connector="out", envelope="{not json",
                               options="{}", policy="{}")])
        await h.delivery.replayed(["out"])
        await h.send({"n": 1})
        await wait_for(lambda: len(h.out().delivered) == 1, what="the good one delivered")
        await wait_for(lambda: _dead(h, 1), what="the corrupt one dead-lettered")
        [dl] = await h.spool.dead_letters()
        assert dl.reason == "corrupt" and dl.envelope == "{not json"


async def test_a_connector_being_replaced_keeps_its_jobs(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        h.missing.add("out")  # a reload is swapping it
        await h.send({"n": 1})
        await asyncio.sleep(0.3)
        assert await h.depth() == 1 and await h.spool.count_dead_letters() == 0
        h.missing.clear()
        await wait_for(lambda: h.out().delivered, timeout=5, what="delivered once it is back")


async def test_a_job_for_a_connector_no_longer_configured_is_dead_lettered(tmp_path: Path) -> None:
    async with Harness(tmp_path, route()) as h:
        await h.spool.put([Job(envelope_id="e", route="gone", connector="ghost",
                               envelope=Envelope(source="api", protocol="t", subject="/").to_json(),
                               options="{}", policy="{}")])
        await h.delivery.replayed(["ghost"])
        await wait_for(lambda: _dead(h, 1), what="dead letter")
        [dl] = await h.spool.dead_letters()
        assert dl.reason == "connector_missing"
