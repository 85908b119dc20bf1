"""OpenTelemetry spans from a real ``gateway run`` process to an OTLP/HTTP receiver.

curl sends two messages with a ``traceparent`` into REST: one goes to a file, one to an HTTP peer
that answers 503 until the gateway gives up (three attempts) and dead-letters it. The receiver
here is the collector: it decodes what the gateway exports (OTLP protobuf, as an OpenTelemetry
Collector would) and the test reads the spans back: inbound → route → attempt, in curl's trace,
with the semantic-convention attributes, the retries and the dead letter as events. The admin
``/metrics`` in the OpenMetrics format links the delivery histogram to that trace (exemplars).
With tracing off, nothing reaches the receiver.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.faultproxy import HttpSink
from tests.gwtest import free_port, jsonl, wait_for
from tests.integration.test_crash import GatewayProcess

pytestmark = pytest.mark.integration

CURL_TRACE = "0af7651916cd43dd8448eb211c80319c"
CURL_SPAN = "b7ad6b7169203331"


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint that keeps every span it is sent (protobuf)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.requests = 0
        self.port = free_port()

    async def _traces(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        self.requests += 1
        for rs in msg.resource_spans:
            self.resources.append({a.key: _value(a.value) for a in rs.resource.attributes})
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[OtlpReceiver]:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        try:
            yield self
        finally:
            await runner.cleanup()

    def named(self, prefix: str) -> list[Span]:
        return [s for s in self.spans if s.name.startswith(prefix)]


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _attrs(span: Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


def _config(tmp: Path, admin: int, api: int, sink: HttpSink, otlp: OtlpReceiver, enabled: bool) -> Path:
    path = tmp / "routes.yaml"
    path.write_text(textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:{admin}"}}
          spool: {{path: "{tmp / 'spool.db'}", min_free_bytes: 0}}
          state_dir: "{tmp / 'state'}"
          drain: 2s
          tracing:
            enabled: {str(enabled).lower()}
            endpoint: "http://127.0.0.1:{otlp.port}/v1/traces"
            service_name: gateway-under-test
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{api}", auth: {{type: none}}}}
          events: {{type: file, path: "{tmp / 'events.jsonl'}"}}
          hook: {{type: rest, base_url: "http://127.0.0.1:{sink.port}", timeout: 2s}}
        routes:
          - name: events-to-file
            from: api
            match: {{subject: "/events"}}
            to: [{{connector: events}}]
          - name: alerts-to-hook
            from: api
            match: {{subject: "/alerts"}}
            on_failure: {{retry: {{attempts: 3, initial: 0.05, max: 0.1}}}}
            to: [{{connector: hook, path: /in}}]
        """))
    return path


async def _curl(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec("curl", "-sS", "--max-time", "10", *args,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"curl failed ({proc.returncode})"
    return out.decode()


async def _post(api: int, path: str, parent_span: str) -> None:
    await _curl("-X", "POST", "-H", "content-type: application/json",
                "-H", f"traceparent: 00-{CURL_TRACE}-{parent_span}-01", "-d", '{"n": 1}',
                f"http://127.0.0.1:{api}{path}")


@asynccontextmanager
async def _gateway(tmp: Path, enabled: bool) -> AsyncIterator[tuple[GatewayProcess, OtlpReceiver, HttpSink, int, int]]:
    admin, api = free_port(), free_port()
    otlp = OtlpReceiver()
    async with HttpSink() as sink, otlp.running():
        sink.status = 503  # the hook is down for good: retried, then dead-lettered
        config = _config(tmp, admin, api, sink, otlp, enabled)
        gw = GatewayProcess(config, f"127.0.0.1:{admin}", tmp / "gateway.log")
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export every 100 ms, not every 5 s
        try:
            await gw.start()
            yield gw, otlp, sink, admin, api
        finally:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
            await gw.ensure_stopped()


async def test_spans_of_a_delivered_and_a_dead_lettered_message_reach_the_collector(tmp_path: Path) -> None:
    async with _gateway(tmp_path, True) as (gw, otlp, sink, admin, api):
        await _post(api, "/events", CURL_SPAN)
        await _post(api, "/alerts", "00f067aa0ba902b7")
        await wait_for(lambda: jsonl(tmp_path / "events.jsonl"), what="the file delivery")
        await wait_for(lambda: any(e.name == "gateway.dead_letter" for s in otlp.named("POST hook") for e in s.events),
                       timeout=20, what="the dead letter event exported")
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{admin}/metrics",
                headers={"accept": "application/openmetrics-text; version=1.0.0"}) as r:
            metrics = await r.text()
            assert r.headers["content-type"].startswith("application/openmetrics-text")
        assert await gw.terminate() == 0

    # Everything is in curl's trace; each message's inbound span is a child of curl's span.
    assert {s.trace_id.hex() for s in otlp.spans} == {CURL_TRACE}
    assert otlp.resources[0]["service.name"] == "gateway-under-test"
    by_id = {s.span_id.hex(): s for s in otlp.spans}
    inbound = {_attrs(s)["url.path"]: s for s in otlp.named("POST api")}
    assert set(inbound) == {"/events", "/alerts"}
    assert inbound["/events"].parent_span_id.hex() == CURL_SPAN
    assert inbound["/alerts"].parent_span_id.hex() == "00f067aa0ba902b7"
    for s in inbound.values():
        assert s.kind == Span.SPAN_KIND_SERVER
        a = _attrs(s)
        assert a["http.request.method"] == "POST" and a["gateway.connector"] == "api"
        assert a["gateway.outcome"] == "accepted" and a["gateway.envelope.id"]

    # inbound → route → attempt
    [to_file] = otlp.named("route events-to-file")
    assert to_file.parent_span_id == inbound["/events"].span_id and to_file.kind == Span.SPAN_KIND_INTERNAL
    [file_attempt] = otlp.named("send events")
    assert file_attempt.parent_span_id == to_file.span_id and file_attempt.kind == Span.SPAN_KIND_PRODUCER
    fa = _attrs(file_attempt)
    assert fa["messaging.system"] == "file" and fa["messaging.operation.type"] == "send"
    assert fa["gateway.route"] == "events-to-file" and fa["gateway.connector"] == "events"
    assert fa["messaging.destination.name"] == str(tmp_path / "events.jsonl")
    assert fa["gateway.envelope.id"] == _attrs(inbound["/events"])["gateway.envelope.id"]
    # The line written carries the file attempt's own context (the contract for outbound connectors
    # is propagation's; the envelope the file connector was handed is what it writes).
    [line] = jsonl(tmp_path / "events.jsonl")
    assert CURL_TRACE in str(line)

    [to_hook] = otlp.named("route alerts-to-hook")
    attempts = sorted(otlp.named("POST hook"), key=lambda s: _attrs(s)["gateway.attempt"])
    assert [_attrs(s)["gateway.attempt"] for s in attempts] == [1, 2, 3]
    for s in attempts:
        a = _attrs(s)
        assert by_id[s.parent_span_id.hex()] is to_hook and s.kind == Span.SPAN_KIND_CLIENT
        assert a["http.request.method"] == "POST" and a["url.path"] == "/in"
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == sink.port
        assert a["http.response.status_code"] == 503 and a["error.type"] == "transient"
        assert s.status.code == s.status.STATUS_CODE_ERROR
    assert [[e.name for e in s.events] for s in attempts] == [["gateway.retry"], ["gateway.retry"],
                                                              ["gateway.dead_letter"]]
    dead = {a.key: _value(a.value) for a in attempts[-1].events[0].attributes}
    assert dead["reason"] == "attempts" and "503" in dead["error"]
    assert sink.requests == 3

    # The delivery histogram's exemplars point into the trace.
    exemplars = [line for line in metrics.splitlines()
                 if line.startswith("gateway_delivery_duration_seconds_bucket") and "# {" in line]
    assert exemplars and all(f'trace_id="{CURL_TRACE}"' in line for line in exemplars)


async def test_with_tracing_off_nothing_is_exported(tmp_path: Path) -> None:
    async with _gateway(tmp_path, False) as (gw, otlp, _sink, admin, api):
        await _post(api, "/events", CURL_SPAN)
        await wait_for(lambda: jsonl(tmp_path / "events.jsonl"), what="the file delivery")
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{admin}/metrics",
                headers={"accept": "application/openmetrics-text; version=1.0.0"}) as r:
            metrics = await r.text()
        assert await gw.terminate() == 0  # a gateway with spans would export them on the way out
    assert otlp.requests == 0 and not otlp.spans
    assert "trace_id=" not in metrics
    # The context is still carried: the file line has curl's trace.
    [line] = jsonl(tmp_path / "events.jsonl")
    assert CURL_TRACE in str(line)


def test_enabled_without_the_otel_extra_the_gateway_says_what_to_install_and_exits_1(tmp_path: Path) -> None:
    # A directory first on the path whose opentelemetry.sdk cannot be imported: as if the extra
    # were not installed (opentelemetry is a namespace package: the first portion found wins).
    shadow = tmp_path / "shadow" / "opentelemetry" / "sdk"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no sdk here', name='opentelemetry.sdk')\n")
    config = tmp_path / "routes.yaml"
    config.write_text(textwrap.dedent(f"""\
        gateway:
          admin: {{listen: "127.0.0.1:{free_port()}"}}
          spool: {{path: "{tmp_path / 'spool.db'}", min_free_bytes: 0}}
          state_dir: "{tmp_path / 'state'}"
          tracing: {{enabled: true}}
        connectors:
          api: {{type: rest, listen: "127.0.0.1:{free_port()}", auth: {{type: none}}}}
          events: {{type: file, path: "{tmp_path / 'events.jsonl'}"}}
        routes:
          - {{name: r, from: api, to: [{{connector: events}}]}}
        """))
    path = os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(config)], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": path}, check=False)
    assert r.returncode == 1
    assert "pip install 'gateway[otel]'" in r.stdout + r.stderr
