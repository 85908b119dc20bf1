"""TLS for our listeners, renewed without a restart: a certificate replaced on disk is served to
the next connection.

cert-manager renews a certificate in its Secret and the kubelet swaps the mounted files (a
``..data`` symlink renamed over the old one); other tools rewrite the files in place.
:class:`RenewingTls` gives a server one :class:`ssl.SSLContext` for its whole life. Each handshake
on it asks, at most once a second, whether the certificate's or the key's file changed (its stat
signature: device, inode, size, modification and change times, symlinks followed); when one did,
the pair is loaded into a new context, which that handshake and every later one use. Connections
already open keep the certificate they started with.

A pair that does not load (the certificate written and its key not yet, a file half written)
keeps the previous context and is logged once as ``tls.reload_failed``; the files' next change is
tried again. ``tls.reloaded`` says when a new pair took over.

The switch happens in the context's SNI callback, which OpenSSL calls for every ClientHello, with
or without a server name; a TLS server of asyncio, uvicorn or aiosmtpd's STARTTLS all run it.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from gateway.logs import event

#: How often, at most, a handshake looks at the files.
CHECK_EVERY = 1.0

_Signature = tuple[tuple[int, int, int, int, int], ...]


def _signature(*paths: str) -> _Signature:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class RenewingTls:
    """A server's TLS context that follows its certificate and key files.

    Construction loads the pair and raises :class:`OSError` or :class:`ssl.SSLError` when it
    cannot: a listener that cannot start is reported before it starts. Afterwards nothing it does
    raises; a handshake it cannot serve a new pair to gets the previous one.
    """

    def __init__(self, cert: str, key: str, *, log: logging.Logger, name: str, check_every: float = CHECK_EVERY):
        self.cert = cert
        self.key = key
        self.log = log
        #: Who serves it (a connector's name, an HTTP listen address), for the log.
        self.name = name
        self.check_every = check_every
        self._loaded = _signature(cert, key)
        #: The context to hand a server: its SNI callback hands each handshake the current pair.
        self.context = self._build()
        self.context.sni_callback = self._handshake
        self._current = self.context
        self._refused: _Signature | None = None
        self._checked = time.monotonic()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def current(self) -> ssl.SSLContext:
        """The context for a new connection: the files' pair as of the last check."""
        now = time.monotonic()
        if now - self._checked >= self.check_every:
            self._checked = now
            self._renew()
        return self._current

    def _renew(self) -> None:
        try:
            seen = _signature(self.cert, self.key)
        except OSError:
            return  # mid-swap: the next check looks again
        if seen in (self._loaded, self._refused):
            return
        try:
            ctx = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._refused = seen
            event(self.log, "tls.reload_failed", logging.WARNING, listener=self.name, cert=self.cert,
                  key=self.key, error=str(exc), hint="the previous certificate is served meanwhile")
            return
        # Files that changed again while being loaded differ from ``seen``: the next check loads
        # them once more, so a pair caught mid-write is never kept.
        self._loaded, self._current, self._refused = seen, ctx, None
        event(self.log, "tls.reloaded", listener=self.name, cert=self.cert)

    def _handshake(self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None,
                   offered: ssl.SSLContext) -> None:
        try:
            current = self.current()
            if current is not offered:
                conn.context = current
        except Exception as exc:  # an exception here would fail the handshake: serve what it has
            event(self.log, "tls.reload_failed", logging.WARNING, listener=self.name, cert=self.cert,
                  error=f"{type(exc).__name__}: {exc}")
