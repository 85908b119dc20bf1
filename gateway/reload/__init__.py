"""Hot reload without loss: validate, swap routes atomically, restart only what changed.

Every trigger (the file changing on disk, SIGHUP, the admin API) ends in :class:`Reloader`,
which applies one change at a time under a lock:

1. The whole new config is validated by the one validator (:mod:`gateway.config.loader`). An
   invalid one is refused with its issues; the running routes stay, and
   ``gateway_config_reloads_total{outcome="invalid"}`` and a ``config.invalid`` log line say so.
2. Connectors the new config adds are opened first, so no route can name one that is not there.
3. Inbound connectors whose settings changed (or that are removed) stop taking messages and
   drain: their senders get the protocol's temporary failure meanwhile (a shared HTTP path
   answers ``503`` + ``Retry-After`` instead of ``404``).
4. The routing state is swapped in one assignment: a message already in the router finishes on
   the routes it started with (it holds its snapshot), every later one takes the new routes.
5. Changed and removed connectors are drained (in-flight sends finish, a removed connector's
   spooled jobs are delivered) within ``gateway.drain``, closed, and the changed ones replaced.
   Unchanged connectors are not touched: they keep their connections and sessions.
6. The outcome is confirmed, not guessed: the result says which connectors were restarted,
   added or removed and the state each new one reached; the version (content hash) shows in
   ``/api/config``, in ``gateway_config_info`` and in the history.

The package: :mod:`~gateway.reload.plan` (what a change does to the connectors, pure),
:mod:`~gateway.reload.reloader` (one change at a time: validate, plan, have the
:class:`~gateway.supervisor.Supervisor` apply it, record), :mod:`~gateway.reload.watch` (the file on disk),
:mod:`~gateway.reload.merge` (round-trip edits of routes.yaml) and
:mod:`~gateway.reload.worker` (the thread that parses and validates candidates, off the event loop).
"""

from gateway.reload.merge import merge_document
from gateway.reload.plan import Plan, inbound_names, plan_reload
from gateway.reload.reloader import Reloader, ReloadFailed, ReloadHost, ReloadRefused, Status, version_of
from gateway.reload.watch import check_file, watch

__all__ = [
    "Plan",
    "ReloadFailed",
    "ReloadHost",
    "ReloadRefused",
    "Reloader",
    "Status",
    "check_file",
    "inbound_names",
    "merge_document",
    "plan_reload",
    "version_of",
    "watch",
]
