"""Load and validate routes.yaml: the one validator behind `gateway validate`, `gateway run`,
hot reload, the admin API and the web editor.

The config's version hashes routes.yaml's text and the text of every file its templates read
(``body: {file: …}`` and what the templates include; :attr:`LoadedConfig.files`), so that an edit of
a template alone is a new version: reloaded, and shown in ``/api/config`` and
``gateway_config_info``. Without such files it is the hash of the text alone (:func:`config_version`).
Secrets given as ``{file: …}`` are never part of it: they are read again where they are used.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from gateway.config.models import FileModel, RouteConfig
from gateway.config.yamlsrc import ConfigError, Issue, Source, load_file, load_text
from gateway.contract import Connector, ConnectorConfig
from gateway.registry import Registry, UnknownKind
from gateway.routing.router import Router, compile_routes, pydantic_issues


@dataclass
class LoadedConfig:
    model: FileModel
    connectors: dict[str, ConnectorConfig]
    kinds: dict[str, type[Connector]]
    router: Router
    source: Source
    #: Content hash of the file and the files it reads (:func:`config_version`): the config
    #: version reported by /api/config and the metrics.
    version: str
    base_dir: str

    @property
    def files(self) -> Mapping[str, str]:
        """The files the routes' templates read: name relative to ``base_dir`` -> hash of the text
        (``""``: not there)."""
        return self.router.files


def config_version(text: str, files: Mapping[str, str]) -> str:
    """The version of routes.yaml's ``text`` with the ``files`` it reads (name -> hash of the text)."""
    digest = hashlib.sha256(text.encode("utf-8"))
    for name in sorted(files):
        digest.update(f"\0{name}\0{files[name]}".encode())
    return digest.hexdigest()[:12]


def files_on_disk(base_dir: str, names: Iterable[str]) -> dict[str, str]:
    """What :attr:`LoadedConfig.files` would hold for ``names`` now (blocking reads)."""
    found = {}
    for name in names:
        try:
            with open(os.path.join(base_dir, name), "rb") as fh:
                found[name] = hashlib.sha256(fh.read()).hexdigest()
        except OSError:
            found[name] = ""
    return found


def validate_source(src: Source, registry: Registry, base_dir: str) -> LoadedConfig:
    """Validate parsed YAML completely; raises :class:`ConfigError` listing every problem."""
    issues: list[Issue] = []
    if not isinstance(src.data, dict):
        raise ConfigError([src.issue((), "the top level must be a mapping with 'connectors' and 'routes'")])
    # Routes are validated one by one: pydantic holds the GIL for a whole call, so one call over
    # 10,000 routes would stop the event loop for a quarter second even from a worker thread.
    raw_routes = src.data.get("routes")
    try:
        model = FileModel.model_validate({**src.data, "routes": []} if isinstance(raw_routes, list) else src.data)
    except ValidationError as exc:
        issues.extend(pydantic_issues(src, exc))
        # Validate what we can of the rest so one run reports as much as possible.
        model = FileModel.model_construct(connectors=_connector_dicts(src.data), routes=[])
    if isinstance(raw_routes, list):
        routes = []
        for i, raw in enumerate(raw_routes):
            try:
                routes.append(RouteConfig.model_validate(raw))
            except ValidationError as exc:
                issues.extend(pydantic_issues(src, exc, ("routes", i)))
        if not issues:  # otherwise routes stay empty, as for any schema error: no cross-checks on half a model
            model = model.model_copy(update={"routes": routes})
    connectors: dict[str, ConnectorConfig] = {}
    kinds: dict[str, type[Connector]] = {}
    for name, raw in model.connectors.items():
        path = ("connectors", name)
        kind = raw.get("type")
        if not isinstance(kind, str):
            issues.append(src.issue(path, f"connector needs a 'type' (one of: {', '.join(registry.kinds())})"))
            continue
        try:
            cls = registry.get(kind)
        except UnknownKind as exc:
            issues.append(src.issue((*path, "type"), str(exc)))
            continue
        try:
            connectors[name] = cls.Config.model_validate(raw)
            kinds[name] = cls
        except ValidationError as exc:
            issues.extend(pydantic_issues(src, exc, path, list(cls.Config.model_fields)))
            kinds[name] = cls  # still lets routes referencing it be checked
    router, route_issues = compile_routes(model, kinds, src, base_dir)
    issues.extend(route_issues)
    if issues:
        issues.sort(key=lambda i: (i.line or 0))
        raise ConfigError(issues)
    version = config_version(src.text, router.files)
    return LoadedConfig(model, connectors, kinds, router, src, version, base_dir)


def _connector_dicts(data: Mapping[str, object]) -> dict[str, dict[str, object]]:
    raw = data.get("connectors")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict)}


def load_config(path: str, registry: Registry | None = None, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file. Template files resolve relative to its directory."""
    src = load_file(path, env=env)
    return validate_source(src, registry or Registry(), os.path.dirname(os.path.abspath(path)))


def load_config_text(
    text: str, *, file: str = "routes.yaml", base_dir: str = ".", registry: Registry | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    src = load_text(text, file=file, env=env)
    return validate_source(src, registry or Registry(), base_dir)
