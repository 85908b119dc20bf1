"""The file connector's configuration: its options and a route target's (see :mod:`connectors.file`)."""

from __future__ import annotations

from typing import Literal

from gateway.sdk import ByteSize, ConnectorConfig, TargetOptions

__all__ = ["FileConfig", "FileTarget"]


class FileConfig(ConnectorConfig):
    type: Literal["file"] = "file"
    path: str
    max_bytes: ByteSize = 100 * 1024 * 1024
    keep: int = 5
    fsync: bool = True


class FileTarget(TargetOptions):
    format: Literal["envelope", "body"] = "envelope"
