"""Worker processes: one gateway on several cores (``gateway.workers``, ``gateway run --workers``).

With one worker (the default) ``gateway run`` is a single process, as it always was. With more,
it becomes a parent (:mod:`gateway.workers.parent`) that starts that many worker processes, each a
full :class:`~gateway.runtime.Runtime`, restarts one that dies and serves the one admin port.
A worker learns who it is from the environment the parent gives it (:class:`WorkerIdentity`):

* its index, and how many workers there are: the connectors see them in their context
  (REST, SOAP and SMTP bind their port with ``SO_REUSEPORT``; MQTT subscribes as a shared
  subscription with a client id per worker; AMQP consumers compete on their queues; a kind whose
  inbound side cannot be shared listens in worker 0 only);
* its private admin address (loopback), which the parent proxies and scrapes;
* its own SQLite spool and storm store (the configured file for worker 0, ``name.w<index>.db``
  beside it for the others), so a restarted worker with the same index delivers what it spooled;
* every worker's private address and a secret: a message for a route with storm control (dedupe,
  throttle, digest, alarm) is decided by worker 0, which holds that state, and a message with an
  ``Idempotency-Key`` by the worker its key hashes to, whose spool remembers the key; the others
  forward it there (:mod:`gateway.workers.forward`).

This module reads the environment and the machine only; it imports nothing of the runtime.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

_ENV_INDEX = "GATEWAY_WORKER_INDEX"
_ENV_COUNT = "GATEWAY_WORKER_COUNT"
_ENV_ADMIN = "GATEWAY_WORKER_ADMIN"
_ENV_PEERS = "GATEWAY_WORKER_PEERS"
_ENV_SECRET = "GATEWAY_WORKER_SECRET"  # noqa: S105 - the name of a variable, not a secret

#: The header a worker's forwarded message carries the secret in.
SECRET_HEADER = "x-gateway-worker-secret"  # noqa: S105 - a header name
#: A worker's exit code when it could not start (a port taken, a spool that cannot open): the
#: parent gives up when a worker's first start ends so, as one process would exit 1.
EXIT_START_FAILED = 3
#: The client a proxied admin request came from (``host port``), which the parent tells its worker.
CLIENT_HEADER = "x-gateway-client"
#: Where a worker takes forwarded messages, on its private admin address.
FORWARD_PATH = "/_worker/deliver"


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this worker process is among the gateway's workers."""

    index: int
    count: int
    #: This worker's private admin listener (``127.0.0.1:PORT``), served instead of ``gateway.admin.listen``.
    admin_listen: str
    #: Every worker's private admin listener, by index: where a message another worker owns is
    #: forwarded (see :meth:`gateway.delivery.engine.Delivery._owner`).
    peers: tuple[str, ...]
    #: Proves a forwarded message comes from a sibling worker.
    secret: str

    @classmethod
    def from_env(cls) -> WorkerIdentity | None:
        """The identity the parent gave this process, or None when it is not a worker."""
        if _ENV_INDEX not in os.environ:
            return None
        return cls(index=int(os.environ[_ENV_INDEX]), count=int(os.environ[_ENV_COUNT]),
                   admin_listen=os.environ[_ENV_ADMIN], peers=tuple(os.environ[_ENV_PEERS].split(",")),
                   secret=os.environ[_ENV_SECRET])

    def env(self) -> dict[str, str]:
        """The environment variables that carry this identity to the worker process."""
        return {_ENV_INDEX: str(self.index), _ENV_COUNT: str(self.count), _ENV_ADMIN: self.admin_listen,
                _ENV_PEERS: ",".join(self.peers), _ENV_SECRET: self.secret}

    def own_file(self, path: str) -> str:
        """This worker's copy of a per-process state file: ``path`` itself for worker 0 (so one
        process's spool is still delivered after a switch to workers), ``stem.w<index>.ext`` for
        the others. A worker restarted with the same index opens the same file again."""
        if self.index == 0:
            return path
        stem, ext = os.path.splitext(path)
        return f"{stem}.w{self.index}{ext}"


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, bounded by the cgroup's CPU quota.

    In a container the affinity lists the node's cores, not the pod's CPU limit (the limit is a
    CFS quota: ``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1), so a
    pod limited to 2 CPUs on a 64-core node would otherwise start 64 workers that share 2 cores.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup's CFS quota allows, or None when unlimited or unknown."""
    try:
        with open(os.path.join(root, "cpu.max"), encoding="ascii") as fh:
            quota, _, period = fh.read().strip().partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us"), encoding="ascii") as fh:
            v1_quota = int(fh.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us"), encoding="ascii") as fh:
            v1_period = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return v1_quota / v1_period if v1_quota > 0 and v1_period > 0 else None


def resolve_count(setting: int | str) -> int:
    """``gateway.workers`` / ``--workers`` as a number of processes (``auto``: :func:`usable_cores`)."""
    return usable_cores() if setting == "auto" else int(setting)
