"""Reshaping templates: Jinja2's immutable sandbox with StrictUndefined, compiled once at load.

Templates come from reviewed config (routes.yaml and template files beside it), never from
message content. A template that reads a missing value fails for that message (the target is
dead-lettered with the reason) instead of silently rendering an empty string.

Their inputs do come from messages, so every render is bounded in output size, values built,
loop iterations and time (``gateway.templates``; :mod:`gateway.routing.template_bounds`). A
template whose constants already break a bound (``{{ 10**10000000 }}``) is refused at load with
its line. A render that breaks a bound, or fails in any other way (``MemoryError`` and
``RecursionError`` included), raises :class:`TemplateError`: the same message would fail the
same way again, so the caller dead-letters it and never asks for a retry.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

import jinja2

from gateway.config.models import TemplateSettings
from gateway.routing.template_bounds import BoundedEnvironment, Budget, LimitExceeded, active, budget_for


class TemplateError(ValueError):
    """A template that does not compile (at load) or does not render (for one message)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


_SCALARS = (str, int, float)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def make_environment(
    base_dir: str = ".", finalize: Callable[[Any], Any] | None = None, limits: TemplateSettings | None = None
) -> BoundedEnvironment:
    """The bounded sandbox; ``finalize`` (if given) checks or escapes every substituted value."""
    bounds = limits or TemplateSettings()
    most = bounds.max_output

    def finalize_bounded(value: Any) -> Any:
        # A container prints every item, shared references included: size it before str() runs.
        if not isinstance(value, _SCALARS) or (isinstance(value, str) and len(value) > most):
            budget_for(bounds).text(value, "a substituted value")
        return value if finalize is None else finalize(value)

    env = BoundedEnvironment(
        bounds,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        loader=jinja2.FileSystemLoader(base_dir),
        finalize=finalize_bounded,
    )
    env.filters["tojson"] = _tojson
    env.filters["json"] = _tojson
    env.bound_filters()
    return env


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


class Template:
    """A compiled template; ``render(scope)`` raises :class:`TemplateError`.

    Compiled templates are cached per environment and source, so 10,000 routes sharing one
    template compile it once.
    """

    __slots__ = ("_limits", "_tpl", "source")

    def __init__(self, env: BoundedEnvironment, source: str, *, name: str | None = None):
        self.source = source
        self._limits = env.limits
        # The cache lives on the environment: a compiled template refers to its environment, so a
        # cache keyed by it elsewhere (even weakly) would keep every config's templates alive.
        cache: dict[str, Any] = env.__dict__.setdefault("_gateway_compiled", {})
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
        except LimitExceeded as exc:
            raise TemplateError(f"template refused: {exc}", exc.line) from None
        except (MemoryError, RecursionError) as exc:
            raise TemplateError(f"template too complex to compile ({type(exc).__name__})") from None

    @classmethod
    def from_file(cls, env: BoundedEnvironment, path: str, base_dir: str) -> Template:
        rel = os.path.relpath(os.path.join(base_dir, path), base_dir) if not os.path.isabs(path) else path
        if rel.startswith("..") or os.path.isabs(rel):
            raise TemplateError(f"template file {path!r} must be inside {base_dir!r}")
        return cls(env, f"{{file: {path}}}", name=rel)

    def render(self, scope: Mapping[str, Any]) -> str:
        limits = self._limits
        budget = Budget(limits, time.monotonic() + limits.render_timeout)
        token = active.set(budget)
        try:
            chunks = self._tpl.root_render_func(self._tpl.new_context(dict(scope)))
            parts: list[str] = []
            size = 0
            # A few hundred chunks at a time: checked as the render goes, at C speed per chunk.
            while batch := list(islice(chunks, 256)):
                size += sum(map(len, batch))
                budget.fits(size, "the rendered text")
                budget.check_time()
                parts += batch
            return "".join(parts)
        except LimitExceeded as exc:
            raise TemplateError(f"template refused: {exc}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(f"template reads a missing value: {exc.message}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"template refused by the sandbox: {exc}") from None
        except Exception as exc:  # MemoryError, RecursionError, a filter's TypeError...: all permanent
            raise TemplateError(f"template failed: {type(exc).__name__}: {exc}") from None
        finally:
            active.reset(token)
