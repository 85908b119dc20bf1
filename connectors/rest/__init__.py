"""rest — HTTP in (a lean ASGI app on the shared data-plane listener) and HTTP out (aiohttp).

Inbound
  Address: ``listen: "0.0.0.0:8080"`` plus ``endpoints`` (path globs and methods). The envelope
  subject is the request path; attributes carry method, query, peer; ``x-*`` and ``ce-*``
  request headers become envelope headers (never ``authorization`` or cookies). JSON, text and
  binary bodies pass as they came; CloudEvents in binary (``ce-*`` headers) and structured
  (``application/cloudevents+json``) mode become envelopes with the event's id. A valid
  ``traceparent``/``tracestate`` becomes the envelope's trace context (attributes of the same
  names); answers carry the gateway's own ``traceparent``; requests sent carry the attempt's.
  Answers: ``202`` + ``{"id": …}`` once delivered or spooled; the reply of a request/reply route
  with its status; ``400``/``401``/``403``/``404``/``405``/``408``/``413``/``415``/``422`` as
  problem+json; ``503`` + ``Retry-After`` when the gateway cannot take responsibility now;
  ``502``/``504`` for a request/reply target's failure or timeout. Auth per connector:
  ``bearer`` tokens or an ``api_key`` header (secrets by reference), or an explicit ``none``.
  ``GET <prefix>/openapi.json`` describes the configured endpoints.
  The hot path does not go through FastAPI or pydantic: measured, the framework is the limit.

Outbound
  Address: ``base_url`` in the connector (the host is fixed in config; a route may template only
  the path and query). 2xx = delivered (the body is the reply); 408, 429, 5xx, timeouts and
  connection errors = transient; other 4xx = permanent. ``Idempotency-Key: <envelope id>`` is
  sent so receivers can deduplicate retries.

Parts
  ``config.py`` the options, ``mapping.py`` request ⇄ envelope, ``inbound.py`` the ASGI app,
  ``outbound.py`` the aiohttp client; this module the connector's lifecycle.
"""

from __future__ import annotations

from connectors.rest.config import Endpoint, InboundAuth, OutboundAuth, RestConfig, RestTarget
from connectors.rest.inbound import RestInbound, client_failure
from connectors.rest.outbound import RestOutbound
from gateway.sdk import Health

__all__ = ["Endpoint", "InboundAuth", "OutboundAuth", "RestConfig", "RestConnector", "RestTarget", "client_failure"]


# The inbound side (inbound.py) is the ASGI app; the outbound side (outbound.py) the aiohttp
# session. They share nothing but the config; this class adds the lifecycle of both.
class RestConnector(RestInbound, RestOutbound):
    kind = "rest"
    shares_inbound = True
    Config = RestConfig
    Options = RestTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    async def open(self) -> None:
        await self._open_session()

    async def close(self) -> None:
        self._unmount()
        await self._close_session()

    def health(self) -> Health:
        return Health(True)
