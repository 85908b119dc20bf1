"""Fault injection for tests: a TCP proxy, and an HTTP sink that records and fails on command.

:class:`FaultProxy` goes between the gateway and a peer on 127.0.0.1.

toxiproxy cannot be installed here and ``tc netem`` is not available, so this is ours. Faults
are plain attributes, switched at any moment while traffic flows:

``latency``
    seconds added before every chunk is forwarded, both directions.
``refuse``
    new connections are accepted and reset at once (the peer "is down" though the port is open).
``blackhole``
    half-open sockets: connections stay open, nothing is forwarded either way, nothing closes;
    the client only learns from its own timeout. Applies to open connections too.
``drop_after``
    forward at most this many bytes from the client on each new connection, then reset both
    sides mid-stream (a request cut in half).

:meth:`FaultProxy.cut` resets every open connection now. :meth:`FaultProxy.heal` clears all
faults. Counters (``connections``, ``resets``, ``bytes_up``, ``bytes_down``) show what happened.

    async with FaultProxy("127.0.0.1", sink_port) as proxy:
        proxy.refuse = True        # the gateway now sees connection resets
        ...
        proxy.heal()

:class:`HttpSink` is the outbound peer of the durability and crash tests: it counts every
message it accepted by the ``id`` in its JSON body (and the ``Idempotency-Key`` header), and
answers ``status`` (503, 400, ...) instead of 200, or hangs, when told to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections import Counter
from types import TracebackType

from aiohttp import web


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port
        self.latency = 0.0
        self.refuse = False
        self.blackhole = False
        self.drop_after: int | None = None
        self.connections = 0
        self.resets = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def heal(self) -> None:
        self.latency = 0.0
        self.refuse = self.blackhole = False
        self.drop_after = None

    def cut(self) -> None:
        """Reset every open connection (RST, not FIN: the peer sees ECONNRESET)."""
        for client, upstream in list(self._open):
            _reset(client)
            if upstream is not None:
                _reset(upstream)
        self._open.clear()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            await self._serve(creader, cwriter)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)

    async def _serve(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        if self.refuse:
            _reset(cwriter)
            self.resets += 1
            return
        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(cwriter)
            self.resets += 1
            return
        pair = (cwriter, uwriter)
        self._open.add(pair)
        budget = [self.drop_after]
        up = asyncio.ensure_future(self._pipe(creader, uwriter, budget, upstream=True))
        down = asyncio.ensure_future(self._pipe(ureader, cwriter, [None], upstream=False))
        try:
            # Each direction ends on its own EOF; a reset in either one ends both.
            _, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            for t in pending:
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            if pair in self._open:
                self._open.discard(pair)
                for w in pair:
                    with contextlib.suppress(Exception):
                        w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget: list[int | None],
                    *, upstream: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                if not self.blackhole:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            if self.blackhole:
                continue  # swallowed: the sender believes it went out, nobody answers
            if self.latency:
                await asyncio.sleep(self.latency)
            left = budget[0]
            if left is not None and len(data) >= left:
                writer.write(data[:left])
                await writer.drain()
                self.resets += 1
                self.cut_pair_of(writer)
                return
            if left is not None:
                budget[0] = left - len(data)
            writer.write(data)
            await writer.drain()
            if upstream:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)

    def cut_pair_of(self, writer: asyncio.StreamWriter) -> None:
        for pair in list(self._open):
            if writer in pair:
                self._open.discard(pair)
                for w in pair:
                    if w is not None:
                        _reset(w)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class HttpSink:
    """An HTTP peer on 127.0.0.1 that records what it accepts and fails when told to."""

    def __init__(self) -> None:
        #: Answer this instead of 200 (and record nothing); 0 or 200 = accept.
        self.status = 200
        #: Ids answered with 400 (a permanent failure for the gateway) even when healthy.
        self.reject_ids: set[str] = set()
        #: Hold every request open until this is cleared.
        self.hang = False
        self.counts: Counter[str] = Counter()
        self.keys: Counter[str] = Counter()
        self.paths: list[str] = []
        self.requests = 0
        self.inflight = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> HttpSink:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> HttpSink:
        return await self.start()

    async def __aexit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def got(self, ident: str) -> bool:
        return self.counts[ident] > 0

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.counts.values() if n > 1)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.inflight += 1
        try:
            for _ in range(36_000):  # bounded: at most an hour
                if not self.hang:
                    break
                await asyncio.sleep(0.1)
            body = await request.read()
            if self.status not in (0, 200):
                return web.Response(status=self.status, text="sink told to fail")
            try:
                ident = str(json.loads(body)["id"])
            except (ValueError, KeyError, TypeError):
                ident = body.decode("utf-8", "replace")
            if ident in self.reject_ids:
                return web.Response(status=400, text="sink rejects this one")
            self.counts[ident] += 1
            self.keys[request.headers.get("Idempotency-Key", "")] += 1
            self.paths.append(request.path)
            return web.json_response({"ok": True})
        finally:
            self.inflight -= 1
