"""Dead-letter selection and summaries shared by the CLI and the admin API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.delivery.store import DeadLetter, DeadLetterFilter

_TEXT_KEYS = ("route", "connector", "reason", "envelope_id")
_TIME_KEYS = ("since", "until")
#: Most ids one request may name (a filter selects any number).
MAX_IDS = 10_000


def filter_from(raw: Mapping[str, Any]) -> DeadLetterFilter:
    """A filter from JSON keys ``route``, ``connector``, ``reason``, ``envelope_id`` (strings)
    and ``since``, ``until`` (epoch seconds). Raises ``ValueError`` naming a bad key."""
    values: dict[str, Any] = {}
    for key in _TEXT_KEYS:
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
            values[key] = value
    for key in _TIME_KEYS:
        value = raw.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number (epoch seconds)")
            values[key] = float(value)
    return DeadLetterFilter(**values)


def selection_from(body: Mapping[str, Any], filter_at: str | None = None) -> tuple[list[int] | None,
                                                                                    DeadLetterFilter | None]:
    """What a replay or purge request selects: ``ids``, a filter (the keys of :func:`filter_from`,
    at the top level or under ``filter_at``), or ``"all": true``. Raises ``ValueError`` when the
    body selects nothing, so an empty request never means "everything"."""
    ids = body.get("ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("ids must be a list of integers")
        if len(ids) > MAX_IDS:
            raise ValueError(f"at most {MAX_IDS} ids at once; use a filter for more")
        return ids, None
    raw = body if filter_at is None else body.get(filter_at) or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{filter_at} must be an object")
    flt = filter_from(raw)
    if not flt.empty:
        return None, flt
    if body.get("all") is True:
        return None, DeadLetterFilter()
    where = "" if filter_at is None else f"{filter_at}: "
    raise ValueError(f"say which: ids, a filter ({where}route, connector, reason, envelope_id, since, until), "
                     "or all: true")


def summary(d: DeadLetter) -> dict[str, Any]:
    """One line of a listing: the dead letter without its body and options."""
    out = d.as_dict()
    env = out.pop("envelope")
    out.pop("options", None)
    if isinstance(env, dict):
        out["subject"] = env.get("subject")
        out["source"] = env.get("source")
    return out
