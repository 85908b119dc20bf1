"""log — write each message to the gateway's log as one structured event.

Features: outbound only; event ``message.logged`` with envelope id, source, subject, content
type and size; the body too when ``body: true`` (logged at the configured level — mind that
bodies may hold personal data). Delivery guarantee: delivered once the log call returned.
"""

from __future__ import annotations

import logging
from typing import Literal

from gateway.sdk import Connector, ConnectorConfig, Envelope, Reply, Target, TargetOptions, event

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogConfig(ConnectorConfig):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    body: bool = False


class LogTarget(TargetOptions):
    message: str | None = None


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
