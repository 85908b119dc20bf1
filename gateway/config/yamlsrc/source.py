"""The parsed form of routes.yaml: :class:`Source` (the data and the line of every path in it),
:class:`Issue` and :class:`ConfigError`, and ``${VAR}`` interpolation (:class:`FromEnv` marks a
string that came from the environment, which is how secret fields know they were given by
reference)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
