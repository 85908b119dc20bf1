"""What the mailbox readers (``imap``, ``pop3``) share when they take mail.

See :mod:`connectors.mail_common` for the package; this part is not re-exported there because it
needs :mod:`connectors.mailauth`.
"""

from __future__ import annotations

import logging

from connectors.mailauth import AuthCheck, Verifier
from gateway.sdk import Outcome


def auth_verifier(check: AuthCheck | None, log: logging.Logger) -> Verifier | None:
    """The verifier for a connector's ``auth_check``; None without one or with ``policy: off``.

    Raises ValueError when no DNS resolver can be set up (``listen`` fails; the supervisor
    retries)."""
    if check is None or check.policy == "off":
        return None
    return Verifier(check, log=log)


class RetryLater(Exception):
    """The gateway asked to be offered this message again later: after ``after`` seconds.

    The reader leaves the message as it is, takes nothing behind it, and fetches it again then.
    """

    def __init__(self, after: float) -> None:
        super().__init__(after)
        self.after = after

    @classmethod
    def after_outcome(cls, outcome: Outcome) -> RetryLater:
        """At the outcome's ``retry_after``, at least a second later (5 s when it names none)."""
        return cls(max(1.0, outcome.retry_after or 5.0))
