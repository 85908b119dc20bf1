"""The file sink: one fsync'd JSON line per envelope, rotation by size, and a file moved or
removed behind its back is written again at its path."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from connectors.file import FileConfig, FileConnector, FileTarget
from gateway.contract import ConnectorContext, Target, TransientError
from gateway.envelope import Envelope


def sink(path: Path, **config: object) -> FileConnector:
    ctx = ConnectorContext(name="out", logger=logging.getLogger("test.file"), http=None,  # type: ignore[arg-type]
                           state_dir=str(path.parent))
    return FileConnector(FileConfig(path=str(path), **config), ctx)  # type: ignore[arg-type]


TARGET = Target(route="r", connector="out", options=FileTarget())


def env(n: int) -> Envelope:
    return Envelope(source="api", protocol="test", subject="/x", body=f"message {n}".encode())


async def test_lines_are_the_envelopes_json(tmp_path: Path) -> None:
    out = sink(tmp_path / "out" / "a.jsonl")
    await out.open()
    sent = [env(n) for n in range(3)]
    for e in sent:
        await out.send(e, TARGET)
    await out.close()
    lines = (tmp_path / "out" / "a.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [e.as_dict() for e in sent]


async def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    out = sink(path, max_bytes=1000, keep=2)
    await out.open()
    for n in range(30):
        await out.send(env(n), TARGET)
    await out.close()
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "a.jsonl.1", "a.jsonl.2"]
    assert all(os.path.getsize(tmp_path / f) <= 1000 for f in os.listdir(tmp_path))


async def test_a_file_moved_or_removed_behind_its_back_is_written_again(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    out = sink(path)
    await out.open()
    await out.send(env(1), TARGET)
    path.rename(tmp_path / "moved.jsonl")
    await out.send(env(2), TARGET)
    path.unlink()
    await out.send(env(3), TARGET)
    await out.close()
    assert json.loads(path.read_text())["body"] == "message 3"
    assert json.loads((tmp_path / "moved.jsonl").read_text())["body"] == "message 1"


async def test_a_batch_is_one_append_in_order_and_fails_as_one(tmp_path: Path) -> None:
    path = tmp_path / "out" / "b.jsonl"
    out = sink(path)
    await out.open()
    body = Target(route="r", connector="out", options=FileTarget(format="body"))
    answers = await out.send_batch([(env(1), TARGET), (env(2), body), (env(3), TARGET)])
    assert answers == [None, None, None]
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["body"] == "message 1" and lines[1] == "message 2"
    assert json.loads(lines[2])["body"] == "message 3"
    await out.close()
    path.unlink()
    path.mkdir()  # the path is a directory now: nothing can be appended
    broken = sink(path)
    await broken.open()
    try:
        await broken.send_batch([(env(4), TARGET), (env(5), TARGET)])
    except TransientError as exc:
        assert "cannot write" in str(exc)
    else:
        raise AssertionError("a batch that cannot be written must fail")
    finally:
        await broken.close()


async def test_half_a_line_left_by_a_crash_does_not_swallow_the_next_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "m1"}\n{"id": "m2"')  # a kill -9 cut the last append short
    out = sink(path)
    await out.open()
    await out.send_batch([(env(3), TARGET), (env(4), TARGET)])
    await out.close()
    lines = path.read_bytes().splitlines()
    assert lines[:2] == [b'{"id": "m1"}', b'{"id": "m2"']
    assert [json.loads(line)["body"] for line in lines[2:]] == ["message 3", "message 4"]
