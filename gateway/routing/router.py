"""Compiled routes: pure selection and reshaping, no IO.

``Router.select(env)`` answers which routes take a message; ``Router.reshape`` renders what each
target of a route will receive. Both are deterministic functions of the envelope and the
compiled config, so they are table-tested and shared by the runtime, the dry run
(``gateway routes test``), the admin API and the web editor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from gateway.config.models import FileModel, RetryPolicy, RouteConfig, TargetSpec
from gateway.config.yamlsrc import Issue, Path, Source
from gateway.contract import Connector, SubstitutionCheck, Target, TargetOptions, TemplateText
from gateway.envelope import Envelope, ParseError
from gateway.registry import did_you_mean
from gateway.routing.expr import ExpressionError, Fn, compile_expression
from gateway.routing.templates import Template, TemplateError, forget_compiled, is_template, make_environment
from gateway.routing.trie import SubjectTrie, validate_pattern

if TYPE_CHECKING:
    # storm.py names its compiled controls privately; compile_storm is what makes them.
    from gateway.routing.storm import _Compiled as CompiledStorm

_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")


class ReshapeError(ValueError):
    """A target could not be rendered for this message (dead-letter it with this reason)."""


class MessageScope(Mapping[str, Any]):
    """The names conditions and templates see; ``data`` is parsed only when read."""

    __slots__ = ("_env",)
    _KEYS = ("data", "subject", "headers", "attributes", "source", "protocol", "id", "content_type",
             "body", "time", "auth")

    def __init__(self, env: Envelope):
        self._env = env

    def __getitem__(self, key: str) -> Any:
        env = self._env
        if key == "data":
            return env.data_or_none()
        if key == "subject":
            return env.subject
        if key == "headers":
            return env.headers
        if key == "attributes":
            return env.attributes
        if key == "source":
            return env.source
        if key == "protocol":
            return env.protocol
        if key == "id":
            return env.id
        if key == "content_type":
            return env.content_type
        if key == "body":
            return env.text
        if key == "time":
            return env.time.isoformat()
        if key == "auth":
            return env.attributes.get("auth")
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)


@dataclass
class CompiledTarget:
    index: int
    connector: str
    options: TargetOptions
    templated: dict[str, Any]
    body: Template | None
    content_type: str | None
    headers: dict[str, Template | str]
    reply: bool
    #: Whether rendering reads the message at all (a body, header or option template).
    templated_any: bool = field(init=False)
    spec: Target | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.templated_any = (self.body is not None or bool(self.templated)
                              or any(isinstance(v, Template) for v in self.headers.values()))

    def make_spec(self, route: CompiledRoute) -> Target:
        """Make, once, the Target every message of ``route`` (this target's route) gets here when
        the options are not templated."""
        self.spec = Target(route=route.name, connector=self.connector, options=self.options, want_reply=self.reply,
                           timeout=route.timeout)
        return self.spec

    @cached_property
    def options_json(self) -> str:
        """The options as the spool stores them (for a target whose options are not templated)."""
        return json.dumps(self.options.model_dump(mode="json"))


@dataclass
class CompiledRoute:
    index: int
    name: str
    sources: list[str]
    subjects: list[str]
    when: Fn | None
    when_reads_data: bool
    targets: list[CompiledTarget]
    mode: str
    timeout: float
    continue_: bool
    retry: RetryPolicy
    dead_letter: bool
    wants_reply: bool
    config: RouteConfig
    storm: CompiledStorm | None = None

    @cached_property
    def policy_json(self) -> str:
        """The retry policy as the spool stores it with each job."""
        return self.retry.model_dump_json()


@dataclass
class Selected:
    route: CompiledRoute
    #: Set when the route needs the parsed body and it does not parse.
    error: str | None = None


@dataclass
class Planned:
    """What one target of one route will receive for one message."""

    route: CompiledRoute
    target: CompiledTarget
    envelope: Envelope
    spec: Target


@dataclass
class _SourceIndex:
    trie: SubjectTrie
    always: list[int] = field(default_factory=list)

    def candidates(self, subject: str) -> list[int]:
        found = self.trie.match(subject)
        if self.always:
            found.update(self.always)
        return sorted(found)


class Router:
    def __init__(self, routes: list[CompiledRoute], index: dict[str, _SourceIndex],
                 files: Mapping[str, str] | None = None, envs: list[Any] | None = None):
        self.routes = routes
        self._index = index
        #: The template environments the routes' templates were compiled in (see :meth:`dismantle`).
        self.envs: list[Any] = envs or []
        #: The files the templates read when compiled (name relative to the config's directory ->
        #: hash of the text read, ``""`` when missing): part of the config's version.
        self.files: dict[str, str] = dict(files or {})
        self._reads_data: dict[str, bool] = {}

    def __len__(self) -> int:
        return len(self.routes)

    def dismantle(self) -> None:
        """Take apart a router no message uses any more, a small piece at a time (call it in a worker
        thread): freeing 10,000 routes in one go is a C call of a quarter second that holds the GIL,
        and so the event loop. Its compiled templates are the only reference cycles a config holds
        (:func:`~gateway.routing.templates.forget_compiled`): once they are broken, reference counting
        frees all of it, so a config the collector never looks at (``gc.freeze``) leaves nothing."""
        for env in self.envs:
            forget_compiled(env)
        self.envs = []
        routes = self.routes
        while routes:
            routes.pop()
        self._index = {}

    def route_named(self, name: str) -> CompiledRoute | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None

    def reads_data(self, source: str) -> bool:
        """Whether any route from ``source`` reads the parsed body (a ``when`` on ``data``, a
        template, a storm control): only then is a large body worth parsing ahead in steps."""
        answer = self._reads_data.get(source)
        if answer is None:
            answer = self._reads_data[source] = any(
                r.when_reads_data or r.storm is not None or any(t.templated_any for t in r.targets)
                for r in self.routes if source in r.sources)
        return answer

    def select(self, env: Envelope) -> list[Selected]:
        """The routes that take ``env``, in order. Pure."""
        idx = self._index.get(env.source)
        if idx is None:
            return []
        scope: MessageScope | None = None
        out: list[Selected] = []
        for i in idx.candidates(env.subject):
            route = self.routes[i]
            if route.when is not None:
                if route.when_reads_data:
                    try:
                        _ = env.data
                    except ParseError as exc:
                        out.append(Selected(route, f"route {route.name!r} needs the parsed body: {exc}"))
                        if not route.continue_:
                            break
                        continue
                scope = scope or MessageScope(env)
                try:
                    taken = route.when(scope)
                except (RecursionError, MemoryError) as exc:  # this message's data: permanent
                    out.append(Selected(route, f"route {route.name!r} condition failed: {type(exc).__name__}"))
                    if not route.continue_:
                        break
                    continue
                if not taken:
                    continue
            out.append(Selected(route))
            if not route.continue_:
                break
        return out

    def reshape(self, env: Envelope, route: CompiledRoute) -> list[Planned | tuple[CompiledTarget, str]]:
        """Render every target of ``route`` for ``env``: a plan, or (target, reason) when it fails."""
        # The scope parses the body: build it only for a target that renders something.
        scope: dict[str, Any] | None = None
        out: list[Planned | tuple[CompiledTarget, str]] = []
        for t in route.targets:
            try:
                if scope is None and t.templated_any:
                    scope = dict(MessageScope(env))
                out.append(self._plan(env, route, t, scope or {}))
            except (TemplateError, ReshapeError, ValidationError) as exc:
                out.append((t, f"route {route.name!r} target {t.index} ({t.connector}): {exc}"))
        return out

    @staticmethod
    def _plan(env: Envelope, route: CompiledRoute, t: CompiledTarget, scope: dict[str, Any]) -> Planned:
        changes: dict[str, Any] = {}
        if t.body is not None:
            try:
                changes["body"] = t.body.render(scope).encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, from a JSON "\ud800" escape
                raise ReshapeError(f"the rendered body is not valid text: {exc.reason}") from None
            changes["content_type"] = t.content_type or "text/plain; charset=utf-8"
        elif t.content_type:
            changes["content_type"] = t.content_type
        if t.headers:
            headers = dict(env.headers)
            for key, value in t.headers.items():
                rendered = value.render(scope) if isinstance(value, Template) else value
                _check_header(key, rendered)
                headers[key] = rendered
            changes["headers"] = headers
        new_env = env.evolve(**changes) if changes else env
        if t.templated:
            # Validate what the templates produced (a rendered value may not fit the option).
            rendered = _render_tree(t.templated, scope)
            options = type(t.options).model_validate({**t.options.model_dump(), **rendered})
            spec = Target(route=route.name, connector=t.connector, options=options, want_reply=t.reply,
                          timeout=route.timeout)
        else:  # the same for every message (a Target is frozen): made once
            spec = t.spec or t.make_spec(route)
        return Planned(route, t, new_env, spec)


def _check_header(key: str, value: str) -> None:
    for bad in _FORBIDDEN_IN_HEADERS:
        if bad in value or bad in key:
            raise ReshapeError(f"header {key!r} would contain {bad!r} (header injection refused)")


@dataclass(frozen=True)
class _CheckedTemplate:
    """An option template whose rendering the connector checks against the route's text."""

    option: str
    template: Template
    text: TemplateText
    check: Callable[[str, TemplateText], str]

    def render(self, scope: Mapping[str, Any]) -> str:
        rendered = self.template.render(scope)
        try:
            return self.check(rendered, self.text)
        except ValueError as exc:
            raise ReshapeError(f"{self.option}: {exc}") from None


def template_text(env: Any, source: str) -> TemplateText:
    """``source`` split by Jinja's own lexer into literal text and template parts."""
    pieces: list[str | None] = []
    for _, kind, value in env.lex(source):
        if kind == "data":
            if pieces and isinstance(pieces[-1], str):
                pieces[-1] += value
            else:
                pieces.append(value)
        elif not pieces or pieces[-1] is not None:
            pieces.append(None)
    return TemplateText(source, tuple(pieces))


def _render_tree(tree: Any, scope: Mapping[str, Any]) -> Any:
    if isinstance(tree, Template | _CheckedTemplate):
        return tree.render(scope)
    if isinstance(tree, dict):
        return {k: _render_tree(v, scope) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_render_tree(v, scope) for v in tree]
    return tree


def _compile_tree(value: Any, env: Any, path: Path, issues: list[Issue], src: Source,
                  check: SubstitutionCheck | None = None, option: str = "") -> tuple[Any, bool]:
    """Templates inside an options value; returns (tree, has_templates). ``option`` names the
    value in a refusal's reason (``to[1]``, ``mail_headers.X-Site``)."""
    if isinstance(value, str):
        if is_template(value):
            try:
                template = Template(env, value)
                if check is not None and check.result is not None:
                    return _CheckedTemplate(option, template, template_text(env, value), check.result), True
                return template, True
            except TemplateError as exc:
                issues.append(src.issue(path, str(exc)))
        return value, False
    if isinstance(value, list):
        items = [_compile_tree(v, env, (*path, i), issues, src, check, f"{option}[{i}]")
                 for i, v in enumerate(value)]
        return [i[0] for i in items], any(i[1] for i in items)
    if isinstance(value, dict):
        pairs = {k: _compile_tree(v, env, (*path, k), issues, src, check, f"{option}.{k}")
                 for k, v in value.items()}
        return {k: p[0] for k, p in pairs.items()}, any(p[1] for p in pairs.values())
    return value, False


def pydantic_issues(
    src: Source, exc: ValidationError, prefix: Path = (), keys: list[str] | None = None
) -> list[Issue]:
    """Translate pydantic errors into issues with YAML paths, lines and suggestions."""
    out = []
    for err in exc.errors():
        loc: Path = (*prefix, *[p if isinstance(p, int) else str(p) for p in err["loc"]])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = loc[:-1]
            msg = f"unknown key {loc[-1]!r}"
            allowed = keys if keys is not None and parent == prefix else _allowed_keys(_model_for(parent))
            if allowed:
                msg += did_you_mean(str(loc[-1]), allowed)
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(src.issue(loc, msg))
    return out


def _allowed_keys(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_for(path: Path) -> type[BaseModel] | None:
    from gateway.config import models as m

    if not path:
        return m.FileModel
    if path == ("gateway",):
        return m.GatewaySettings
    if len(path) == 2 and path[0] == "gateway":
        sections: dict[str, type[BaseModel]] = {"admin": m.AdminSettings, "spool": m.SpoolSettings,
                                                "log": m.LogSettings, "templates": m.TemplateSettings}
        return sections.get(str(path[1]))
    if len(path) == 2 and path[0] == "routes":
        return m.RouteConfig
    if len(path) == 3 and path[0] == "routes" and path[2] == "match":
        return m.Match
    if len(path) == 3 and path[0] == "routes" and path[2] == "on_failure":
        return m.FailurePolicy
    if len(path) == 4 and path[0] == "routes" and path[3] == "retry":
        return m.RetryPolicy
    return None


_CORE_TARGET_KEYS = set(TargetSpec.model_fields)


def compile_routes(
    model: FileModel,
    kinds: Mapping[str, type[Connector]],
    src: Source,
    base_dir: str = ".",
) -> tuple[Router, list[Issue]]:
    """Compile validated routes against the configured connectors. Collects every issue."""
    issues: list[Issue] = []
    read: dict[str, str] = {}
    jenv = make_environment(base_dir, limits=model.gateway.templates, read=read)
    # One environment per kind of template, shared by all routes: each has its cache of checked
    # shapes and compiled templates (see Template), and making one costs a fifth of a millisecond.
    envs: dict[object, Any] = {None: jenv, "storm": make_environment()}
    routes: list[CompiledRoute] = []
    index: dict[str, _SourceIndex] = {}
    seen_names: dict[str, int] = {}
    names = list(kinds)
    conditions: dict[str, Fn] = {}
    for i, rc in enumerate(model.routes):
        path: Path = ("routes", i)
        if rc.name in seen_names:
            issues.append(src.issue((*path, "name"), f"duplicate route name {rc.name!r} "
                                    f"(also routes[{seen_names[rc.name]}])"))
        seen_names.setdefault(rc.name, i)
        sources = rc.sources()
        ok_sources = []
        for j, s in enumerate(sources):
            p = (*path, "from") if isinstance(rc.from_, str) else (*path, "from", j)
            cls = kinds.get(s)
            if cls is None:
                issues.append(src.issue(p, f"unknown connector {s!r}{did_you_mean(s, names)}"))
            elif not cls.supports_inbound:
                issues.append(src.issue(p, f"connector {s!r} (type {cls.kind}) cannot receive messages"))
            else:
                ok_sources.append(s)
        when: Fn | None = None
        reads_data = False
        if rc.match.when:
            try:
                when = conditions.get(rc.match.when)
                if when is None:  # a compiled condition is a pure function: routes share it
                    when = conditions[rc.match.when] = compile_expression(rc.match.when)
                reads_data = "data" in rc.match.when
            except ExpressionError as exc:
                col = f" (column {exc.column})" if exc.column and exc.column > 0 else ""
                issues.append(src.issue((*path, "match", "when"), f"{exc}{col}"))
        subjects = rc.match.subjects()
        invalid: set[tuple[str, str]] = set()  # (pattern, syntax)
        for j, pattern in enumerate(subjects):
            p = (*path, "match", "subject") if isinstance(rc.match.subject, str) else (*path, "match", "subject", j)
            for s in ok_sources:
                syntax = kinds[s].subject_syntax
                err = validate_pattern(pattern, syntax)
                if err:
                    invalid.add((pattern, syntax))
                    issues.append(src.issue(p, f"{err} (source {s!r} uses {syntax} patterns)"))
                    break
        targets: list[CompiledTarget] = []
        for j, spec in enumerate(rc.to):
            tp: Path = (*path, "to", j)
            compiled = _compile_target(spec, j, kinds, names, envs, base_dir, tp, src, issues)
            if compiled:
                targets.append(compiled)
        if sum(1 for t in rc.to if t.reply) > 1:
            issues.append(src.issue((*path, "to"), "only one target can be the reply (reply: true)"))
        if rc.wants_reply and rc.mode == "spooled":
            issues.append(src.issue((*path, "mode"), "a request/reply route is always direct; remove mode: spooled"))
        storm = None
        try:
            from gateway.routing.storm import compile_storm

            storm = compile_storm(rc.name, rc.dedupe, rc.throttle, rc.digest, rc.alarm, envs["storm"])
        except (ExpressionError, TemplateError) as exc:
            which = next(k for k in ("alarm", "dedupe", "throttle", "digest") if getattr(rc, k) is not None)
            issues.append(src.issue((*path, which), str(exc)))
        route = CompiledRoute(
            index=i, name=rc.name, sources=ok_sources, subjects=subjects, when=when, when_reads_data=reads_data,
            targets=targets, mode=rc.effective_mode, timeout=rc.timeout, continue_=rc.continue_,
            retry=rc.on_failure.retry, dead_letter=rc.on_failure.dead_letter, wants_reply=rc.wants_reply,
            config=rc, storm=storm,
        )
        routes.append(route)
        for s in ok_sources:
            idx = index.get(s)
            if idx is None:
                idx = index[s] = _SourceIndex(SubjectTrie(kinds[s].subject_syntax))
            if subjects:
                for pattern in subjects:
                    if (pattern, idx.trie.syntax) not in invalid:
                        idx.trie.add(pattern, i)
            else:
                idx.always.append(i)
    # A copy: an include read again while rendering (changed since) must not change the version.
    return Router(routes, index, dict(read), list(envs.values())), issues


def _compile_target(
    spec: TargetSpec,
    j: int,
    kinds: Mapping[str, type[Connector]],
    names: list[str],
    envs: dict[object, Any],
    base_dir: str,
    tp: Path,
    src: Source,
    issues: list[Issue],
) -> CompiledTarget | None:
    cls = kinds.get(spec.connector)
    if cls is None:
        issues.append(src.issue((*tp, "connector"), f"unknown connector {spec.connector!r}"
                                f"{did_you_mean(spec.connector, names)}"))
        return None
    if not cls.supports_outbound:
        issues.append(src.issue((*tp, "connector"), f"connector {spec.connector!r} (type {cls.kind}) cannot send"))
        return None
    raw_options = {k: v for k, v in (spec.model_extra or {}).items() if k not in _CORE_TARGET_KEYS}
    jenv = envs[None]
    body: Template | None = None
    if spec.body is not None:
        try:
            if isinstance(spec.body, dict):
                file = spec.body["file"]
                if not os.path.exists(os.path.join(base_dir, file)):
                    raise TemplateError(f"template file not found: {file}")
                body = Template.from_file(jenv, file, base_dir)
            else:
                body = Template(jenv, spec.body)
        except TemplateError as exc:
            multiline = isinstance(spec.body, dict) or "\n" in spec.body.strip()
            line = f" (template line {exc.line})" if exc.line and multiline else ""
            issues.append(src.issue((*tp, "body"), f"{exc}{line}"))
    headers: dict[str, Template | str] = {}
    for key, value in spec.headers.items():
        if any(c in key for c in _FORBIDDEN_IN_HEADERS) or any(c in value for c in _FORBIDDEN_IN_HEADERS):
            issues.append(src.issue((*tp, "headers", key), "CR, LF and NUL are not allowed in headers"))
            continue
        try:
            headers[key] = Template(jenv, value) if is_template(value) else value
        except TemplateError as exc:
            issues.append(src.issue((*tp, "headers", key), str(exc)))
    try:
        options = cls.Options.model_validate(raw_options)
    except ValidationError as exc:
        issues.extend(pydantic_issues(src, exc, tp, [*_CORE_TARGET_KEYS, *_allowed_keys(cls.Options)]))
        return None
    templated: dict[str, Any] = {}
    for key, value in raw_options.items():
        check = cls.Options.substitution_checks.get(key)
        each = check.each if check is not None else None
        field_env = jenv
        if each is not None:
            field_env = envs.get(each)
            if field_env is None:
                field_env = envs[each] = make_environment(base_dir, finalize=each, limits=jenv.limits,
                                                          read=jenv.loader.read)
        tree, has = _compile_tree(value, field_env, (*tp, key), issues, src, check, key)
        if has:
            templated[key] = tree
    return CompiledTarget(
        index=j, connector=spec.connector, options=options, templated=templated, body=body,
        content_type=spec.content_type, headers=headers, reply=spec.reply,
    )
