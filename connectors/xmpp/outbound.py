"""The XMPP connector's outbound side: send a message, wait until the server acknowledged it.

:class:`XmppOutbound` sends a chat, normal, headline or groupchat message and waits for the
server's XEP-0198 ``<a/>`` covering it (or, without stream management, the answer to a ping
sent right after it), fails the waits when the connection is lost, and logs a later bounce as
``xmpp.bounced``. The guarantees are described in :mod:`connectors.xmpp`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from slixmpp import JID
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0198 import stanza as sm_stanza
from slixmpp.stanza import Message

from connectors.xmpp.config import XmppTarget, parse_jid
from connectors.xmpp.connection import XmppConnection
from connectors.xmpp.mapping import add_trace, outgoing_text
from gateway.sdk import (
    ConnectorConfig,
    ConnectorContext,
    Envelope,
    PermanentError,
    Reply,
    Target,
    TransientError,
    event,
)


class XmppOutbound(XmppConnection):
    """Sent messages and the waits for the server's acknowledgement."""

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count(1)

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
        add_trace(msg, env)
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
