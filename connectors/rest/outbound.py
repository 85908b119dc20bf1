"""The REST connector's outbound side: HTTP requests sent with aiohttp.

:class:`RestOutbound` keeps one client session (connection pool, TLS settings, timeout), sends a
route's request to ``base_url`` + the rendered path and query, and turns the answer into a reply
or a transient or permanent error. The status classes are described in :mod:`connectors.rest`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from connectors.rest.config import RestConfig, RestTarget
from connectors.rest.mapping import request_headers
from gateway.sdk import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Envelope,
    PermanentError,
    Reply,
    Target,
    TransientError,
    basic_authorization,
    current_secret,
)

__all__ = ["RestOutbound"]


class RestOutbound(Connector):
    """The client session and the requests sent on it."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, RestConfig)
        self.cfg = config
        self._session: aiohttp.ClientSession | None = None

    async def _open_session(self) -> None:
        if self.cfg.base_url and self._session is None:
            ssl: Any = None
            if not self.cfg.verify_tls:
                ssl = False
            elif self.cfg.ca_file:
                import ssl as ssl_mod

                ssl = ssl_mod.create_default_context(cafile=self.cfg.ca_file)
            connector = aiohttp.TCPConnector(limit=self.cfg.max_connections, ssl=ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout), auto_decompress=True)

    async def _close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        if not self.cfg.base_url:
            raise PermanentError(f"connector {self.name!r} has no base_url to send to")
        if self._session is None:
            await self._open_session()
        assert self._session is not None
        opts = target.options
        assert isinstance(opts, RestTarget)
        url = self.cfg.base_url + _safe_path(opts.path)
        if opts.query:
            url += "?" + urlencode(opts.query)
        headers = request_headers(env, opts.headers)
        oa = self.cfg.outbound_auth
        if oa is not None:
            # read per request: a token renewed in its file is used from the next request on
            if oa.type == "bearer" and oa.token is not None:
                headers["Authorization"] = f"Bearer {current_secret(oa.token)}"
            elif oa.type == "basic":  # not aiohttp's BasicAuth: deprecated
                headers["Authorization"] = basic_authorization(oa.username or "", current_secret(oa.password) or "")
        body = env.body if opts.method != "GET" else None
        try:
            async with self._session.request(opts.method, url, data=body, headers=headers,
                                             allow_redirects=False) as resp:
                data = await resp.content.read(16 * 1024 * 1024 + 1)
                status = resp.status
                ctype = resp.headers.get("content-type", "application/octet-stream")
        except TimeoutError as exc:
            raise TransientError(f"{opts.method} {_redact(url)}: timed out", code=504,
                                 detail={"message": "the upstream service did not answer in time"}) from exc
        except aiohttp.ClientError as exc:
            raise TransientError(f"{opts.method} {_redact(url)}: {type(exc).__name__}: {exc}", code=503,
                                 detail={"message": "the upstream service cannot be reached"}) from exc
        if len(data) > 16 * 1024 * 1024:
            raise PermanentError(f"{opts.method} {_redact(url)}: reply larger than 16 MiB")
        if 200 <= status < 300:
            return Reply(body=data, content_type=ctype, status=status)
        snippet = data[:300].decode("utf-8", errors="replace")
        detail = {"status": status, "body": snippet, "message": f"the upstream service answered HTTP {status}"}
        if status in (408, 429) or status >= 500:
            raise TransientError(f"{opts.method} {_redact(url)}: HTTP {status}", detail=detail,
                                 code=502 if status >= 500 else 503)
        raise PermanentError(f"{opts.method} {_redact(url)}: HTTP {status}", detail=detail, code=status)


def _safe_path(path: str) -> str:
    """Percent-encode each segment of a rendered path so a value cannot add a host or a query."""
    if not path.startswith("/"):
        path = "/" + path
    segments = path.split("/")
    if any(s in ("..", ".") for s in segments):
        raise PermanentError(f"rendered path {path!r} contains '.' or '..' segments")
    return "/".join(quote(s, safe="@:!$&'()*+,;=-._~%") for s in segments)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"
