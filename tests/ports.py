"""Ports for listeners a test starts later: never one the kernel may hand to a port-0 bind meanwhile.

Picking a port by binding to port 0 and closing the socket leaves a window: the next port-0 bind in
the run (a proxy, a fake server, a peer) can be given the same number before the test's listener
takes it, and the test then talks to the wrong server (seen in CI: the gateway's admin port chosen
this way was handed to an IMAP proxy started right after, and /readyz got Dovecot's greeting). So
these ports come from below the kernel's ephemeral range, where port-0 binds never land, are
checked free by binding, and are not handed out twice in one run.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_issued: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and outside the ephemeral range."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(500):
        port = random.randrange(low, high)
        if port in _issued:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")
