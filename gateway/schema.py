"""JSON Schema of routes.yaml, assembled from the core models and every connector kind's own.

Editors (VS Code's YAML extension, JetBrains) autocomplete and check routes.yaml with it:
``gateway schema > routes.schema.json`` and ``# yaml-language-server: $schema=routes.schema.json``.

The contract: every file ``gateway validate`` accepts, the schema accepts. Where a field takes
more spellings than its Python type (a duration as ``"10s"``, a size as ``"10MiB"``, a secret as
``{file: path}``, a list as one item), the schema describes what is written, not what is stored.
What only the validator can see (cross-references, expressions, templates, secret files that
exist) is left to it: the schema is looser, never stricter.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from gateway.config.models import ByteSize, Duration, FileModel, Secret, TargetSpec
from gateway.registry import Registry, UnknownKind

_DURATION_TEXT = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"
_SIZE_TEXT = r"^\s*\d+\s*([Bb]|[KkMmGg][Bb]|[KkMmGg]i[Bb])?\s*$"
_DURATION_SCHEMA = {"anyOf": [{"type": "number", "minimum": 0},
                              {"type": "string", "pattern": _DURATION_TEXT}],
                    "description": "seconds, or a number with a unit: '500ms', '10s', '5m', '1h', '1d'"}
_SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": _SIZE_TEXT}],
                "description": "bytes, or a number with a unit: '64KiB', '10MiB', '1GB'"}
_SECRET_SCHEMA = {"anyOf": [{"type": "string", "description": "\"${ENV_VAR}\""},
                            {"type": "object", "properties": {"file": {"type": "string"}}, "required": ["file"],
                             "additionalProperties": False, "description": "{file: /path/to/secret}"}],
                  "description": "by reference only: \"${ENV_VAR}\" or {file: /path/to/secret}"}


def _validator_of(alias: Any) -> Any:
    return alias.__metadata__[0].func


_WRITTEN_AS = {_validator_of(Duration): _DURATION_SCHEMA, _validator_of(ByteSize): _SIZE_SCHEMA,
               _validator_of(Secret): _SECRET_SCHEMA}


class _AsWritten(GenerateJsonSchema):
    """Pydantic's schema of the validated value, widened to what the before-validators accept."""

    def function_before_schema(self, schema: core_schema.BeforeValidatorFunctionSchema) -> JsonSchemaValue:
        function = schema["function"]["function"]
        written = _WRITTEN_AS.get(function)
        if written is not None:
            return dict(written)
        inner = super().function_before_schema(schema)
        if getattr(function, "__name__", "") == "_one_or_many" and "anyOf" in inner:
            # ``resolver: 10.0.0.1`` for ``resolver: [10.0.0.1]``: one item for a list of one.
            items = [alt["items"] for alt in inner["anyOf"] if alt.get("type") == "array" and "items" in alt]
            inner["anyOf"] = [*inner["anyOf"], *items]
        return inner


def _model_schema(model: Any) -> dict[str, Any]:
    result: dict[str, Any] = model.model_json_schema(by_alias=True, schema_generator=_AsWritten)
    return result


def build_schema(registry: Registry) -> dict[str, Any]:
    schema = _model_schema(FileModel)
    defs = schema.setdefault("$defs", {})
    connector_refs = []
    target_refs = []
    for kind in registry.kinds():
        try:
            cls = registry.get(kind)
        except UnknownKind:
            continue
        cschema = _model_schema(cls.Config)
        defs.update(cschema.pop("$defs", {}))
        cschema["properties"]["type"] = {"const": kind, "description": (cls.__doc__ or "").strip().split("\n")[0]}
        cschema.setdefault("required", []).append("type") if "type" not in cschema.get("required", []) else None
        name = f"connector_{kind}"
        defs[name] = cschema
        connector_refs.append({"$ref": f"#/$defs/{name}"})
        tschema = _model_schema(cls.Options)
        defs.update(tschema.pop("$defs", {}))
        core = _model_schema(TargetSpec)
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
