"""The XMPP connector's inbound side: chat and room messages to the router, answered by outcome.

:class:`XmppInbound` becomes available (presence, rooms joined) while listening, turns each
incoming message stanza into an envelope for the router (up to ``max_inflight`` at once, reading
pauses beyond; a message that arrives before listening starts is held), answers the outcome
(a receipt when the sender asked for one, or a message error), and acknowledges a stanza to the
server (XEP-0198) only once its outcome was answered. The guarantees are described in
:mod:`connectors.xmpp`.
"""

from __future__ import annotations

import logging
from typing import Any

from slixmpp.stanza import Iq, Message, Presence

from connectors.xmpp.connection import XmppConnection
from connectors.xmpp.mapping import Incoming, incoming, to_envelope
from connectors.xmpp.stream import AckWindow
from gateway.sdk import ConnectorConfig, ConnectorContext, Deliver, Envelope, InFlight, Outcome, Status, event


class XmppInbound(XmppConnection):
    """Presence, incoming messages, their answers and the stream-management acks."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self._deliver: Deliver | None = None
        self._listening = False
        self._acks = AckWindow()
        self._acked = -1
        self._parked: list[tuple[Incoming, int | None, AckWindow]] = []
        self._inflight = InFlight()
        self._paused = False

    async def _go_available(self) -> None:
        client = self._client
        if client is None:
            return
        client.send_presence()
        await self._join_rooms()

    def _on_sm_enabled(self, _: Any) -> None:
        # A fresh window per stream: outcomes still due from an older stream settle there, harmlessly.
        self._acks = AckWindow()
        self._acked = -1

    def _on_stanza(self, stanza: Any) -> Any:
        """Filter on every incoming stanza: number it, and hand chat messages to the router."""
        client = self._client
        if client is None or not isinstance(stanza, Message | Presence | Iq):
            return stanza
        counted = bool(client.plugin["xep_0198"].enabled_in)
        inc: Incoming | None = None
        if isinstance(stanza, Message):
            try:
                inc = incoming(stanza, self._rooms, self.cfg.nick)
            except Exception as exc:  # a stanza slixmpp could build but we cannot read
                event(self.log, "xmpp.unreadable_message", logging.WARNING, connector=self.name,
                      error=f"{type(exc).__name__}: {exc}")
        if inc is None:
            if counted:
                self._acks.receive(hold=False)
            return stanza
        seq = self._acks.receive(hold=True) if counted else None
        if self._listening and self._deliver is not None:
            self._take(inc, seq, self._acks, self._deliver)
        elif len(self._parked) < self.cfg.max_inflight:
            # Not listening (not yet, or stopping): held unacknowledged, so the server keeps it
            # (and stores it offline when this session ends); handed over if listening starts.
            # Beyond max_inflight it is only held, not kept in memory.
            self._parked.append((inc, seq, self._acks))
        return stanza

    def _take(self, inc: Incoming, seq: int | None, window: AckWindow, deliver: Deliver) -> None:
        self._inflight.add()
        if self._inflight.count >= self.cfg.max_inflight:
            self._pause(True)
        self._spawn(self._handle(inc, seq, window, deliver), f"xmpp-{self.name}-message")

    def _pause(self, paused: bool) -> None:
        client = self._client
        if client is None or client.transport is None or paused == self._paused:
            return
        self._paused = paused
        if paused:
            client.transport.pause_reading()
        else:
            client.transport.resume_reading()

    async def _handle(self, inc: Incoming, seq: int | None, window: AckWindow, deliver: Deliver) -> None:
        env = to_envelope(inc, source=self.name, content_type=self.cfg.content_type)
        try:
            if inc.size > self.cfg.max_body:
                event(self.log, "xmpp.too_large", logging.WARNING, envelope_id=env.id, connector=self.name,
                      sender=inc.sender_bare, size=inc.size, limit=self.cfg.max_body)
                outcome = Outcome.rejected(env.id, f"message body over {self.cfg.max_body} bytes", code=413)
            else:
                event(self.log, "xmpp.received", logging.DEBUG, envelope_id=env.id, connector=self.name,
                      sender=inc.sender_bare, type=inc.type, size=inc.size)
                outcome = await deliver(env)
            self._answer(inc, env, outcome)
        except Exception as exc:
            event(self.log, "xmpp.inbound_failed", logging.ERROR, envelope_id=env.id, connector=self.name,
                  error=f"{type(exc).__name__}: {exc}")
            self._answer(inc, env, Outcome.retry(env.id, "internal error"))
        finally:
            self._inflight.done()
            if self._inflight.count < self.cfg.max_inflight:
                self._pause(False)
            if seq is not None:
                window.settle(seq)
                self._send_ack()

    def _answer(self, inc: Incoming, env: Envelope, outcome: Outcome) -> None:
        client = self._client
        if client is None:
            return
        if outcome.acknowledge:
            if inc.wants_receipt and inc.stanza_id:
                receipt = client.make_message(mto=inc.sender)
                receipt["receipt"] = inc.stanza_id
                receipt.send()
            return
        retry = outcome.status is Status.RETRY
        event(self.log, "xmpp.refused", logging.WARNING if inc.room else logging.INFO, envelope_id=env.id,
              connector=self.name, sender=inc.sender_bare, status=outcome.status.value, reason=outcome.reason,
              answered="no (room message)" if inc.room else "message error")
        if inc.room:
            return  # a room has no sender to answer
        err = client.make_message(mto=inc.sender, mtype="error")
        if inc.stanza_id:
            err["id"] = inc.stanza_id
        err["error"]["type"] = "wait" if retry else "modify"
        err["error"]["condition"] = "resource-constraint" if retry else "not-acceptable"
        err["error"]["text"] = (outcome.reason or outcome.status.value)[:300]
        err.send()

    def _on_ack_request(self, _: Any) -> None:
        self._acked = -1  # the server asked: always answer, even if nothing changed
        self._send_ack()

    def _send_ack(self) -> None:
        client = self._client
        if client is None or client.transport is None:
            return
        sm = client.plugin["xep_0198"]
        if not sm.enabled_in:
            return
        handled = self._acks.handled
        if handled == self._acked:
            return
        self._acked = handled
        sm.handled = handled
        sm.send_ack()  # type: ignore[no-untyped-call]
