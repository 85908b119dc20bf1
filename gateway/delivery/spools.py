"""Which spool backend ``gateway.spool`` asks for: the SQLite file (the default) or RabbitMQ.

The choice lives here, above both backends, because the RabbitMQ spool subclasses the SQLite
one: a factory inside the SQLite package would have to import its own subclass.
"""

from __future__ import annotations

from typing import Any

from gateway.delivery.spool import Spool
from gateway.delivery.store import SpoolBackend

__all__ = ["make_spool"]


def make_spool(settings: Any) -> SpoolBackend:
    """The spool ``gateway.spool`` asks for: SQLite (the default) or RabbitMQ (``type: rabbitmq``)."""
    kind = getattr(settings, "type", "sqlite")
    if kind == "rabbitmq":
        # aio_pika is loaded only by the gateways that use it
        from gateway.delivery.rabbit import RabbitSpool

        return RabbitSpool.from_settings(settings)
    return Spool(settings.path, min_free_bytes=settings.min_free_bytes)
