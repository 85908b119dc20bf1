"""The editor's dashboard: ``/api/overview`` (routes and connectors with health and counters) and ``/api/live``.

Counters are totals since the process started (the page derives rates from two polls). Each
route has its decisions by outcome (``matched``, ``suppressed``, ``digested``, ``dropped``,
``rejected``, ``dead_lettered``) and, per target connector, what was ``delivered`` and how many
attempts ``failed``: the edges of the flow picture.
"""

from __future__ import annotations

import collections
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query

from gateway.admin.auth import Principal
from gateway.admin.live import LiveLog
from gateway.admin.port import AdminPort


def overview_api(app: FastAPI, runtime: AdminPort, auth: Any, editor: Any, live: LiveLog) -> None:
    """``GET /api/overview``, ``GET /api/live`` and, for editors, a recorded message as a sample."""

    @app.get("/api/overview")
    async def overview(_: Principal = Depends(auth)) -> dict[str, Any]:  # noqa: B008
        return _overview(runtime)

    @app.get("/api/live")
    async def live_view(_: Principal = Depends(auth), limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:  # noqa: B008
        return {"version": runtime.config.version, "routes": live.recent(limit)}

    @app.get("/api/live/{envelope_id}/sample")
    async def live_sample(envelope_id: str, _: Principal = Depends(editor)) -> dict[str, Any]:  # noqa: B008
        sample = live.sample(envelope_id)
        if sample is None:
            raise HTTPException(404, f"no recorded sample for {envelope_id} (only recent text bodies are kept)")
        return sample


def _samples(metric: Any) -> list[tuple[dict[str, str], float]]:
    out = []
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                out.append((dict(sample.labels), float(sample.value)))
    return out


def _edge(edges: dict[str, dict[str, dict[str, float]]], labels: dict[str, str]) -> dict[str, float]:
    return edges[labels["route"]].setdefault(labels["connector"], {"delivered": 0.0, "failed": 0.0})


def _overview(runtime: AdminPort) -> dict[str, Any]:
    m = runtime.metrics
    routed: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for labels, value in _samples(m.routed):
        routed[labels["route"]][labels["outcome"]] = value
    delivered: dict[str, float] = collections.defaultdict(float)
    sent: dict[str, float] = collections.defaultdict(float)
    edges: dict[str, dict[str, dict[str, float]]] = collections.defaultdict(dict)
    for labels, value in _samples(m.delivered):
        delivered[labels["route"]] += value
        sent[labels["connector"]] += value
        _edge(edges, labels)["delivered"] += value
    failed: dict[str, float] = collections.defaultdict(float)
    for labels, value in _samples(m.failures):
        failed[labels["route"]] += value
        _edge(edges, labels)["failed"] += value
    received = {labels["connector"]: value for labels, value in _samples(m.received)}
    routes = []
    for r in runtime.config.router.routes:
        counts = routed.get(r.name, {})
        routes.append({"name": r.name, "from": r.sources, "subjects": r.subjects, "mode": r.mode,
                       "targets": [t.connector for t in r.targets],
                       "matched": counts.get("matched", 0), "dead_lettered": counts.get("dead_lettered", 0),
                       "delivered": delivered.get(r.name, 0), "failed": failed.get(r.name, 0),
                       "outcomes": counts, "targets_sent": edges.get(r.name, {})})
    connectors = {}
    for name, c in runtime.connectors().items():
        connectors[name] = {"type": c.kind, "up": c.up, "detail": c.detail, "state": c.state,
                            "inbound": c.inbound, "received": received.get(name, 0), "sent": sent.get(name, 0)}
    unmatched = routed.get("", {}).get("unmatched", 0)
    return {"version": runtime.config.version, "routes": routes, "connectors": connectors, "unmatched": unmatched,
            "last_reload": runtime.last_reload()}

