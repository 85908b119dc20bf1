"""xmpp — chat messages in and out over XMPP (slixmpp), one client connection per connector.

Features
  Outbound: a chat (or ``normal``/``headline``) message to a JID, or a ``groupchat`` message to
  a multi-user chat room listed in ``rooms`` (joined at connect, without history). The body is
  the envelope body as UTF-8 text (template it with the route's ``body:``); ``to`` and
  ``subject`` are templates, and a value substituted into ``to`` may not contain ``@``, ``/``,
  quotes, ``:``, ``<``, ``>``, ``&``, spaces or control characters (it cannot move the message
  to another domain). Inbound: chat/normal messages to the gateway's JID and messages in the
  joined rooms (not our own echo, not room history) become envelopes. TLS is always on:
  STARTTLS (required, no plain fallback) or direct TLS; the server certificate is verified
  (``ca_file`` to trust a private CA); the password is a secret. Reconnects with backoff and
  jitter; an XMPP ping every 60 s notices a dead connection. The stream is parsed with DTDs and
  entities forbidden and the stanza size and depth bounded (see :mod:`connectors.xmpp.stream`).
  The W3C trace context travels as XEP-0131 (SHIM) stanza headers ``traceparent``/``tracestate``
  both ways (envelope attributes of the same names inside).

Delivery guarantee
  Outbound: delivered means the server acknowledged the stanza — a XEP-0198 stream-management
  ``<a/>`` covering it when the server supports stream management (Prosody ≥ 0.12 ships
  mod_smacks), otherwise the answer to an XMPP ping sent right after it on the same stream
  (servers handle a client's stanzas in order). No acknowledgement within ``ack_timeout``, or
  the connection lost before it → transient (retried: the recipient may see a duplicate). A
  JID that does not parse, a body that is not UTF-8 text, over ``max_body`` or with characters
  XML cannot carry, or a room not in ``rooms`` → permanent. The server accepting a stanza is
  not the recipient reading it: a later bounce (e.g. ``service-unavailable``) is logged as
  ``xmpp.bounced`` with the envelope id.
  Inbound: XMPP has no per-message acknowledgement, so the outcome is answered this way:
  accepted / dead-lettered / dropped → a XEP-0184 receipt when the sender asked for one;
  retry → a message error ``wait``/``resource-constraint`` (the sender should resend);
  rejected (also: over ``max_body``) → an error ``modify``/``not-acceptable``; the error text
  carries the reason.
  With stream management the gateway acknowledges a stanza to the server only after its
  outcome was answered, so a chat message that was in flight when the gateway died stays with
  the server, which stores it offline and delivers it again at the next login (at least once).
  Room (groupchat) messages have no sender to answer and no offline storage: a retry or
  rejection is logged as ``xmpp.refused``, and one in flight during a crash is lost — rooms are
  at most once. Run one connection per JID (replicas sharing a JID would each get the chat).

Address form
  ``jid: gateway@example.com`` (+ ``password``), ``host``/``port`` to override the server
  address. Targets: ``to: ops@example.com`` or ``to: alerts@conference.example.com`` with
  ``type: groupchat``.

Envelope (inbound)
  ``subject`` = the conversation: the sender's bare JID (chat) or the room's JID (groupchat);
  ``reply_to`` the same; ``body`` = the message text (UTF-8), ``content_type`` =
  ``content_type`` of the connector (``text/plain; charset=utf-8``). Attributes:
  ``xmpp.from`` (sender bare JID, or the room), ``xmpp.from_full``, ``xmpp.to``, ``xmpp.type``,
  ``xmpp.id`` (stanza id), and when present ``xmpp.thread``, ``xmpp.subject``, ``xmpp.room``,
  ``xmpp.nick`` (the sender's nick in the room), ``xmpp.delayed`` (offline-storage timestamp).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from connectors.xmpp.config import XmppConfig, XmppTarget
from connectors.xmpp.inbound import XmppInbound
from connectors.xmpp.outbound import XmppOutbound
from connectors.xmpp.stream import AckWindow, HardenedClient
from gateway.sdk import Deliver, Health, TransientError, cancel_and_wait, event, within

#: How long closing waits for the connector's tasks to end after cancelling them.
_STOP_WAIT = 5.0

__all__ = ["XmppConfig", "XmppConnector", "XmppTarget"]


# The inbound side (inbound.py) and the outbound side (outbound.py) both build on the connection
# (connection.py). This class adds the lifecycle and the slixmpp client, whose session start and
# disconnect touch all three.
class XmppConnector(XmppInbound, XmppOutbound):
    kind = "xmpp"
    Config = XmppConfig
    Options = XmppTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait up to ``connect_timeout`` for the session; the client keeps trying
        in the background after a TransientError, so a later ``open`` just waits again."""
        if self._client is None:
            self._closing = False
            self._client = self._make_client()
            self._client.connect(self.host, self.port)
            self._keeper = asyncio.create_task(self._keepalive(), name=f"xmpp-{self.name}-keepalive")
        if self._online.is_set():
            return
        self._failed.clear()
        waits = [asyncio.ensure_future(self._online.wait()), asyncio.ensure_future(self._failed.wait())]
        try:
            await asyncio.wait(waits, timeout=self.cfg.connect_timeout + 1, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self._online.is_set():
            raise TransientError(f"XMPP server {self.host}:{self.port}: {self._error}")

    async def listen(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._listening = True
        parked, self._parked = self._parked, []
        for inc, seq, window in parked:
            self._take(inc, seq, window, deliver)
        if self._online.is_set():
            await self._go_available()

    async def stop_listening(self, drain: float) -> None:
        """Become unavailable (the server stops routing chat to us and stores it offline), wait
        up to ``drain`` for outcomes in flight, then acknowledge what was answered."""
        if not self._listening:
            return
        self._listening = False
        client = self._client
        if client is not None and self._online.is_set():
            client.send_presence(ptype="unavailable")
        await self._inflight.drained(drain)
        self._send_ack()

    async def close(self) -> None:
        self._closing = True
        self._listening = False
        self._fail_waiting("the connector is closing")
        client, self._client = self._client, None
        # Messages whose outcome did not come in time stay unacknowledged: the server keeps them.
        # Every wait is bounded, whatever slixmpp does with a cancellation: close must end.
        tasks = [*self._tasks, *([self._keeper] if self._keeper else [])]
        stuck = await cancel_and_wait(tasks, _STOP_WAIT)
        self._keeper = None
        if client is not None:
            client.cancel_connection_attempt()
            if client.transport is not None:
                with contextlib.suppress(Exception):  # disconnect() itself may raise on a broken stream
                    await within(client.disconnect(wait=1.0), 3.0)
            if client.transport is not None:
                client.abort()
            # slixmpp leaves its send-queue task to __del__, which cancels it too late to finish.
            runner = getattr(client, "_run_out_filters", None)
            if runner is not None and not runner.done():
                stuck |= await cancel_and_wait({runner}, _STOP_WAIT)
        if stuck:
            event(self.log, "xmpp.stop_timeout", logging.WARNING, connector=self.name, tasks=len(stuck))
        self._online.clear()
        self._joined.clear()
        self._error = "closed"

    def health(self) -> Health:
        if self._online.is_set():
            return Health(True)
        return Health(False, self._error)

    # --- the client ------------------------------------------------------------------------

    def _make_client(self) -> HardenedClient:
        cfg = self.cfg
        c = HardenedClient(cfg.jid, cfg.password.get_secret_value(), max_stanza=cfg.max_stanza,
                           on_refused=self._on_refused)
        c.enable_direct_tls = cfg.tls == "direct"
        c.enable_starttls = cfg.tls == "starttls"
        c.enable_plaintext = False
        c.ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.ca_file:
            c.ssl_context.load_verify_locations(cfg.ca_file)
        c.register_plugin("xep_0030")
        # send() asks for the ack itself, after its stanza (the plugin's own request goes out before it).
        c.register_plugin("xep_0198", {"allow_resume": False, "window": 2**31})
        c.register_plugin("xep_0199")
        c.register_plugin("xep_0203")
        c.register_plugin("xep_0184", {"auto_ack": False, "auto_request": False})
        if self._rooms:
            c.register_plugin("xep_0045")
        sm = c.plugin["xep_0198"]
        # Count incoming stanzas ourselves: a message is acknowledged only once its outcome is.
        c.del_filter("in", sm._handle_incoming)
        c.add_filter("in", self._on_stanza)
        c.remove_handler("Stream Management Request Ack")
        c.register_handler(Callback("Gateway SM Request Ack", MatchXPath(sm_stanza.RequestAck.tag_name()),
                                    self._on_ack_request, instream=True))
        c.add_event_handler("session_start", self._on_session_start)
        c.add_event_handler("sm_enabled", self._on_sm_enabled)
        c.add_event_handler("stanza_acked", self._on_acked)
        c.add_event_handler("message_error", self._on_bounce)
        c.add_event_handler("disconnected", self._on_disconnected)
        c.add_event_handler("connection_failed", self._on_connection_failed)
        c.add_event_handler("failed_all_auth", self._on_auth_failed)
        c.add_event_handler("ssl_invalid_chain", self._on_tls_failed)
        c.add_event_handler("stream_error", self._on_stream_error)
        return c

    async def _on_session_start(self, _: Any) -> None:
        client = self._client
        if client is None:
            return
        if client.transport is None or client.transport.get_extra_info("ssl_object") is None:
            # enable_plaintext=False already prevents this; never carry on unencrypted.
            self._error = "the stream is not encrypted"
            client.abort()
            return
        client.end_session_on_disconnect = True  # no resumption: a new connection is a new session
        self._error = ""
        self._reconnects.reset()
        event(self.log, "xmpp.connected", connector=self.name, jid=str(client.boundjid),
              stream_management=bool(client.plugin["xep_0198"].enabled_out))
        if self._listening:
            await self._go_available()
        elif self._rooms:
            await self._join_rooms()
        self._online.set()

    def _on_disconnected(self, reason: Any) -> None:
        was_online = self._online.is_set()
        self._online.clear()
        self._joined.clear()
        self._acks = AckWindow()
        self._parked.clear()  # never acknowledged: the server keeps them and offers them again
        self._acked = -1
        self._fail_waiting("the connection was lost before the server acknowledged the message")
        if not self._error or was_online:
            self._error = f"disconnected: {reason or 'connection closed'}"
        if was_online and not self._closing:
            event(self.log, "xmpp.disconnected", logging.WARNING, connector=self.name, reason=str(reason or ""))
        if self._closing or self._client is None:
            return
        self._spawn(self._reconnect(self._reconnects.next()), f"xmpp-{self.name}-reconnect")
