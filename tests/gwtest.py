"""Test helpers: run a real gateway runtime in-process on free ports, with a config you write."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.admin import mount_admin
from gateway.config.loader import load_config
from gateway.registry import Registry
from gateway.runtime import Runtime, RuntimeAdmin
from tests.ports import free_port

__all__ = ["free_port", "jsonl", "running_gateway", "wait_for", "write_config"]


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a file connector has written so far: complete lines only. A test that reads
    while the gateway appends can see the last line half written (a CI failure: JSONDecodeError
    on an unterminated string in a sink file read mid-write)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def write_config(tmp_path: Path, yaml_text: str, *, admin_port: int | None = None) -> Path:
    """Write routes.yaml into tmp_path; adds a gateway: section (spool, state, admin port) if absent."""
    text = textwrap.dedent(yaml_text)
    if "gateway:" not in text:
        admin = admin_port or free_port()
        text = (
            "gateway:\n"
            f"  admin: {{listen: \"127.0.0.1:{admin}\"}}\n"
            f"  spool: {{path: \"{tmp_path / 'spool.db'}\", min_free_bytes: 0}}\n"
            f"  state_dir: \"{tmp_path / 'state'}\"\n"
            "  drain: 5s\n" + text
        )
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    return path


@asynccontextmanager
async def running_gateway(
    tmp_path: Path, yaml_text: str, *, registry: Registry | None = None, wait_ready: bool = True,
    ready_timeout: float = 15.0,
) -> AsyncIterator[Runtime]:
    """Start a Runtime with its admin API on the config; yield it; stop it (draining) afterwards.
    ``wait_ready`` waits until it is ready *and* every connector is up: readiness leaves outbound
    ones out."""
    path = write_config(tmp_path, yaml_text)
    registry = registry or Registry()
    config = load_config(str(path), registry)
    rt = Runtime(config, registry=registry, config_path=str(path))
    mount_admin(RuntimeAdmin(rt), rt.http)
    await rt.start()
    try:
        if wait_ready:
            loop = asyncio.get_running_loop()
            end = loop.time() + ready_timeout
            while not (rt.readiness()[0] and all(c["up"] for c in rt.readiness()[1]["connectors"].values())):
                if loop.time() > end:
                    raise AssertionError(f"gateway not ready: {rt.readiness()[1]}")
                await asyncio.sleep(0.05)
        yield rt
    finally:
        await rt.stop()


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate()`` (sync or async) until true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
