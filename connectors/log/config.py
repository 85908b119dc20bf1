"""The log connector's configuration: its options and a route target's (see :mod:`connectors.log`)."""

from __future__ import annotations

from typing import Literal

from gateway.sdk import ConnectorConfig, TargetOptions

__all__ = ["LogConfig", "LogTarget"]


class LogConfig(ConnectorConfig):
    type: Literal["log"] = "log"
    level: Literal["debug", "info", "warning", "error"] = "info"
    body: bool = False


class LogTarget(TargetOptions):
    message: str | None = None
