"""maildir — write each message into a local Maildir (stdlib ``mailbox``), readable by any mail client.

Features: outbound only; the message is built exactly as the ``smtp`` outbound builds it
(sender, to, cc, reply_to, subject, text, html, attachments, message_id, mail_headers; every
string a template, every header value checked for CR/LF/NUL) or, for an inbound
``message/rfc822`` body, stored unchanged (``forward``). ``folder`` (a template) files it into
a Maildir++ subfolder (``Alerts``, ``Alerts.Boiler``), created on first use. Lines are stored
with LF endings, as Maildir readers expect. Sets ``Message-ID`` (stable across retries),
``Date``, ``Auto-Submitted: auto-generated``, ``X-Gateway-Envelope-Id`` on built messages.
With ``dkim``, ``smime`` or ``pgp`` (:mod:`connectors.mailauth`) every message is sealed
before it is stored (a route may set ``seal: {sign, encrypt, missing_key}``).
Delivery guarantee: ``send`` returns once the file is in ``new/`` and (``fsync: true``, the
default) the file and the directory entry are fsync'd. A full or failing disk is transient;
a message that cannot be built (bad address, header injection, bad folder name) or sealed is
permanent; a sealer that cannot be set up (unreadable certificate, PGP keys) is transient.
Address form: ``path: var/mail/Maildir`` (created when missing).

Parts: ``config.py`` holds the options; the storing is in this module. Outbound only, so no
``inbound.py``; small enough for no ``outbound.py``; the message is built by
:mod:`connectors.mail_common`, so no ``mapping.py``.
"""

from __future__ import annotations

import asyncio
import functools
import mailbox
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from pydantic import ValidationError

from connectors.mail_common import (
    PARSERS,
    HeaderInjection,
    MailError,
    build_mail,
    validated_options,
)
from connectors.mailauth import OutboundSealing
from connectors.maildir.config import MaildirConfig, MaildirTarget
from gateway.sdk import (
    Connector,
    ConnectorConfig,
    ConnectorContext,
    Envelope,
    Health,
    PermanentError,
    Reply,
    Target,
    TransientError,
)

__all__ = ["MaildirConfig", "MaildirConnector", "MaildirTarget"]

_FOLDER = re.compile(r"^[A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9_-]{1,64}){0,7}$")


class MaildirConnector(Connector):
    kind = "maildir"
    parsers = PARSERS
    Config = MaildirConfig
    Options = MaildirTarget
    supports_outbound = True

    def __init__(self, config: ConnectorConfig, ctx: ConnectorContext) -> None:
        super().__init__(config, ctx)
        assert isinstance(config, MaildirConfig)
        self.cfg = config
        self._boxes: dict[str, mailbox.Maildir] = {}
        # One writer thread: mailbox's unique names are not meant for concurrent writers.
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._error = ""
        self._sealing = OutboundSealing(config, log=self.log, connector=self.name)

    async def open(self) -> None:
        await self._sealing.open()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"maildir-{self.name}")
        try:
            # mailbox.Maildir creates the Maildir itself but not the folders above it.
            await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(os.makedirs, os.path.dirname(os.path.abspath(self.cfg.path)),
                                              exist_ok=True))
            await asyncio.get_running_loop().run_in_executor(self._pool, self._box, "")
        except OSError as exc:
            raise TransientError(f"cannot open the Maildir {self.cfg.path}: {exc.strerror}") from exc

    async def send(self, env: Envelope, target: Target) -> Reply | None:
        try:
            opts = MaildirTarget.model_validate(validated_options(target))
            built = build_mail(env, opts, route=target.route, default_sender=self.cfg.sender,
                               require_recipients=False)
        # ValueError too: email's own refusal of a header with a line break that is not CR/LF
        # (U+2028, NEL, from an untemplated subject), as permanent as the other three.
        except (HeaderInjection, MailError, ValidationError, ValueError) as exc:
            raise PermanentError(f"cannot build the message: {exc}") from exc
        folder = opts.folder or ""
        if folder and not _FOLDER.match(folder):
            raise PermanentError(f"folder {folder[:80]!r} is not a valid Maildir++ folder name "
                                 "(letters, digits, '_', '-', dot-separated)")
        if self._pool is None:
            await self.open()
        sealed = await self._sealing.seal(built.data, recipients=built.recipients, options=opts.seal,
                                          envelope_id=env.id)
        data = sealed.replace(b"\r\n", b"\n")
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._store, folder, data)
        except OSError as exc:
            self._error = f"write failed: {exc.strerror}"
            raise TransientError(f"cannot write to the Maildir {self.cfg.path}: {exc.strerror}") from exc
        self._error = ""
        return None

    def _box(self, folder: str) -> mailbox.Maildir:
        box = self._boxes.get(folder)
        if box is None:
            root = self._boxes.get("")
            if root is None:
                root = mailbox.Maildir(self.cfg.path, factory=None, create=True)
                for sub in ("tmp", "new", "cur"):  # an existing empty directory becomes a Maildir
                    os.makedirs(os.path.join(self.cfg.path, sub), mode=0o700, exist_ok=True)
            self._boxes[""] = root
            if folder:
                try:
                    box = root.get_folder(folder)
                except mailbox.NoSuchMailboxError:
                    box = root.add_folder(folder)
            else:
                box = root
            self._boxes[folder] = box
        return box

    def _store(self, folder: str, data: bytes) -> None:
        with self._lock:
            box = self._box(folder)
            key = box.add(data)
            if self.cfg.fsync:
                new = os.path.join(box._path, "new")  # mailbox has no public path accessor
                fd = os.open(os.path.join(new, key), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                dfd = os.open(new, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.to_thread(pool.shutdown, True)  # lets a write in progress finish
        await self._sealing.close()

    def health(self) -> Health:
        error = self._sealing.error or self._error
        return Health(not error, error)
