from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.envelope import Envelope, ParseError, from_cloudevent, new_id, to_cloudevent


def make(**kw: object) -> Envelope:
    base: dict[str, object] = {"source": "api", "protocol": "rest", "subject": "/events/x"}
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_ids_are_unique_and_time_sortable() -> None:
    ids = [new_id() for _ in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)
    assert all(len(i) == 26 for i in ids)


def test_ids_are_ulids_of_now() -> None:
    import time

    from ulid import ULID

    before = time.time()
    parsed = [ULID.from_str(i) for i in (new_id() for _ in range(5000))]
    assert all(str(p) == str(p).upper() and len(str(p)) == 26 for p in parsed)
    assert all(before - 0.01 <= p.timestamp <= time.time() + 0.01 for p in parsed)
    assert len({int(p) for p in parsed}) == 5000


def test_to_json_is_computed_once_and_matches_as_dict() -> None:
    env = make(body=b"\xff\x00", attributes={"query": {"a": "1"}, "n": 2, "when": None})
    text = env.to_json()
    assert env.to_json() is text
    assert json.loads(text) == env.as_dict()
    assert env.evolve(subject="/y").to_json() != text


def test_envelope_is_frozen_and_evolve_keeps_id() -> None:
    env = make(body=b'{"a":1}', content_type="application/json")
    with pytest.raises(FrozenInstanceError):
        env.subject = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        env.headers["x"] = "y"  # type: ignore[index]
    new = env.evolve(subject="/other")
    assert new.id == env.id and new.subject == "/other" and env.subject == "/events/x"


def test_body_must_be_bytes() -> None:
    with pytest.raises(TypeError):
        make(body="text")


@pytest.mark.parametrize(
    ("body", "ctype", "expected"),
    [
        (b'{"t": 97, "site": "north"}', "application/json", {"t": 97, "site": "north"}),
        (b'{"t": 1}', "application/cloudevents+json; charset=utf-8", {"t": 1}),
        (b"[1, 2]", "application/octet-stream", [1, 2]),  # sniffed
        (b"hello", "text/plain; charset=utf-8", "hello"),
        (b"<a><b>1</b><b>2</b><c x='y'>t</c></a>", "application/xml", {"a": {"b": ["1", "2"], "c": {"@x": "y",
                                                                                                  "#text": "t"}}}),
        (b"\xff\xfe", "application/octet-stream", b"\xff\xfe"),
    ],
)
def test_data_view_parses_by_content_type(body: bytes, ctype: str, expected: object) -> None:
    assert make(body=body, content_type=ctype).data == expected


def test_data_is_cached_and_body_untouched() -> None:
    raw = b'{ "a" :  1 }'
    env = make(body=raw, content_type="application/json")
    first = env.data
    assert env.data is first
    assert env.body == raw


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"{not json", "application/json"),
        (b"[" * 10_000 + b"]" * 10_000, "application/json"),
        (b"\xff", "text/plain"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
         "application/xml"),
        (b'<!DOCTYPE l [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><l>&b;</l>', "text/xml"),
    ],
)
def test_hostile_or_broken_bodies_raise_parse_error(body: bytes, ctype: str) -> None:
    env = make(body=body, content_type=ctype)
    with pytest.raises(ParseError):
        _ = env.data
    assert env.data_or_none() is None


def test_json_round_trip_keeps_every_field_and_binary_body() -> None:
    env = make(body=b"\x00\x01binary\xff", headers={"x-a": "1"}, attributes={"qos": 1, "peer": "1.2.3.4"},
               correlation_id="c1", reply_to="r")
    back = Envelope.from_json(env.to_json())
    assert back == env
    assert back.body == b"\x00\x01binary\xff"
    assert back.time == env.time


def test_cloudevent_round_trip_json_data() -> None:
    env = make(body=b'{"temperature": 97}', content_type="application/json", headers={"ce-traceparent": "00-ab"})
    event = to_cloudevent(env)
    assert event["specversion"] == "1.0"
    assert event["id"] == env.id
    assert event["data"] == {"temperature": 97}
    assert event["subject"] == "/events/x"
    assert event["traceparent"] == "00-ab"
    back = from_cloudevent(json.loads(json.dumps(event)), source="api", protocol="rest")
    assert back.id == env.id
    assert json.loads(back.body) == {"temperature": 97}
    assert back.subject == env.subject
    assert back.headers["ce-traceparent"] == "00-ab"
    assert back.time == env.time


def test_cloudevent_binary_data_uses_base64() -> None:
    env = make(body=b"\xff\x00", content_type="application/octet-stream")
    event = to_cloudevent(env)
    assert "data_base64" in event and "data" not in event
    assert from_cloudevent(event, source="s", protocol="p").body == b"\xff\x00"


@pytest.mark.parametrize(
    "event",
    [{"id": "1", "source": "s", "type": "t"}, {"specversion": "0.3", "id": "1", "source": "s", "type": "t"},
     {"specversion": "1.0", "source": "s", "type": "t"}],
)
def test_invalid_cloudevents_are_refused(event: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        from_cloudevent(event, source="s", protocol="p")


# --- large JSON bodies parsed in steps ----------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=200)


@given(_json_values)
def test_json_in_steps_reads_what_json_loads_reads(value: object) -> None:
    import json

    from gateway.envelope import json_steps

    body = json.dumps(value, ensure_ascii=False).encode()
    steps = json_steps(body)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            assert done.value == json.loads(body)
            return


def test_a_large_json_body_parses_in_bounded_steps() -> None:
    import json

    from gateway.envelope import PARSE_STEP_BYTES

    doc = {"kind": "big", "values": list(range(200_000))}
    env = make(body=json.dumps(doc).encode(), content_type="application/json")
    steps = sum(1 for _ in env.parse_steps())
    assert steps == -(-len(env.body) // PARSE_STEP_BYTES)
    assert env.data == doc
    deep = make(body=b"[" * 70_000 + b"]" * 70_000, content_type="application/json")
    for _ in deep.parse_steps():
        pass
    with pytest.raises(ParseError, match="deeper than"):
        _ = deep.data
    with pytest.raises(ParseError, match="deeper than"):  # the failure is kept, not parsed again
        _ = deep.data
