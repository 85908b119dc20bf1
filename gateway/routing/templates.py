"""Reshaping templates: Jinja2's immutable sandbox with StrictUndefined, compiled once at load.

Templates come from reviewed config (routes.yaml and template files beside it), never from
message content. A template that reads a missing value fails for that message (the target is
dead-lettered with the reason) instead of silently rendering an empty string.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template that does not compile (at load) or does not render (for one message)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def make_environment(
    base_dir: str = ".", finalize: Callable[[Any], Any] | None = None
) -> ImmutableSandboxedEnvironment:
    """The sandbox; ``finalize`` (if given) checks or escapes every substituted value."""
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        loader=jinja2.FileSystemLoader(base_dir),
        finalize=finalize,
    )
    env.filters["tojson"] = _tojson
    env.filters["json"] = _tojson
    return env


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


_compiled: weakref.WeakKeyDictionary[ImmutableSandboxedEnvironment, dict[str, Any]] = weakref.WeakKeyDictionary()


class Template:
    """A compiled template; ``render(scope)`` raises :class:`TemplateError`.

    Compiled templates are cached per environment and source, so 10,000 routes sharing one
    template compile it once.
    """

    __slots__ = ("_tpl", "source")

    def __init__(self, env: ImmutableSandboxedEnvironment, source: str, *, name: str | None = None):
        self.source = source
        cache = _compiled.setdefault(env, {})
        key = f"file:{name}" if name is not None else source
        cached = cache.get(key)
        if cached is not None:
            self._tpl = cached
            return
        try:
            if name is not None:
                self._tpl = env.get_template(name)
            else:
                self._tpl = env.from_string(source)
            cache[key] = self._tpl
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template syntax error: {exc.message}", exc.lineno) from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template file not found: {exc.name}") from None

    @classmethod
    def from_file(cls, env: ImmutableSandboxedEnvironment, path: str, base_dir: str) -> Template:
        rel = os.path.relpath(os.path.join(base_dir, path), base_dir) if not os.path.isabs(path) else path
        if rel.startswith("..") or os.path.isabs(rel):
            raise TemplateError(f"template file {path!r} must be inside {base_dir!r}")
        return cls(env, f"{{file: {path}}}", name=rel)

    def render(self, scope: Mapping[str, Any]) -> str:
        try:
            return str(self._tpl.render(scope))
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template reads a missing value: {exc.message}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"template refused by the sandbox: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, jinja2.TemplateError) as exc:
            raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from None
