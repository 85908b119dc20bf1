"""Reshaping templates: Jinja2's immutable sandbox with StrictUndefined, compiled once at load.

Templates come from reviewed config (routes.yaml and template files beside it), never from
message content. A template that reads a missing value fails for that message (the target is
dead-lettered with the reason) instead of silently rendering an empty string.

The files a config's templates read (``{file: …}`` bodies and what they, or any inline template,
include, import or extend by a constant name) are noted as they are read, with the hash of their
text: they are part of the config's version, and the watcher reloads when one changes.

Their inputs do come from messages, so every render is bounded in output size, values built,
loop iterations and time (``gateway.templates``; :mod:`gateway.routing.template_bounds`). A
template whose constants already break a bound (``{{ 10**10000000 }}``) is refused at load with
its line. A render that breaks a bound, or fails in any other way (``MemoryError`` and
``RecursionError`` included), raises :class:`TemplateError`: the same message would fail the
same way again, so the caller dead-letters it and never asks for a retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from itertools import islice
from typing import Any

import jinja2
import jinja2.meta
from jinja2.loaders import split_template_path

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


def text_digest(text: str) -> str:
    """The hash a read file's text goes into the config version with."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class _ReadingLoader(jinja2.FileSystemLoader):
    """A file loader that notes each file it reads in ``read``: name (relative to the config's
    directory) -> :func:`text_digest` of its text, ``""`` for one that is not there. A file read
    for the first time is looked through for the files it names in turn, so a change to an include
    changes the version even before any message has rendered it."""

    def __init__(self, base_dir: str, read: dict[str, str]):
        super().__init__(base_dir)
        self.read = read

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        # The name as the loader resolves it; one reaching outside the directory (``..``) is never
        # read, so a file there (a secret) is never hashed into a version that logs and metrics show.
        name = "/".join(split_template_path(template))
        try:
            source, filename, uptodate = super().get_source(environment, template)
        except jinja2.TemplateNotFound:
            self.read.setdefault(name, "")
            raise
        first = name not in self.read
        self.read[name] = text_digest(source)
        if first:
            note_references(environment, source)
        return source, filename, uptodate


def note_references(env: jinja2.Environment, source: str) -> None:
    """Have ``env``'s loader read the files ``source`` includes, imports or extends by a constant
    name (and theirs), so that they are noted; a name computed while rendering cannot be known."""
    loader = env.loader
    if not isinstance(loader, _ReadingLoader) or "{%" not in source or not any(
            word in source for word in ("include", "import", "extends")):
        return  # spares a second parse of the usual template
    try:
        names = jinja2.meta.find_referenced_templates(env.parse(source))
    except (jinja2.TemplateSyntaxError, MemoryError, RecursionError):
        return  # the compile reports it
    for name in names:
        if name is not None:
            try:
                if "/".join(split_template_path(name)) not in loader.read:
                    loader.get_source(env, name)
            except (jinja2.TemplateNotFound, OSError, UnicodeDecodeError):
                pass  # noted as missing: found only when rendered, as before


def make_environment(
    base_dir: str = ".", finalize: Callable[[Any], Any] | None = None, limits: TemplateSettings | None = None,
    *, read: dict[str, str] | None = None,
) -> BoundedEnvironment:
    """The bounded sandbox; ``finalize`` (if given) checks or escapes every substituted value.
    With ``read``, every file its templates read is noted there (see :class:`_ReadingLoader`)."""
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
        loader=jinja2.FileSystemLoader(base_dir) if read is None else _ReadingLoader(base_dir, read),
        finalize=finalize_bounded,
    )
    env.filters["tojson"] = _tojson
    env.filters["json"] = _tojson
    env.bound_filters()
    return env


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


#: Compiled inline templates kept per environment (one config's): the most recently used stay
#: compiled, the others compile again when next rendered (~0.3 ms each, on first use).
COMPILED_CACHE = 512


class Template:
    """A checked template; ``render(scope)`` raises :class:`TemplateError`.

    Loading a config checks every template the way compiling it would (syntax, filter and test
    names, constants that break a bound), but compiles to Python only on first use, keeping the
    :data:`COMPILED_CACHE` most recently used per environment: compiling is ~0.3 ms and ~30
    objects' worth of memory per template, so 10,000 routes compiled eagerly took seconds to load
    and hundreds of MiB to hold. Templates that differ only in their literal text (``site 12:
    {{ data.t }}``, ``site 13: {{ data.t }}``) compile to the same check: the first of such a
    shape is compiled in full, the others only lexed (see :func:`_shape`). Template files are
    compiled at load, as they are read then anyway.
    """

    __slots__ = ("_env", "_limits", "_tpl", "source")

    def __init__(self, env: BoundedEnvironment, source: str, *, name: str | None = None):
        self.source = source
        self._env = env
        self._limits = env.limits
        self._tpl: jinja2.Template | None = None
        try:
            if name is not None:
                # A file's template: compiled once per environment (the cache lives on it: a compiled
                # template refers to its environment, so a cache elsewhere would keep it alive).
                files: dict[str, jinja2.Template] = env.__dict__.setdefault("_gateway_files", {})
                tpl = files.get(name)
                if tpl is None:
                    tpl = files[name] = env.get_template(name)
                self._tpl = tpl
                return
            shapes: set[tuple[object, ...]] = env.__dict__.setdefault("_gateway_shapes", set())
            shape = _shape(env, source)
            if shape not in shapes:
                _compiled(env).put(source, env.from_string(source))
                note_references(env, source)
                shapes.add(shape)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"template syntax error: {exc.message}", exc.lineno) from None
        except jinja2.TemplateNotFound as exc:
            raise TemplateError(f"template file not found: {exc.name}") from None
        except LimitExceeded as exc:
            raise TemplateError(f"template refused: {exc}", exc.line) from None
        except (MemoryError, RecursionError) as exc:
            raise TemplateError(f"template too complex to compile ({type(exc).__name__})") from None

    def _compiled(self) -> jinja2.Template:
        if self._tpl is not None:
            return self._tpl
        cache = _compiled(self._env)
        tpl = cache.get(self.source)
        if tpl is None:
            tpl = self._env.from_string(self.source)  # checked at load: compiles
            cache.put(self.source, tpl)
        return tpl

    @classmethod
    def from_file(cls, env: BoundedEnvironment, path: str, base_dir: str) -> Template:
        rel = os.path.relpath(os.path.join(base_dir, path), base_dir) if not os.path.isabs(path) else path
        if rel.startswith("..") or os.path.isabs(rel):
            raise TemplateError(f"template file {path!r} must be inside {base_dir!r}")
        return cls(env, f"{{file: {path}}}", name=rel)

    def render(self, scope: Mapping[str, Any]) -> str:
        limits = self._limits
        try:
            tpl = self._compiled()  # before the clock starts: the first render compiles
        except Exception as exc:  # checked at load, so only MemoryError and the like
            raise TemplateError(f"template failed to compile: {type(exc).__name__}: {exc}") from None
        budget = Budget(limits, time.monotonic() + limits.render_timeout)
        token = active.set(budget)
        try:
            chunks = tpl.root_render_func(tpl.new_context(dict(scope)))
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


#: An expression block without quotes or braces: Jinja's lexer ends it at its first ``}}`` too.
_PLAIN_BLOCK = re.compile(r"\{\{([^{}'\"]*)\}\}")


def _shape(env: jinja2.Environment, source: str) -> tuple[object, ...]:
    """What compiling ``source`` depends on: its tokens, with each run of literal text reduced to
    its count of line breaks (literal text is never parsed, finalized or folded, so it cannot make
    a template fail to compile; its lines still place an error).

    The usual template (text and ``{{ … }}`` blocks without quotes or braces) is split by a regular
    expression, ~20 times faster than Jinja's lexer and the same split: no other block can start in
    its text (no ``{{``, ``{%``, ``{#``, no ``{`` just before a block). Any other goes to the lexer.
    """
    parts = _PLAIN_BLOCK.split(source)
    texts = parts[0::2]
    if not any("{{" in t or "{%" in t or "{#" in t for t in texts) and not any(t.endswith("{") for t in texts[:-1]):
        return ("plain", *(p.count("\n") if i % 2 == 0 else p for i, p in enumerate(parts)))
    return ("lexed", *(value.count("\n") if kind == "data" else value for _, kind, value in env.lex(source)))


class _Compiled:
    """A bounded LRU of compiled inline templates: source -> template."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, jinja2.Template] = OrderedDict()

    def get(self, source: str) -> jinja2.Template | None:
        tpl = self._items.get(source)
        if tpl is not None:
            with contextlib.suppress(KeyError):  # evicted meanwhile by a render in another thread
                self._items.move_to_end(source)
        return tpl

    def drop(self) -> list[jinja2.Template]:
        """Every template held, and hold none."""
        items = list(self._items.values())
        self._items.clear()
        return items

    def put(self, source: str, tpl: jinja2.Template) -> None:
        self._items[source] = tpl
        self._items.move_to_end(source)
        if len(self._items) > self.size:
            self._items.popitem(last=False)


def _compiled(env: jinja2.Environment) -> _Compiled:
    cache: _Compiled | None = env.__dict__.get("_gateway_compiled")
    if cache is None:
        cache = env.__dict__["_gateway_compiled"] = _Compiled(COMPILED_CACHE)
    return cache


def forget_compiled(env: jinja2.Environment) -> None:
    """Drop what ``env`` compiled and break the reference cycles of each compiled template (its
    module namespace holds its functions, whose globals are that namespace), and the environment's
    own, so reference counting alone frees them. Only for an environment no render uses any more."""
    found: list[jinja2.Template] = []
    cache = env.__dict__.pop("_gateway_compiled", None)
    if cache is not None:
        found += cache.drop()
    found += env.__dict__.pop("_gateway_files", {}).values()
    if env.cache is not None:
        found += [t for t in env.cache.values() if isinstance(t, jinja2.Template)]
        env.cache.clear()
    for tpl in found:
        tpl.root_render_func.__globals__.clear()
    env.__dict__.pop("_gateway_shapes", None)
    env.globals.clear()  # ``range`` is a bound method of the environment
