"""One IMAP session over aioimaplib: TLS (implicit or STARTTLS), login, and the few commands
the connector needs, with their answers parsed and their failures classified.

aioimaplib has no STARTTLS; :func:`_starttls` adds it (RFC 3501 §6.2.1: the capabilities are
read again over TLS, so a man in the middle cannot have removed any). Folder names are sent
quoted and, when not ASCII, in modified UTF-7 (RFC 3501 §5.1.3).
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aioimaplib

from connectors.imap.config import ImapConfig
from gateway.sdk import within

#: Response codes after which the same command may succeed later (RFC 5530).
TRANSIENT_CODES = ("UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT", "OVERQUOTA", "EXPUNGEISSUED")
_CODE = re.compile(rb"^\[([A-Z-]+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_FETCH_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")


class SessionLost(Exception):
    """The connection failed or timed out: reconnect and try again."""


class ImapRefused(Exception):
    """The server answered NO/BAD. ``transient``: the same command may succeed later."""

    def __init__(self, what: str, text: str, code: str = "") -> None:
        super().__init__(f"{what}: {text}")
        self.code = code
        self.transient = code in TRANSIENT_CODES


class LoginFailed(Exception):
    """Wrong credentials, or the server refuses to log in over this connection."""


@dataclass
class Fetched:
    uid: int
    size: int = 0
    flags: set[str] = field(default_factory=set)
    body: bytes | None = None


def utf7(name: str) -> str:
    """A mailbox name in IMAP's modified UTF-7."""
    if name.isascii():
        return name.replace("&", "&-")
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mailbox(name: str) -> str:
    return str(aioimaplib.quoted(utf7(name)))


def tls_reason(exc: ssl.SSLError) -> str:
    """``certificate verify failed: unable to get local issuer certificate`` rather than a code."""
    detail = getattr(exc, "verify_message", None)
    reason = str(exc.reason or exc)
    return f"{reason.lower().replace('_', ' ')}: {detail}" if detail else reason


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def parse_select(lines: list[Any]) -> tuple[int, int]:
    """(UIDVALIDITY, UIDNEXT) from a SELECT answer."""
    validity = nxt = None
    for line in lines:
        if not isinstance(line, bytes | bytearray):
            continue
        if (m := _UIDVALIDITY.search(line)) is not None:
            validity = int(m.group(1))
        if (m := _UIDNEXT.search(line)) is not None:
            nxt = int(m.group(1))
    if validity is None:
        raise SessionLost("SELECT answer carries no UIDVALIDITY")
    return validity, nxt or 0


def parse_search(lines: list[Any]) -> list[int]:
    """The UIDs of a UID SEARCH answer (the last line is the tagged status text)."""
    uids: list[int] = []
    for line in lines[:-1]:
        if isinstance(line, bytes | bytearray):
            words = bytes(line).split()
            if words and words[0] == b"SEARCH":
                words = words[1:]
            uids.extend(int(w) for w in words if w.isdigit())
    return sorted(set(uids))


def parse_fetch(lines: list[Any]) -> dict[int, Fetched]:
    """UID → what a UID FETCH returned; unsolicited FETCH lines without a UID are skipped."""
    out: dict[int, Fetched] = {}
    current: Fetched | None = None
    for line in lines:
        if isinstance(line, bytearray):
            if current is not None and current.body is None:
                current.body = bytes(line)
            continue
        if not isinstance(line, bytes) or b"FETCH (" not in line:
            continue
        uid = _FETCH_UID.search(line)
        if uid is None:
            current = None
            continue
        current = out.setdefault(int(uid.group(1)), Fetched(int(uid.group(1))))
        if (size := _FETCH_SIZE.search(line)) is not None:
            current.size = int(size.group(1))
        if (flags := _FETCH_FLAGS.search(line)) is not None:
            current.flags = set(flags.group(1).decode("ascii", "replace").split())
    return out


def _status(resp: Any) -> tuple[str, str]:
    lines = [bytes(x) for x in resp.lines if isinstance(x, bytes | bytearray)]
    text = lines[-1] if lines else b""
    m = _CODE.match(text)
    return (m.group(1).decode() if m else ""), text.decode("utf-8", "replace")[:300]


class Session:
    """A logged-in IMAP session. Every method raises only SessionLost or ImapRefused."""

    def __init__(self, client: aioimaplib.IMAP4, cfg: ImapConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.lost = asyncio.Event()
        self.selected: str | None = None
        self._done_sent_for: object = None  # the IDLE command DONE was sent for

    def _end_idle(self) -> bool:
        """Send DONE if an IDLE is under way and has not been sent one; True when it was sent now.

        Once per IDLE: the server's OK to it may still be on its way when a stop lands, and a
        second DONE reaches the server as a command, which it refuses (BAD); aioimaplib then aborts.
        """
        pending = self.client.protocol.pending_sync_command
        if pending is None or pending.name != "IDLE" or pending is self._done_sent_for:
            return False
        self._done_sent_for = pending
        self.client.idle_done()
        return True

    @property
    def capabilities(self) -> set[str]:
        caps: set[str] = self.client.protocol.capabilities
        return caps

    async def _run(self, what: str, coro: Any, *, bounded: bool = True) -> Any:
        """Await one command. ``bounded=False``: no overall deadline, only aioimaplib's
        inactivity timer (a large FETCH may take long while data keeps flowing)."""
        if self.lost.is_set():
            coro.close()
            raise SessionLost(f"{what}: the connection is closed")
        try:
            resp = await asyncio.wait_for(coro, self.cfg.command_timeout if bounded else None)
        except (TimeoutError, aioimaplib.CommandTimeout) as exc:
            self.lost.set()
            raise SessionLost(f"{what}: no answer within the timeout") from exc
        except (OSError, aioimaplib.Abort, aioimaplib.Error) as exc:
            self.lost.set()
            raise SessionLost(f"{what}: {type(exc).__name__}: {exc}") from exc
        if resp.result != "OK":
            code, text = _status(resp)
            if resp.result not in ("NO", "BAD"):  # aioimaplib's own failure marker, e.g. 'KO'
                self.lost.set()
                raise SessionLost(f"{what}: {text or resp.result}")
            raise ImapRefused(what, text, code)
        return resp

    async def select(self, folder: str) -> tuple[int, int]:
        resp = await self._run(f"SELECT {folder}", self.client.select(mailbox(folder)))
        self.selected = folder
        return parse_select(resp.lines)

    async def search(self, criteria: list[str]) -> list[int]:
        resp = await self._run("UID SEARCH", self.client.protocol.search(*criteria, charset=None, by_uid=True))
        return parse_search(resp.lines)

    async def fetch_meta(self, uid: int) -> Fetched | None:
        resp = await self._run("UID FETCH", self.client.uid("fetch", str(uid), "(UID RFC822.SIZE FLAGS)"))
        return parse_fetch(resp.lines).get(uid)

    async def fetch_body(self, uid: int) -> bytes | None:
        # BODY.PEEK: fetching must not set \Seen; only an accepted outcome does.
        resp = await self._run("UID FETCH", self.client.uid("fetch", str(uid), "(UID BODY.PEEK[])"), bounded=False)
        got = parse_fetch(resp.lines).get(uid)
        return got.body if got is not None else None

    async def add_flags(self, uid: int, flags: str) -> None:
        await self._run("UID STORE", self.client.uid("store", str(uid), "+FLAGS.SILENT", f"({flags})"))

    async def create(self, folder: str) -> None:
        try:
            await self._run(f"CREATE {folder}", self.client.create(mailbox(folder)))
        except ImapRefused as exc:
            if exc.code != "ALREADYEXISTS":
                raise

    async def move(self, uid: int, folder: str) -> None:
        """Move one message, creating the folder when the server says TRYCREATE."""
        for attempt in (1, 2):
            try:
                if "MOVE" in self.capabilities:
                    await self._run("UID MOVE", self.client.uid("move", str(uid), mailbox(folder)))
                else:
                    await self._run("UID COPY", self.client.uid("copy", str(uid), mailbox(folder)))
                    await self.delete(uid)
                return
            except ImapRefused as exc:
                if exc.code != "TRYCREATE" or attempt == 2:
                    raise
                await self.create(folder)

    async def delete(self, uid: int) -> None:
        if "UIDPLUS" not in self.capabilities:
            # A plain EXPUNGE would also remove what others marked \Deleted: refuse instead.
            raise ImapRefused("UID EXPUNGE", "the server lacks UIDPLUS; cannot delete one message safely",
                              "CANNOT")
        await self.add_flags(uid, "\\Deleted")
        await self._run("UID EXPUNGE", self.client.uid("expunge", str(uid)))

    async def append(self, folder: str, data: bytes, flags: list[str], when: datetime) -> None:
        flag_text = f"({' '.join(flags)})" if flags else None
        for attempt in (1, 2):
            try:
                await self._run("APPEND", self.client.protocol.append(data, mailbox(folder), flag_text, when,
                                                                      timeout=self.cfg.command_timeout),
                                bounded=False)
                return
            except ImapRefused as exc:
                if exc.code != "TRYCREATE" or attempt == 2:
                    raise
                await self.create(folder)

    async def noop(self) -> None:
        await self._run("NOOP", self.client.noop())

    async def wait_for_change(self, renew: float) -> bool:
        """IDLE up to ``renew`` seconds; True when the server reported new or removed mail."""
        try:
            idle = await asyncio.wait_for(self.client.idle_start(timeout=renew), self.cfg.command_timeout)
        except (TimeoutError, OSError, aioimaplib.Abort, aioimaplib.Error) as exc:
            self.lost.set()
            raise SessionLost(f"IDLE: {type(exc).__name__}: {exc}") from exc
        changed = False
        lost = asyncio.ensure_future(self.lost.wait())
        push_wait: asyncio.Future[Any] | None = None
        try:
            while not changed:
                push_wait = asyncio.ensure_future(
                    self.client.wait_server_push(timeout=renew + self.cfg.command_timeout))
                await asyncio.wait({push_wait, lost}, return_when=asyncio.FIRST_COMPLETED)
                if not push_wait.done():
                    raise SessionLost("IDLE: the connection was lost")
                push = push_wait.result()
                if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                changed = any(isinstance(line, bytes) and (line.endswith((b"EXISTS", b"RECENT"))
                                                           or b"EXPUNGE" in line) for line in push)
        except TimeoutError as exc:
            self.lost.set()
            raise SessionLost("IDLE: the server went quiet") from exc
        finally:
            lost.cancel()
            if push_wait is not None and not push_wait.done():
                push_wait.cancel()
            try:
                if not self.lost.is_set() and self._end_idle():
                    await asyncio.wait_for(asyncio.shield(idle), self.cfg.command_timeout)
            except (TimeoutError, OSError, aioimaplib.Abort, aioimaplib.Error):
                self.lost.set()
            finally:
                if not idle.done():  # cancelled, or the connection is gone
                    idle.cancel()
        return changed

    async def logout(self) -> None:
        """LOGOUT politely if the session is usable, then close; also when cancelled meanwhile."""
        try:
            if not self.lost.is_set():
                self._end_idle()  # LOGOUT then waits for the server's OK to IDLE
                # Best effort, we are leaving anyway; bounded even if the library does not end
                # when cancelled. The transport is closed below whatever happened.
                await within(self.client.logout(), 2)
        finally:
            self._abort()

    def _abort(self) -> None:
        self.lost.set()
        for task in [*self.client.tasks, *self.client.protocol.tasks]:  # aioimaplib's own helpers
            task.cancel()
        transport = getattr(self.client.protocol, "transport", None)
        if transport is not None:
            transport.close()


async def open_session(cfg: ImapConfig, password: str | None, token: str | None) -> Session:
    """Connect, secure and log in. Raises SessionLost (try again later) or LoginFailed."""
    ctx = tls_context(cfg.ca_file) if cfg.tls != "none" else None
    session: Session | None = None

    def lost(_: Exception | None) -> None:
        if session is not None:
            session.lost.set()

    try:
        client = aioimaplib.IMAP4(cfg.host, cfg.effective_port, timeout=cfg.command_timeout, conn_lost_cb=lost,
                                  ssl_context=ctx if cfg.tls == "implicit" else None)
        session = Session(client, cfg)
        await asyncio.wait_for(client.wait_hello_from_server(), cfg.connect_timeout)
        if cfg.tls == "starttls":
            assert ctx is not None
            await asyncio.wait_for(_starttls(client, ctx, cfg.host), cfg.connect_timeout)
    except ssl.SSLError as exc:
        if session is not None:
            session._abort()
        raise SessionLost(f"TLS with {cfg.host}:{cfg.effective_port} failed: {tls_reason(exc)}") from exc
    except (OSError, TimeoutError, aioimaplib.Abort, aioimaplib.Error) as exc:
        if session is not None:
            session._abort()
        raise SessionLost(f"cannot reach {cfg.host}:{cfg.effective_port}: {type(exc).__name__}: {exc}") from exc
    try:
        if "LOGINDISABLED" in session.capabilities and password is not None:
            raise LoginFailed("the server refuses LOGIN on this connection (LOGINDISABLED)")
        if password is not None:
            resp = await asyncio.wait_for(client.login(cfg.username, password), cfg.connect_timeout)
        else:
            assert token is not None
            resp = await asyncio.wait_for(_xoauth2(client, cfg.username, token), cfg.connect_timeout)
    except (OSError, TimeoutError, aioimaplib.Abort, aioimaplib.Error) as exc:
        session._abort()
        raise SessionLost(f"login to {cfg.host}:{cfg.effective_port}: {type(exc).__name__}: {exc}") from exc
    except LoginFailed:
        session._abort()
        raise
    if resp.result != "OK":
        session._abort()
        raise LoginFailed(f"login as {cfg.username!r} refused: {_status(resp)[1]}")
    return session


class _Xoauth2(aioimaplib.Command):  # type: ignore[misc]  # the library is untyped
    """AUTHENTICATE XOAUTH2 with the initial response, answering the server's error challenge.

    A server that refuses the token does not say NO at once: it sends a continuation carrying a
    base64 JSON error and waits for the client's empty response before the tagged NO (Google's and
    Microsoft's XOAUTH2, RFC 7628 for OAUTHBEARER; Dovecot does the same). aioimaplib's
    ``xoauth2`` records that continuation and waits, so a revoked or expired token hung until
    the login timeout and read as a network problem. This command sends the empty response and
    keeps the error for the message.
    """

    def __init__(self, protocol: Any, sasl: str) -> None:
        super().__init__("AUTHENTICATE", protocol.new_tag(), "XOAUTH2", sasl, loop=protocol.loop)
        self._protocol = protocol
        self.challenge = ""
        self.answered = False

    def flush(self) -> None:
        # aioimaplib calls this after appending a continuation line, and at the end of every read
        if self.answered or not self._resp_lines or not bytes(self._resp_lines[-1]).startswith(b"+"):
            return
        line = bytes(self._resp_lines.pop())  # the challenge is not part of the answer
        try:
            self.challenge = base64.b64decode(line[1:].strip(), validate=True).decode()[:300]
        except ValueError:
            self.challenge = line.decode("utf-8", "replace")[:300]
        self.answered = True
        self._protocol.send("")  # the empty response: the server now ends with a tagged NO


async def _xoauth2(client: aioimaplib.IMAP4, user: str, token: str) -> Any:
    """Log in with XOAUTH2; returns aioimaplib's Response (with the server's error, if any, added
    to its text). The SASL string is scrubbed from the library's debug log, not only the token."""
    protocol = client.protocol
    sasl = base64.b64encode(f"user={user}\1auth=Bearer {token}\1\1".encode()).decode("ascii")
    command = _Xoauth2(protocol, sasl)
    async with protocol.state_condition:  # as aioimaplib's own state-changing commands do
        response = await protocol.execute(command, scrub=sasl)
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
        protocol.state_condition.notify_all()
    if response.result != "OK" and command.challenge and response.lines:
        # after the tagged NO's text (its last line), where the refusal message is read from
        response.lines[-1] = bytes(response.lines[-1]) + f" (XOAUTH2: {command.challenge})".encode()
    return response


async def _starttls(client: aioimaplib.IMAP4, ctx: ssl.SSLContext, host: str) -> None:
    proto = client.protocol
    if "STARTTLS" not in proto.capabilities:
        raise aioimaplib.Error("the server does not offer STARTTLS (tls: starttls requires it)")
    resp = await proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop))
    if resp.result != "OK":
        raise aioimaplib.Error(f"STARTTLS refused: {_status(resp)[1]}")
    loop = asyncio.get_running_loop()
    proto.transport = await loop.start_tls(proto.transport, proto, ctx, server_hostname=host)
    await proto.capability()
