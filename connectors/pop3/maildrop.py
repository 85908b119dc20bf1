"""One POP3 session (stdlib poplib), blocking: the inbound side runs it in a worker thread.

:class:`Maildrop` connects (implicit TLS, STLS or plain text, as configured), logs in, lists
the messages by UIDL and size, retrieves and deletes them. poplib's line reader is replaced by
one with a larger line limit and a byte budget per message, so a server cannot make us read
more than the size it announced.
"""

from __future__ import annotations

import poplib
import ssl
from typing import Any

from connectors.imap.session import tls_reason
from connectors.pop3.config import Pop3Config

__all__ = ["MAX_LINE", "LoginFailed", "Maildrop"]

#: Longest line accepted from the server (poplib's own limit, 2048, refuses real-world mail).
MAX_LINE = 1024 * 1024


class LoginFailed(Exception):
    pass


class _Bounded:
    """poplib's line reader with a larger line limit and a byte budget per long response."""

    budget: int | None = None
    file: Any

    def _getline(self) -> tuple[bytes, int]:
        line: bytes = self.file.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise poplib.error_proto("-ERR line longer than 1 MiB")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        if self.budget is not None:
            self.budget -= len(line)
            if self.budget < 0:
                raise poplib.error_proto("-ERR the server sent more than the size it announced")
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets


class _POP3(_Bounded, poplib.POP3):
    pass


class _POP3_SSL(_Bounded, poplib.POP3_SSL):
    pass


class Maildrop:
    """One logged-in POP3 session; every method blocks (call it in a worker thread)."""

    def __init__(self, cfg: Pop3Config, password: str) -> None:
        ctx: ssl.SSLContext | None = None
        if cfg.tls != "none":
            ctx = ssl.create_default_context(cafile=cfg.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        conn: poplib.POP3
        if cfg.tls == "implicit":
            conn = _POP3_SSL(cfg.host, cfg.effective_port, timeout=cfg.connect_timeout, context=ctx)
        else:
            conn = _POP3(cfg.host, cfg.effective_port, timeout=cfg.connect_timeout)
        self.conn = conn
        try:
            if cfg.tls == "starttls":
                conn.stls(context=ctx)
            try:
                conn.user(cfg.username)
                conn.pass_(password)
            except poplib.error_proto as exc:
                raise LoginFailed(f"login as {cfg.username!r} refused: {_text(exc)}") from None
            conn.sock.settimeout(cfg.command_timeout)
        except BaseException:
            self.close()
            raise

    def listing(self) -> list[tuple[int, str, int]]:
        """(number, UIDL, size) of every message, in maildrop order (oldest first)."""
        _, uidl_lines, _ = self.conn.uidl()
        _, list_lines, _ = self.conn.list()
        sizes = {}
        for line in list_lines:
            num, _, size = line.decode("ascii", "replace").partition(" ")
            sizes[int(num)] = int(size.split()[0]) if size.strip() else 0
        out = []
        for line in uidl_lines:
            num, _, uidl = line.decode("ascii", "replace").partition(" ")
            out.append((int(num), uidl.strip(), sizes.get(int(num), 0)))
        return out

    def retr(self, num: int, size: int) -> bytes:
        assert isinstance(self.conn, _Bounded)
        self.conn.budget = size + size // 10 + 64 * 1024  # CRLF and dot-stuffing differences
        try:
            _, lines, _ = self.conn.retr(num)
        finally:
            self.conn.budget = None
        return b"\r\n".join(lines) + b"\r\n"

    def dele(self, num: int) -> None:
        self.conn.dele(num)

    def quit(self) -> None:
        self.conn.quit()

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def _text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return tls_reason(exc)
    if isinstance(exc, poplib.error_proto) and exc.args and isinstance(exc.args[0], bytes):
        return exc.args[0].decode("utf-8", "replace")[:300]
    return str(exc)[:300]

