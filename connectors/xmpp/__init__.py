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
import itertools
import logging
import random
import ssl
from typing import Any

from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Iq, Message, Presence
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from connectors.xmpp.mapping import (
    Incoming,
    XmppConfig,
    XmppTarget,
    incoming,
    outgoing_text,
    parse_jid,
    to_envelope,
)
from connectors.xmpp.stream import AckWindow, HardenedClient
from gateway.contract import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Deliver,
    Health,
    Outcome,
    PermanentError,
    Reply,
    Status,
    Target,
    TransientError,
)
from gateway.envelope import Envelope
from gateway.logs import event

__all__ = ["XmppConfig", "XmppConnector", "XmppTarget"]

_KEEPALIVE = 60.0
_KEEPALIVE_TIMEOUT = 20.0


class XmppConnector(Connector):
    kind = "xmpp"
    Config = XmppConfig
    Options = XmppTarget
    supports_inbound = True
    supports_outbound = True
    subject_syntax = "glob"

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, XmppConfig)
        self.cfg = config
        self.jid = JID(config.jid)
        self.host = config.host or self.jid.domain
        self.port = config.port or (5223 if config.tls == "direct" else 5222)
        self._rooms = frozenset(config.rooms)
        self._client: HardenedClient | None = None
        self._online = asyncio.Event()
        #: Set when an attempt failed for a reason waiting will not fix (auth, TLS, hostile XML).
        self._failed = asyncio.Event()
        self._error = "not connected yet"
        self._closing = False
        self._delay = 1.0
        self._rng = random.Random()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keeper: asyncio.Task[None] | None = None
        self._joined: set[str] = set()
        # inbound
        self._deliver: Deliver | None = None
        self._listening = False
        self._acks = AckWindow()
        self._acked = -1
        self._parked: list[tuple[Incoming, int | None, AckWindow]] = []
        self._inflight = 0
        self._paused = False
        # outbound
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)

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
        loop = asyncio.get_running_loop()
        end = loop.time() + drain
        while self._inflight and loop.time() < end:
            await asyncio.sleep(0.02)
        self._send_ack()

    async def close(self) -> None:
        self._closing = True
        self._listening = False
        self._fail_waiting("the connector is closing")
        client, self._client = self._client, None
        # Messages whose outcome did not come in time stay unacknowledged: the server keeps them.
        tasks = [*self._tasks, *([self._keeper] if self._keeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keeper = None
        if client is not None:
            client.cancel_connection_attempt()
            if client.transport is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(wait=1.0), timeout=3.0)
            if client.transport is not None:
                client.abort()
            # slixmpp leaves its send-queue task to __del__, which cancels it too late to finish.
            runner = getattr(client, "_run_out_filters", None)
            if runner is not None and not runner.done():
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
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

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        self._delay = 1.0
        event(self.log, "xmpp.connected", connector=self.name, jid=str(client.boundjid),
              stream_management=bool(client.plugin["xep_0198"].enabled_out))
        if self._listening:
            await self._go_available()
        elif self._rooms:
            await self._join_rooms()
        self._online.set()

    async def _go_available(self) -> None:
        client = self._client
        if client is None:
            return
        client.send_presence()
        await self._join_rooms()

    async def _join_rooms(self) -> None:
        client = self._client
        if client is None:
            return
        for room in self._rooms - self._joined:
            try:
                await client.plugin["xep_0045"].join_muc_wait(JID(room), self.cfg.nick, maxstanzas=0,
                                                              timeout=self.cfg.connect_timeout)
                self._joined.add(room)
            except Exception as exc:
                event(self.log, "xmpp.room_join_failed", logging.WARNING, connector=self.name, room=room,
                      error=f"{type(exc).__name__}: {exc}")

    def _on_sm_enabled(self, _: Any) -> None:
        # A fresh window per stream: outcomes still due from an older stream settle there, harmlessly.
        self._acks = AckWindow()
        self._acked = -1

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
        delay = self._delay * (0.5 + self._rng.random() / 2)
        self._delay = min(30.0, self._delay * 2)
        self._spawn(self._reconnect(delay), f"xmpp-{self.name}-reconnect")

    async def _reconnect(self, delay: float) -> None:
        await asyncio.sleep(delay)
        client = self._client
        if client is not None and not self._closing and client.transport is None:
            client.connect(self.host, self.port)

    def _on_connection_failed(self, error: Any) -> None:
        self._error = f"cannot connect: {error}"

    def _on_auth_failed(self, _: Any) -> None:
        self._error = "authentication failed (check jid and password)"
        self._failed.set()
        event(self.log, "xmpp.auth_failed", logging.ERROR, connector=self.name, jid=self.jid.bare)

    def _on_tls_failed(self, error: Any) -> None:
        self._error = f"TLS failed: {error}"
        self._failed.set()
        event(self.log, "xmpp.tls_failed", logging.ERROR, connector=self.name, error=str(error))
        if self._client is not None:
            self._client.abort()

    def _on_stream_error(self, error: Any) -> None:
        condition = error["condition"] if error is not None else ""
        self._error = f"stream error from the server: {condition}"
        event(self.log, "xmpp.stream_error", logging.WARNING, connector=self.name, condition=condition)

    def _on_refused(self, condition: str, text: str) -> None:
        self._error = f"refused the server's stream: {text}"
        self._failed.set()
        event(self.log, "xmpp.hostile_input", logging.ERROR, connector=self.name, condition=condition, error=text)

    async def _keepalive(self) -> None:
        """Ping the server now and then; no answer means a dead connection: drop it, reconnect."""
        while True:
            await asyncio.sleep(_KEEPALIVE)
            client = self._client
            if client is None or not self._online.is_set():
                continue
            try:
                await client.plugin["xep_0199"].ping(jid=JID(self.jid.domain), timeout=_KEEPALIVE_TIMEOUT)
            except IqError:
                pass  # an answer, even an error, proves the stream is alive
            except IqTimeout:
                event(self.log, "xmpp.keepalive_timeout", logging.WARNING, connector=self.name)
                if client.transport is not None:
                    client.abort()

    # --- inbound -------------------------------------------------------------------------

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
        self._inflight += 1
        if self._inflight >= self.cfg.max_inflight:
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
            self._inflight -= 1
            if self._inflight < self.cfg.max_inflight:
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

    # --- outbound ------------------------------------------------------------------------

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        opts = target.options
        assert isinstance(opts, XmppTarget)
        try:
            to = parse_jid(opts.to, what="recipient")
            text = outgoing_text(env.body, self.cfg.max_body)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        if opts.type == "groupchat":
            if to.bare not in self._rooms:
                raise PermanentError(f"room {to.bare!r} is not in this connector's rooms {sorted(self._rooms)}")
            if to.bare not in self._joined:
                raise TransientError(f"room {to.bare!r} is not joined (yet)")
            to = JID(to.bare)
        client = self._client
        if client is None or not self._online.is_set():
            raise TransientError(f"XMPP server {self.host}:{self.port}: {self._error or 'not connected'}")
        stanza_id = f"{env.id}.{next(self._ids)}"
        msg = client.make_message(mto=to, mbody=text, msubject=opts.subject, mtype=opts.type)
        msg["id"] = stanza_id
        sm = client.plugin["xep_0198"]
        try:
            if sm.enabled_out:
                acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiting[stanza_id] = acked
                msg.send()
                client.send(sm_stanza.RequestAck(client))  # queued behind the message
                await asyncio.wait_for(acked, timeout=self.cfg.ack_timeout)
            else:
                msg.send()
                # The server handles our stanzas in order: its answer to this ping means it has
                # taken the message before it.
                await client.plugin["xep_0199"].ping(jid=JID(self.jid.domain), timeout=self.cfg.ack_timeout)
        except IqError:
            pass
        except (TimeoutError, IqTimeout) as exc:
            raise TransientError(f"the XMPP server did not acknowledge the message within "
                                 f"{self.cfg.ack_timeout:g}s") from exc
        finally:
            self._waiting.pop(stanza_id, None)
        event(self.log, "xmpp.sent", logging.DEBUG, envelope_id=env.id, connector=self.name, to=str(to),
              route=target.route)
        return None

    def _on_acked(self, stanza: Any) -> None:
        waiter = self._waiting.get(stanza["id"]) if isinstance(stanza, Message) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_waiting(self, why: str) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(TransientError(why))
        # The waiters stay in the dict until their send() pops them.

    def _on_bounce(self, msg: Any) -> None:
        stanza_id = str(msg["id"] or "")
        envelope_id, dot, _ = stanza_id.partition(".")
        if not dot:
            return
        event(self.log, "xmpp.bounced", logging.WARNING, envelope_id=envelope_id, connector=self.name,
              recipient=str(msg["from"]), condition=msg["error"]["condition"], text=msg["error"]["text"])
