"""The soap connector: ties the WSDL contract, the caller, the SOAP service and the REST façade."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from connectors.soap import model
from connectors.soap.client import SoapCaller, load_error
from connectors.soap.config import SoapConfig, SoapTarget
from connectors.soap.facade import RestFacade
from connectors.soap.model import MappingError
from connectors.soap.server import SoapService
from connectors.soap.wsdl import Contract, load
from gateway.sdk import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Envelope,
    Health,
    PermanentError,
    Reply,
    Target,
    event,
    is_json_type,
    tracecontext,
)

_WSDL_FETCH_LIMIT = 5 * 1024 * 1024


class SoapConnector(Connector):
    kind = "soap"
    shares_inbound = True
    Config = SoapConfig
    Options = SoapTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, SoapConfig)
        self.cfg = config
        self.contract: Contract | None = None
        self.caller: SoapCaller | None = None
        self.service: SoapService | None = None
        self.facade: RestFacade | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        async with self._lock:
            if self.contract is not None:
                return
            try:
                contract = await asyncio.to_thread(load, self.cfg.wsdl, service=self.cfg.service, port=self.cfg.port,
                                                   fetch=self._fetch)
            except Exception as exc:
                raise load_error(exc) from exc
            self.contract = contract
            self.caller = SoapCaller(self.cfg, contract, self.log, self.name)
            event(self.log, "soap.loaded", connector=self.name, service=contract.service,
                  ports=",".join(f"{p.name}(SOAP {p.version})" for p in contract.ports),
                  operations=len(contract.port(self.cfg.port).operations))

    def _fetch(self, url: str) -> bytes:
        """Fetch a configured WSDL URL (or a same-origin import of it); runs in a thread.

        requests (which zeep itself depends on) rather than aiohttp: this runs once, blocking,
        in a worker thread while zeep builds the model."""
        import requests

        verify: str | bool = self.cfg.verify_tls
        if self.cfg.verify_tls and self.cfg.ca_file:
            verify = self.cfg.ca_file
        auth = None
        if self.cfg.http_auth is not None:
            auth = (self.cfg.http_auth.username, self.cfg.http_auth.password.get_secret_value())
        with requests.Session() as session:
            session.trust_env = False
            try:
                with session.get(url, timeout=self.cfg.timeout, verify=verify, auth=auth, allow_redirects=False,
                                 stream=True) as resp:
                    if resp.status_code != 200:
                        raise OSError(f"GET {url}: HTTP {resp.status_code}")
                    chunks: list[bytes] = []
                    size = 0
                    for chunk in resp.iter_content(64 * 1024):
                        size += len(chunk)
                        if size > _WSDL_FETCH_LIMIT:
                            raise OSError(f"GET {url}: larger than {_WSDL_FETCH_LIMIT} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except requests.RequestException as exc:
                raise OSError(f"GET {url}: {type(exc).__name__}") from None

    async def listen(self, deliver: Deliver) -> None:
        if self.cfg.serve is None and self.cfg.rest_facade is None:
            raise PermanentError(f"connector {self.name!r} is used as a source but has neither 'serve' nor "
                                 "'rest_facade'")
        await self.open()
        assert self.contract is not None
        if self.cfg.serve is not None:
            if self.service is None:
                self.service = SoapService(self.name, self.contract, self.cfg.serve, self.log)
            self.service.deliver, self.service.accepting = deliver, True
            self._warn_if_open(self.cfg.serve.listen, self.cfg.serve.auth.type)
            self.ctx.http.mount(self.cfg.serve.listen, self.cfg.serve.prefix, self.service, owner=self.name)
        if self.cfg.rest_facade is not None:
            if self.facade is None:
                self.facade = RestFacade(self.name, self.contract, self.contract.port(self.cfg.port),
                                         self.cfg.rest_facade, self.log)
            self.facade.deliver, self.facade.accepting = deliver, True
            self._warn_if_open(self.cfg.rest_facade.listen, self.cfg.rest_facade.auth.type)
            self.ctx.http.mount(self.cfg.rest_facade.listen, self.cfg.rest_facade.prefix, self.facade, owner=self.name)

    def _warn_if_open(self, listen: str, auth: str) -> None:
        host = listen.rpartition(":")[0].strip("[]")
        if auth == "none" and host not in ("127.0.0.1", "::1", "localhost"):
            event(self.log, "soap.unauthenticated", logging.WARNING, connector=self.name, listen=listen,
                  hint="set auth: {type: basic, users: [...]} or {type: bearer, tokens: [...]}")

    async def stop_listening(self, drain: float) -> None:
        faces: list[SoapService | RestFacade] = [f for f in (self.service, self.facade) if f is not None]
        for face in faces:
            face.accepting = False
        loop = asyncio.get_running_loop()
        end = loop.time() + drain
        for face in faces:
            await face.inflight.drained(end - loop.time())

    async def close(self) -> None:
        if self.cfg.serve is not None:
            self.ctx.http.unmount(self.cfg.serve.listen, self.cfg.serve.prefix)
        if self.cfg.rest_facade is not None:
            self.ctx.http.unmount(self.cfg.rest_facade.listen, self.cfg.rest_facade.prefix)
        if self.caller is not None:
            await self.caller.aclose()
            self.caller = None
        self.contract = None

    def health(self) -> Health:
        if self.contract is None:
            return Health(False, "the WSDL is not loaded")
        return Health(True)

    # --- outbound ----------------------------------------------------------------------

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        if self.caller is None:
            await self.open()
        assert self.caller is not None
        opts = target.options
        assert isinstance(opts, SoapTarget)
        op = self.caller.operation(opts.operation.strip())
        if opts.input is None:
            if not is_json_type(env.content_type):
                raise PermanentError(f"{op.name} takes a JSON body (got {env.content_type}); or map one with input:",
                                     code=415)
            try:
                value: Any = model.loads(env.body)
            except MappingError as exc:
                raise PermanentError(f"the body is not JSON: {exc}", code=400) from None
            from_text = False
        elif isinstance(opts.input, str):
            try:
                value = model.loads(opts.input)
            except MappingError as exc:
                raise PermanentError(f"input: the template did not render JSON: {exc}", code=422) from None
            from_text = False
        else:
            value, from_text = opts.input, True
        payload = self.caller.build_input(op, value, from_text=from_text)
        return await self.caller.call(op, payload, within=target.timeout, reply_as=opts.reply_as,
                                      envelope_id=env.id, trace=tracecontext.outbound_fields(env))
