"""JSON Schema of routes.yaml, assembled from the core models and every connector kind's own.

Editors (VS Code's YAML extension, JetBrains) autocomplete and check routes.yaml with it:
``gateway schema > routes.schema.json`` and ``# yaml-language-server: $schema=routes.schema.json``.
"""

from __future__ import annotations

from typing import Any

from gateway.config.models import FileModel, TargetSpec
from gateway.registry import Registry, UnknownKind


def build_schema(registry: Registry) -> dict[str, Any]:
    schema = FileModel.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    connector_refs = []
    target_refs = []
    for kind in registry.kinds():
        try:
            cls = registry.get(kind)
        except UnknownKind:
            continue
        cschema = cls.Config.model_json_schema()
        defs.update(cschema.pop("$defs", {}))
        cschema["properties"]["type"] = {"const": kind, "description": (cls.__doc__ or "").strip().split("\n")[0]}
        cschema.setdefault("required", []).append("type") if "type" not in cschema.get("required", []) else None
        name = f"connector_{kind}"
        defs[name] = cschema
        connector_refs.append({"$ref": f"#/$defs/{name}"})
        tschema = cls.Options.model_json_schema()
        defs.update(tschema.pop("$defs", {}))
        core = TargetSpec.model_json_schema()
        defs.update(core.pop("$defs", {}))
        tschema["properties"] = {**core["properties"], **tschema.get("properties", {})}
        tschema["required"] = ["connector"]
        tschema["additionalProperties"] = False
        tschema["title"] = f"target options for a {kind} connector"
        defs[f"target_{kind}"] = tschema
        target_refs.append({"$ref": f"#/$defs/target_{kind}"})
    schema["properties"]["connectors"] = {
        "type": "object",
        "description": "Named connectors; each has a 'type' and that type's options.",
        "additionalProperties": {"oneOf": connector_refs},
    }
    route = defs.get("RouteConfig")
    if route is not None:
        route["properties"]["to"] = {"type": "array", "minItems": 1, "items": {"anyOf": target_refs}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gateway routes.yaml"
    return schema
