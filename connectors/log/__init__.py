"""log — write each message to the gateway's log as one structured event.

Features: outbound only; event ``message.logged`` with envelope id, source, subject, content
type and size; the body too when ``body: true`` (logged at the configured level — mind that
bodies may hold personal data). Delivery guarantee: delivered once the log call returned.

Parts: ``config.py`` holds the options; the sending is in this module. Outbound only, so no
``inbound.py``; one log call is all it does, so no ``outbound.py`` or ``mapping.py``.
"""

from __future__ import annotations

import logging

from connectors.log.config import LogConfig, LogTarget
from gateway.sdk import Connector, Envelope, Reply, Target, event

__all__ = ["LogConfig", "LogConnector", "LogTarget"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogConnector(Connector):
    kind = "log"
    Config = LogConfig
    Options = LogTarget
    supports_outbound = True

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        cfg = self.config
        assert isinstance(cfg, LogConfig)
        opts = target.options
        assert isinstance(opts, LogTarget)
        fields: dict[str, object] = {
            "envelope_id": env.id, "route": target.route, "source": env.source, "subject": env.subject,
            "content_type": env.content_type, "bytes": len(env.body),
        }
        if opts.message:
            fields["message"] = opts.message
        if cfg.body:
            fields["body"] = env.text
        event(self.log, "message.logged", _LEVELS[cfg.level], **fields)
        return None
