"""Read routes.yaml into plain Python data, remembering where every value came from.

Every value's YAML path (``("routes", 2, "to", 0, "connector")``) maps to its line, so each
later error — schema, cross-reference, expression, template — can name the file and line.
``${VAR}`` and ``${VAR:-default}`` are interpolated in string scalars here; a value that came
from the environment is an :class:`FromEnv` string, which is how secret fields know they were
given by reference.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")


class FromEnv(str):
    """A string whose value was (at least partly) read from the environment."""

    __slots__ = ()


@dataclass(frozen=True)
class Issue:
    """One problem in a config file."""

    path: Path
    message: str
    line: int | None = None
    file: str = "routes.yaml"

    @property
    def dotted(self) -> str:
        return format_path(self.path)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.dotted}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "path": self.dotted, "message": self.message}


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass
class Source:
    """Parsed YAML plus the line of every path in it."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    file: str = "routes.yaml"
    text: str = ""

    def line_of(self, path: Path) -> int | None:
        """The line of ``path`` or of its nearest ancestor that has one."""
        p = tuple(path)
        while True:
            if p in self.lines:
                return self.lines[p]
            if not p:
                return None
            p = p[:-1]

    def issue(self, path: Path, message: str) -> Issue:
        return Issue(tuple(path), message, self.line_of(path), self.file)


class ConfigError(Exception):
    """The config is invalid; ``issues`` says every problem found."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` / ``${VAR:-default}``; ``$$`` is a literal ``$``. Unset without default → error."""
    used_env = False

    def sub(m: re.Match[str]) -> str:
        nonlocal used_env
        if m.group(0) == "$$":
            return "$"
        used_env = True
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    out = _VAR.sub(sub, text)
    return FromEnv(out) if used_env else out


def load_text(text: str, file: str = "routes.yaml", env: Mapping[str, str] | None = None) -> Source:
    """Parse YAML text. Raises :class:`ConfigError` with the line of a syntax error."""
    environ = os.environ if env is None else env
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        msg = f"YAML syntax error: {exc.problem or exc}"
        if exc.context:
            msg += f" ({exc.context})"
        raise ConfigError([Issue((), msg, line, file)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Issue((), f"YAML error: {exc}", None, file)]) from None
    src = Source(data=None, file=file, text=text)
    if node is None:
        src.data = {}
        return src
    issues: list[Issue] = []
    src.data = _build(node, (), src, issues, environ)
    if issues:
        raise ConfigError(issues)
    return src


def load_file(path: str, env: Mapping[str, str] | None = None) -> Source:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([Issue((), f"cannot read config: {exc.strerror}", None, path)]) from None
    except UnicodeDecodeError:
        raise ConfigError([Issue((), "config is not valid UTF-8", None, path)]) from None
    return load_text(text, file=path, env=env)


_constructor = yaml.SafeLoader("")
#: libyaml's parser when PyYAML was built with it (10× faster on large files); marks are the same.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _build(node: yaml.Node, path: Path, src: Source, issues: list[Issue], env: Mapping[str, str]) -> Any:
    src.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _constructor.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                issues.append(Issue(path, f"unsupported key {key!r}", key_node.start_mark.line + 1, src.file))
                continue
            skey = str(key)
            if skey in out:
                issues.append(Issue((*path, skey), "duplicate key", key_node.start_mark.line + 1, src.file))
                continue
            out[skey] = _build(value_node, (*path, skey), src, issues, env)
            src.lines[(*path, skey)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), src, issues, env) for i, item in enumerate(node.value)]
    value = _constructor.construct_object(node, deep=True)
    if isinstance(value, str) and "$" in value:
        try:
            return interpolate(value, env)
        except KeyError as exc:
            issues.append(
                Issue(path, f"environment variable {exc.args[0]} is not set (use ${{{exc.args[0]}:-default}} "
                      "for a default)", node.start_mark.line + 1, src.file)
            )
            return value
    return value
