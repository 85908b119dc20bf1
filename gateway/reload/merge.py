"""Round-trip edits of routes.yaml: comments and layout of what did not change stay as they were."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from gateway.config.yamlsrc import ConfigError, Issue


def merge_document(text: str, updates: Mapping[str, Any]) -> str:
    """Apply ``updates`` (top-level keys, e.g. ``{"routes": [...]}``) to routes.yaml text.

    Round-trip YAML: comments and layout of everything that did not change stay as they were.
    Mappings merge key by key, lists of named items (routes) match by ``name``, so an edited
    route keeps the comments of its unchanged keys. Raises :class:`ConfigError` for YAML that
    cannot be parsed.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    try:
        doc = yaml.load(text) if text.strip() else None
    except YAMLError as exc:
        raise ConfigError([Issue((), f"YAML syntax error: {exc}")]) from None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    if not isinstance(doc, dict):
        raise ConfigError([Issue((), "the top level must be a mapping with 'connectors' and 'routes'")])
    for key, value in updates.items():
        if key in doc:
            doc[key] = _merge(doc[key], value)
        else:
            doc[key] = value
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, Mapping):
        for k in [k for k in old if k not in new]:
            del old[k]
        for k, v in new.items():
            old[k] = _merge(old[k], v) if k in old else v
        return old
    if isinstance(old, list) and isinstance(new, list):
        named = {item.get("name"): item for item in old if isinstance(item, dict) and item.get("name") is not None}
        merged = []
        for i, item in enumerate(new):
            prior = named.get(item.get("name")) if isinstance(item, Mapping) else None
            if prior is None and i < len(old) and not named:
                prior = old[i]
            merged.append(_merge(prior, item) if prior is not None else item)
        old[:] = merged
        return old
    return new if old != new else old
