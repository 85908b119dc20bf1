"""The parts of the docs that would drift if written by hand, generated when the site is built.

MkDocs runs this file as a hook (``hooks:`` in mkdocs.yml). A page asks for generated text with a
marker on a line of its own, replaced before the page is rendered:

``<!-- generated: connector KIND -->``
    that connector kind's options (from its pydantic ``Config`` model), its route-target options
    (its ``Options`` model) and its module card (the docstring of the module its entry point names);
``<!-- generated: gateway-settings -->``
    every ``gateway:`` key of routes.yaml, from the JSON Schema ``gateway schema`` prints;
``<!-- generated: route-keys -->``
    every key of a route, from the same schema;
``<!-- generated: connector-kinds -->``
    one line per registered connector kind;
``<!-- generated: readme -->``
    the README from "The two commands" to "Read on" (tested there), its links made relative to docs/.

It also adds ``deploy/helm-chart.md``, the Helm chart's own README, to the site.

``python docs/gen_reference.py [MARKER]`` prints what a marker becomes (``connector rest``).
"""

from __future__ import annotations

import importlib
import re
import sys
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.registry import GROUP, Registry  # noqa: E402
from gateway.schema import _DURATION_SCHEMA, _SECRET_SCHEMA, _SIZE_SCHEMA, _model_schema, build_schema  # noqa: E402

MARKER = re.compile(r"^<!-- generated: ([a-z0-9 _-]+) -->$", re.MULTILINE)
#: The keys of a ``to:`` entry that belong to the core, not to the connector.
CORE_TARGET_KEYS = ("connector", "body", "content_type", "headers", "reply")


# --- reading the schema -------------------------------------------------------------------------

def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """``X | None`` is written ``anyOf: [X, null]``: the option may be left out, so X is its type."""
    alts = node.get("anyOf")
    if alts and any(a.get("type") == "null" for a in alts):
        rest = [a for a in alts if a.get("type") != "null"]
        if len(rest) == 1:
            return {**{k: v for k, v in node.items() if k != "anyOf"}, **rest[0]}
        return {**node, "anyOf": rest}
    return node


def _is(node: dict[str, Any], written: dict[str, Any]) -> bool:
    return node.get("anyOf") == written["anyOf"]


def type_of(node: dict[str, Any], defs: dict[str, Any]) -> str:
    node = _without_null(node)
    if _is(node, _DURATION_SCHEMA):
        return "duration"
    if _is(node, _SIZE_SCHEMA):
        return "size"
    if _is(node, _SECRET_SCHEMA):
        return "secret"
    if "const" in node:
        return f"`{node['const']}`"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "$ref" in node:
        target = _resolve(node, defs)
        return "object" if target.get("type") == "object" or "properties" in target else type_of(target, defs)
    if "anyOf" in node:
        return " or ".join(dict.fromkeys(type_of(alt, defs) for alt in node["anyOf"]))
    kind = node.get("type")
    if kind == "array":
        items = node.get("items")
        return f"list of {type_of(items, defs)}" if items else "list"
    if kind == "object":
        values = node.get("additionalProperties")
        if isinstance(values, dict) and "properties" not in node:
            return f"map of {type_of(values, defs)}"
        return "object"
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}.get(str(kind), "any")


def _seconds(value: float) -> str:
    if value and value < 1:
        return f"{value * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


def _bytes(value: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def default_of(node: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in node:
        return "—"
    value = node["default"]
    bare = _without_null(node)
    if value is None:
        return "—"
    if _is(bare, _DURATION_SCHEMA):
        return f"`{_seconds(float(value))}`"
    if _is(bare, _SIZE_SCHEMA):
        return f"`{_bytes(int(value))}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value in ([], {}):
        return "empty"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    return f"`{value}`"


def _nested(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The object an option holds (its properties are listed under it), and the key form."""
    node = _without_null(node)
    alts = node.get("anyOf", [node])
    for alt in alts:
        if alt.get("type") == "array" and isinstance(alt.get("items"), dict):
            items = alt["items"]
            for item in items.get("anyOf", [items]):
                target = _resolve(item, defs)
                if "properties" in target:
                    return target, "[]"
        if "$ref" in alt:
            target = _resolve(alt, defs)
            if "properties" in target:
                return target, ""
        values = alt.get("additionalProperties")
        if alt.get("type") == "object" and isinstance(values, dict) and "$ref" in values:
            target = _resolve(values, defs)
            if "properties" in target:
                return target, '."HOST:PORT"'
    return None, ""


def option_rows(obj: dict[str, Any], defs: dict[str, Any], prefix: str = "",
                skip: tuple[str, ...] = (), seen: tuple[str, ...] = ()) -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every property, nested objects as dotted keys."""
    rows = []
    required = set(obj.get("required", []))
    for name, node in obj.get("properties", {}).items():
        if name in skip:
            continue
        key = f"{prefix}{name}"
        description = node.get("description", "")
        bare = _without_null(node)
        if any(_is(bare, w) for w in (_DURATION_SCHEMA, _SIZE_SCHEMA, _SECRET_SCHEMA)) or "const" in bare:
            description = "" if name != "type" else description
        rows.append((key, type_of(node, defs), default_of(node, name in required), " ".join(description.split())))
        child, form = _nested(node, defs)
        title = (child or {}).get("title", "")
        if child is not None and title not in seen and len(seen) < 3:
            rows += option_rows(child, defs, f"{key}{form}.", seen=(*seen, title))
    return rows


def table(rows: list[tuple[str, str, str, str]], first: str = "option") -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")
    if any(desc for *_, desc in rows):
        lines = [f"| {first} | type | default | description |", "| --- | --- | --- | --- |"]
        lines += [f"| `{key}` | {kind} | {default} | {cell(desc)} |" for key, kind, default, desc in rows]
    else:
        lines = [f"| {first} | type | default |", "| --- | --- | --- |"]
        lines += [f"| `{key}` | {kind} | {default} |" for key, kind, default, _ in rows]
    return "\n".join(lines)


# --- what the markers become --------------------------------------------------------------------

@cache
def schema() -> dict[str, Any]:
    return build_schema(Registry())


def connector_classes() -> dict[str, Any]:
    registry = Registry()
    return {kind: registry.get(kind) for kind in registry.kinds()}


def module_card(kind: str) -> str:
    """The docstring of the module the entry point names, from reST-ish text to Markdown."""
    ep = {ep.name: ep for ep in entry_points(group=GROUP)}[kind]
    module = importlib.import_module(ep.value.split(":")[0])
    text = module.__doc__ or ""
    text = re.sub(r":(?:mod|class|func|meth|attr):`~?([^`]+)`", r"``\1``", text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.DOTALL)
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if len(lines) > 1 and not lines[0].startswith(" ") and all(ln.startswith("  ") for ln in lines[1:]):
            out.append(f"**{lines[0].strip()}**")
            out.append(" ".join(ln.strip() for ln in lines[1:]))
        else:
            out.append(" ".join(ln.strip() for ln in lines))
    return "\n\n".join(out)


def connector_reference(kind: str) -> str:
    cls = connector_classes()[kind]
    config = _model_schema(cls.Config)
    options = _model_schema(cls.Options)
    cdefs, odefs = config.get("$defs", {}), options.get("$defs", {})
    parts = [
        "## Reference",
        f"Generated from the connector's code when this site is built: `type: {kind}` is "
        f"`{cls.__module__}.{cls.__name__}`.",
        "### Connector options",
        table(option_rows(config, cdefs, skip=("type",))),
    ]
    target_rows = option_rows(options, odefs, skip=CORE_TARGET_KEYS)
    parts.append("### Target options")
    if target_rows:
        parts.append("Keys of a route's `to:` entry for this connector, beside the core ones "
                     "(`connector`, `body`, `content_type`, `headers`, `reply`); strings are templates.")
        parts.append(table(target_rows))
    else:
        parts.append("None beside the core keys (`connector`, `body`, `content_type`, `headers`, `reply`): "
                     "this kind only receives.")
    parts += ["### Module card", module_card(kind)]
    return "\n\n".join(parts)


def gateway_settings() -> str:
    s = schema()
    defs = s["$defs"]
    gateway = _resolve(s["properties"]["gateway"], defs)
    return table(option_rows(gateway, defs), first="key")


def route_keys() -> str:
    s = schema()
    defs = s["$defs"]
    route = defs["RouteConfig"]
    rows = option_rows(route, defs, skip=("to",))
    target = defs["TargetSpec"]
    rows.append(("to", "list of object", "required", "targets (fan-out): the core keys below and the connector's own"))
    rows += option_rows(target, defs, prefix="to[].")
    return table(rows, first="key")


def connector_kinds() -> str:
    lines = ["| kind | what it does |", "| --- | --- |"]
    for kind in connector_classes():
        first = module_card(kind).split("\n")[0]
        summary = first.split("—", 1)[1].strip() if "—" in first else first
        lines.append(f"| [`{kind}`]({kind}.md) | {summary} |")
    return "\n".join(lines)


def readme_start() -> str:
    text = (ROOT / "README.md").read_text()
    start, end = text.index("\n## The two commands"), text.index("\n## Read on")
    return re.sub(r"\]\(docs/", "](", text[start:end].strip())


def generate(marker: str) -> str:
    words = marker.split()
    if words[0] == "connector" and len(words) == 2:
        return connector_reference(words[1])
    if words == ["gateway-settings"]:
        return gateway_settings()
    if words == ["route-keys"]:
        return route_keys()
    if words == ["connector-kinds"]:
        return connector_kinds()
    if words == ["readme"]:
        return readme_start()
    raise ValueError(f"unknown marker <!-- generated: {marker} -->")


def expand(markdown: str) -> str:
    return MARKER.sub(lambda m: generate(m.group(1).strip()), markdown)


# --- MkDocs hooks -------------------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    chart = (ROOT / "helm" / "gateway" / "README.md").read_text()
    files.append(File.generated(config, "deploy/helm-chart.md", content=chart))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown)


if __name__ == "__main__":
    print(generate(" ".join(sys.argv[1:]) or "gateway-settings"))
