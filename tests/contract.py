"""The shared contract every connector is held to. A connector's test module subclasses
:class:`OutboundContract` and/or :class:`InboundContract`, fills in how to reach its real peer,
and inherits these tests. The run against the real peer is the one that counts.

Outbound: ``send`` delivers the body to the peer; a peer that is down is a ``TransientError``
(retried), never another exception; lifecycle calls are idempotent; config and target options
refuse unknown keys.

Inbound: a message the router accepts is acknowledged on the wire; a RETRY outcome is answered
with the protocol's temporary failure and the message is offered again; a REJECTED one gets the
permanent failure; the envelope names its source connector and protocol.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.contract import (
    Connector,
    ConnectorContext,
    Health,
    Outcome,
    PermanentError,
    Status,
    Target,
    TransientError,
)
from gateway.envelope import Envelope
from gateway.http import HttpHub
from gateway.registry import Registry


def make_connector(kind: str, raw: dict[str, Any], tmp_path: Path, hub: HttpHub | None = None,
                   name: str = "under-test") -> Connector:
    cls = Registry().get(kind)
    ctx = ConnectorContext(name=name, logger=logging.getLogger(f"test.{name}"),
                           http=hub or HttpHub(logging.getLogger("test.http")), state_dir=str(tmp_path / "state"))
    return cls(cls.Config.model_validate({"type": kind, **raw}), ctx)


class ConnectorContract:
    kind: str = ""

    def config(self, tmp_path: Path) -> dict[str, Any]:
        """Raw config (without ``type``) for a connector that reaches a working peer."""
        raise NotImplementedError

    def test_kind_is_registered(self) -> None:
        cls = Registry().get(self.kind)
        assert cls.kind == self.kind

    def test_config_refuses_unknown_keys(self, tmp_path: Path) -> None:
        cls = Registry().get(self.kind)
        with pytest.raises(ValidationError) as info:
            cls.Config.model_validate({"type": self.kind, **self.config(tmp_path), "surely_not_an_option": 1})
        assert "surely_not_an_option" in str(info.value)

    async def test_open_and_close_are_idempotent(self, tmp_path: Path) -> None:
        c = make_connector(self.kind, self.config(tmp_path), tmp_path)
        await c.open()
        await c.open()
        assert isinstance(c.health(), Health)
        await c.close()
        await c.close()


class OutboundContract(ConnectorContract):
    #: The body sent; a kind whose peer takes other shapes (a SOAP operation's fields) sets its own.
    sample: bytes = b'{"contract": "delivered", "n": 1}'

    def arrived(self, sample: bytes, received: list[bytes]) -> bool:
        """True when ``sample`` is among what the peer received (in the peer's own form)."""
        return any(sample in got for got in received)

    def options(self) -> dict[str, Any]:
        """Target options that deliver to the working peer."""
        return {}

    def down_config(self, tmp_path: Path) -> dict[str, Any]:
        """Config pointing at a peer that is not there (a closed port)."""
        raise NotImplementedError

    async def received(self, tmp_path: Path) -> list[bytes]:
        """Bodies the peer has received so far."""
        raise NotImplementedError

    def target(self, options: dict[str, Any] | None = None) -> Target:
        cls = Registry().get(self.kind)
        return Target(route="contract", connector="under-test",
                      options=cls.Options.model_validate(self.options() if options is None else options))

    def test_options_refuse_unknown_keys(self) -> None:
        cls = Registry().get(self.kind)
        with pytest.raises(ValidationError):
            cls.Options.model_validate({**self.options(), "surely_not_an_option": 1})

    async def test_send_delivers_the_body(self, tmp_path: Path) -> None:
        c = make_connector(self.kind, self.config(tmp_path), tmp_path)
        await c.open()
        try:
            env = Envelope(source="test", protocol="test", subject="contract/1", body=self.sample,
                           content_type="application/json")
            await c.send(env, self.target())
            for _ in range(100):
                if self.arrived(self.sample, await self.received(tmp_path)):
                    break
                await asyncio.sleep(0.05)
            assert self.arrived(self.sample, await self.received(tmp_path))
        finally:
            await c.close()

    async def test_a_peer_that_is_down_is_a_transient_error(self, tmp_path: Path) -> None:
        c = make_connector(self.kind, self.down_config(tmp_path), tmp_path)
        try:
            try:
                await asyncio.wait_for(c.open(), timeout=10)
            except TransientError:
                return  # refusing to open is the same signal: retry later
            env = Envelope(source="test", protocol="test", subject="contract/2", body=self.sample,
                           content_type="application/json")
            with pytest.raises(TransientError):
                await asyncio.wait_for(c.send(env, self.target()), timeout=20)
        finally:
            await c.close()


class InboundContract(ConnectorContract):
    """Subclasses implement :meth:`inject`: send one message to the connector over its protocol
    and return what the sender saw (``"ack"``, ``"temporary"`` or ``"permanent"``).

    Where the protocol gives the sender no direct answer (a queue, a maildrop), :meth:`inject`
    reads it from what the peer does next (the message gone, offered again, dead-lettered);
    :attr:`delivered` holds the envelopes the connector handed over so far."""

    delivered: list[Envelope]
    #: The body injected; a kind whose protocol carries other shapes sets its own.
    sample: bytes = b'{"contract": true}'

    async def inject(self, connector: Connector, hub: HttpHub, tmp_path: Path, body: bytes) -> str:
        raise NotImplementedError

    def body_of(self, env: Envelope) -> bytes:
        """The injected body as the envelope carries it (mail kinds: the text of the message)."""
        return env.body

    async def _run(self, tmp_path: Path, status: Status) -> tuple[str, list[Envelope]]:
        hub = HttpHub(logging.getLogger("test.http"))
        c = make_connector(self.kind, self.config(tmp_path), tmp_path, hub)
        seen: list[Envelope] = []
        self.delivered = seen

        async def deliver(env: Envelope) -> Outcome:
            seen.append(env)
            return Outcome(status, env.id, reason="contract test", code=422 if status is Status.REJECTED else None,
                           retry_after=1 if status is Status.RETRY else None)

        await c.open()
        await c.listen(deliver)
        await hub.start()
        try:
            answer = await self.inject(c, hub, tmp_path, self.sample)
        finally:
            await c.stop_listening(1.0)
            await hub.stop()
            await c.close()
        return answer, seen

    async def test_accepted_is_acknowledged(self, tmp_path: Path) -> None:
        answer, seen = await self._run(tmp_path, Status.ACCEPTED)
        assert answer == "ack"
        assert seen and seen[0].source == "under-test" and seen[0].protocol == self.kind
        assert self.body_of(seen[0]) == self.sample

    async def test_retry_is_a_temporary_failure(self, tmp_path: Path) -> None:
        answer, seen = await self._run(tmp_path, Status.RETRY)
        assert answer == "temporary" and seen

    async def test_rejected_is_a_permanent_failure(self, tmp_path: Path) -> None:
        answer, seen = await self._run(tmp_path, Status.REJECTED)
        assert answer == "permanent" and seen


__all__ = ["InboundContract", "OutboundContract", "PermanentError", "make_connector"]
