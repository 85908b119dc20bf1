"""Provenance: the record of each message kept in its own SQLite file, looked up by any of its ids.

The store is driven the way the delivery drives it (the recording calls on the loop, the lookup
from a separate reader); the delivery tests at the end run messages through :class:`Delivery`
with a recorder and read back what an operator would see.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.contract import Outcome, PermanentError, Reply, Status, TransientError
from gateway.delivery.provenance import Provenance, read, timeline
from gateway.envelope import Envelope
from gateway.metrics import Metrics
from tests.unit.test_delivery import Harness, route

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def _env(**kw: object) -> Envelope:
    fields: dict[str, object] = {"source": "api", "protocol": "rest", "subject": "/orders", "body": b"{}"}
    fields.update(kw)
    return Envelope(**fields)  # type: ignore[arg-type]


async def _store(tmp_path: Path, **kw: object) -> Provenance:
    prov = Provenance(str(tmp_path / "provenance.db"), registry=Metrics().registry, **kw)  # type: ignore[arg-type]
    await prov.open()
    return prov


async def test_a_message_is_found_by_each_of_its_ids(tmp_path: Path) -> None:
    prov = await _store(tmp_path)
    env = _env(headers={"message-id": "<abc.123@mail.example>"}, correlation_id="corr-9",
               attributes={"idempotency_key": "order-77", "traceparent": TRACEPARENT, "amqp.message_id": "amqp-5"})
    other = _env()
    prov.received(env, Outcome.accepted(env.id))
    prov.route(env.id, "orders", "matched")
    prov.received(other, Outcome.accepted(other.id))
    await prov.close()

    path = str(tmp_path / "provenance.db")
    for key in (env.id, TRACE, TRACE.upper(), TRACEPARENT, "abc.123@mail.example", "<abc.123@mail.example>",
                "corr-9", "order-77", "amqp-5"):
        records = read(path, key)
        assert [r["envelope_id"] for r in records] == [env.id], key
        assert [e["kind"] for e in records[0]["events"]] == ["received", "route"]
    received = read(path, env.id)[0]["events"][0]
    assert received["connector"] == "api" and received["protocol"] == "rest" and received["subject"] == "/orders"
    assert received["ids"] == {"trace_id": TRACE, "message_id": "abc.123@mail.example", "correlation_id": "corr-9",
                               "idempotency_key": "order-77", "amqp_message_id": "amqp-5"}
    assert read(path, "nothing-like-it") == []
    assert read(str(tmp_path / "absent.db"), env.id) == []


async def test_records_survive_a_reopen_and_a_trace_id_names_every_message_of_the_trace(tmp_path: Path) -> None:
    prov = await _store(tmp_path)
    first = _env(attributes={"traceparent": TRACEPARENT, "idempotency_key": "k-1"})
    second = _env(attributes={"traceparent": TRACEPARENT})
    prov.route(first.id, "orders", "matched")  # recorded before the message's answer, dated after its arrival
    prov.received(first, Outcome.accepted(first.id))
    await prov.close()
    prov = await _store(tmp_path)  # tidies up on open: nothing here is past a bound
    prov.received(second, Outcome.accepted(second.id))
    found = await prov.lookup(TRACE)  # the running gateway's lookup: sees what it just recorded
    await prov.close()
    assert [r["envelope_id"] for r in found] == [first.id, second.id]  # the hops in the order they came
    [record] = read(str(tmp_path / "provenance.db"), "k-1")
    assert [e["kind"] for e in record["events"]] == ["received", "route"]


async def test_events_past_the_retention_are_deleted(tmp_path: Path) -> None:
    prov = await _store(tmp_path, retention=600)
    old = _env(time=datetime.now(UTC) - timedelta(minutes=30))
    new = _env()
    prov.received(old, Outcome.accepted(old.id))
    prov.received(new, Outcome.accepted(new.id))
    await prov.close()
    path = str(tmp_path / "provenance.db")
    assert read(path, old.id)  # the store keeps what it is given until it next tidies up (at the latest on open)
    prov = await _store(tmp_path, retention=600)
    await prov.close()
    assert read(path, old.id) == []
    assert read(path, new.id)


async def test_the_store_keeps_to_max_size_by_deleting_the_oldest(tmp_path: Path) -> None:
    limit = 1024 * 1024
    prov = await _store(tmp_path, max_size=limit)
    ids = []
    for i in range(6000):  # ~500 bytes a message plus its index entries: several times the bound
        env = _env(subject="/s/" + "x" * 480, attributes={"idempotency_key": f"k{i}"})
        prov.received(env, Outcome.accepted(env.id))
        ids.append(env.id)
        if i % 500 == 0:
            await prov.lookup("")  # let the thread write what came so far, as the 100 ms flushes would
    await prov.close()
    path = str(tmp_path / "provenance.db")
    db = sqlite3.connect(path)
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    live = pages * db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    assert 0 < live <= limit
    assert read(path, ids[0]) == [] and read(path, "k0") == []
    assert read(path, ids[-1]) and read(path, "k5999")
    assert os.path.getsize(path) < 1.5 * limit  # freed pages are reused: the file stays near the bound


async def test_a_failing_store_never_stops_a_message(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the store's directory should be")
    metrics = Metrics()
    prov = Provenance(str(tmp_path / "blocked" / "provenance.db"), registry=metrics.registry)
    await prov.open()  # cannot be created: provenance is off for this run, the rest goes on
    assert not prov.on
    assert metrics.registry.get_sample_value("gateway_provenance_failures_total", {"reason": "open"}) == 1
    async with Harness(tmp_path, route()) as h:
        h.delivery.provenance = prov
        assert (await h.send({"n": 1})).status is Status.ACCEPTED

    metrics = Metrics()
    prov = Provenance(str(tmp_path / "provenance.db"), registry=metrics.registry)
    await prov.open()
    assert prov._db is not None
    prov._db.close()  # every write fails from now on
    async with Harness(tmp_path, route()) as h:
        h.delivery.provenance = prov
        assert (await h.send({"n": 1})).status is Status.ACCEPTED
        await prov.lookup("x")
    await prov.close()
    assert (metrics.registry.get_sample_value("gateway_provenance_failures_total", {"reason": "write"}) or 0) >= 2


async def test_provenance_gives_way_when_the_disk_is_short_of_what_the_spool_needs(tmp_path: Path) -> None:
    metrics = Metrics()
    prov = Provenance(str(tmp_path / "provenance.db"), min_free_bytes=1 << 62, registry=metrics.registry)
    await prov.open()
    async with Harness(tmp_path, route()) as h:
        h.delivery.provenance = prov
        outcome = await h.send({"n": 1})
        assert outcome.status is Status.ACCEPTED
        assert await prov.lookup(outcome.envelope_id) == []
    await prov.close()
    assert (metrics.registry.get_sample_value("gateway_provenance_failures_total", {"reason": "disk"}) or 0) >= 2
    assert metrics.registry.get_sample_value("gateway_provenance_failures_total", {"reason": "backlog"}) == 0


# --- through the delivery ------------------------------------------------------------------------


async def test_a_spooled_message_retried_twice_then_refused_shows_every_attempt(tmp_path: Path) -> None:
    answers = [TransientError("POST /orders: HTTP 503", detail={"body": "busy"}),
               TransientError("POST /orders: HTTP 503", detail={"body": "still busy"}),
               PermanentError("POST /orders: HTTP 400", detail={"body": "bad order"})]

    async def peer(env: Envelope, target: object) -> Reply | None:
        raise answers.pop(0)

    prov = await _store(tmp_path)
    async with Harness(tmp_path, route(name="orders")) as h:
        h.delivery.provenance = prov
        h.out().behavior = peer  # type: ignore[assignment]
        outcome = await h.send({"n": 1}, idempotency_key="order-1", traceparent=TRACEPARENT)
        from tests.gwtest import wait_for

        await wait_for(lambda: not answers, what="three attempts")
        await wait_for(lambda: _kinds(prov, outcome.envelope_id, "dead_letter"), what="the dead letter recorded")
    await prov.close()
    [record] = read(str(tmp_path / "provenance.db"), "order-1")
    assert record["envelope_id"] == outcome.envelope_id
    events = record["events"]
    assert [e["kind"] for e in events] == ["received", "route", "attempt", "attempt", "attempt", "dead_letter"]
    attempts = [e for e in events if e["kind"] == "attempt"]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "retry"), (2, "retry"), (3, "permanent")]
    assert [a["answer"] for a in attempts] == ["POST /orders: HTTP 503: busy", "POST /orders: HTTP 503: still busy",
                                               "POST /orders: HTTP 400: bad order"]
    assert events[-1]["reason"] == "permanent" and "bad order" not in events[-1]["error"]
    assert read(str(tmp_path / "provenance.db"), TRACE)[0]["envelope_id"] == outcome.envelope_id
    text = timeline([record])
    assert "attempt 3" in text and "permanent" in text and "dead letter" in text


async def _kinds(prov: Provenance, envelope_id: str, kind: str) -> bool:
    records = await prov.lookup(envelope_id)
    return any(e["kind"] == kind for r in records for e in r["events"])


async def test_direct_sends_unmatched_messages_and_duplicates_are_recorded(tmp_path: Path) -> None:
    routes = route(name="now", extra="mode: direct", subject="/direct") + route(name="later", subject="/later")
    prov = await _store(tmp_path)
    async with Harness(tmp_path, routes, unmatched="drop") as h:
        h.delivery.provenance = prov
        direct = await h.send({"n": 1}, subject="/direct")
        unmatched = await h.send({"n": 2}, subject="/nowhere")
        first = await h.send({"n": 3}, subject="/later", idempotency_key="k-1")
        again = await h.send({"n": 3}, subject="/later", idempotency_key="k-1")
        assert (direct.status, unmatched.status, again.envelope_id) == (Status.ACCEPTED, Status.DROPPED,
                                                                         first.envelope_id)
        await prov.lookup("")
    await prov.close()
    path = str(tmp_path / "provenance.db")
    [d] = read(path, direct.envelope_id)
    assert [(e["kind"], e.get("outcome")) for e in d["events"]] == [("received", None), ("route", "matched"),
                                                                     ("attempt", "ok")]
    assert d["events"][2]["mode"] == "direct" and d["events"][0]["status"] == "accepted"
    [u] = read(path, unmatched.envelope_id)
    assert [(e["kind"], e.get("outcome")) for e in u["events"]] == [("received", None), ("route", "unmatched")]
    assert u["events"][0]["status"] == "dropped"
    [k] = read(path, "k-1")
    received = [e for e in k["events"] if e["kind"] == "received"]
    assert len(received) == 2 and received[1]["reason"].startswith("duplicate")



def test_a_replay_from_the_command_line_joins_the_record(tmp_path: Path) -> None:
    """``gateway dead-letters replay`` (no gateway running) records who replayed, as the admin API does."""
    import asyncio
    import getpass

    from gateway.cli import main
    from gateway.delivery.spool import Spool
    from gateway.delivery.store import Job

    env = _env()

    async def one_dead_letter() -> None:
        spool = Spool(str(tmp_path / "spool.db"), min_free_bytes=0)
        await spool.open()
        job = Job(envelope_id=env.id, route="orders", connector="out", envelope=env.to_json(), options="{}",
                  policy="{}")
        await spool.put([], dead=[(job, "permanent", "HTTP 400")])
        await spool.close()

    asyncio.run(one_dead_letter())
    config = tmp_path / "routes.yaml"
    config.write_text(f"""
gateway:
  spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
connectors:
  api: {{type: rest, listen: "127.0.0.1:1", auth: {{type: none}}}}
  out: {{type: file, path: "{tmp_path / 'out.jsonl'}"}}
routes:
  - {{name: orders, from: api, to: [{{connector: out}}]}}
""")
    assert main(["dead-letters", "--config", str(config), "replay", "--all"]) == 0
    [record] = read(str(tmp_path / "provenance.db"), env.id)
    [replay] = record["events"]
    assert (replay["kind"], replay["by"]) == ("replay", f"cli:{getpass.getuser()}")


async def test_a_damaged_store_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    (tmp_path / "provenance.db").write_bytes(b"this is not a SQLite file, a disk error wrote over it" * 100)
    prov = await _store(tmp_path)
    assert prov.on
    env = _env()
    prov.received(env, Outcome.accepted(env.id))
    await prov.close()
    assert read(str(tmp_path / "provenance.db"), env.id)
    assert [p.name.split("-")[0] for p in tmp_path.glob("provenance.db.corrupt-*")] == ["provenance.db.corrupt"]
