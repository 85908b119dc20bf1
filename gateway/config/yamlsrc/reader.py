"""YAML text to a :class:`~gateway.config.yamlsrc.source.Source`, read from the parser's events.

The contract: whatever the text, :func:`load_text` returns a Source or raises
:class:`~gateway.config.yamlsrc.source.ConfigError`, whose issues carry the line; no other
exception leaves it. Its time and memory are bounded by the text's length and by ``max_nodes``
(default :data:`MAX_NODES`), the number of values and keys the document holds once its aliases
are expanded: the alias that would take the document past it is refused at once, naming its
anchor, before any of its expansion is built. Every load has its own parser, and nothing of a
load outlives it but the Source.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from gateway.config.yamlsrc.source import ConfigError, Issue, Path, Source, interpolate

#: Values and keys a document may hold once its aliases are expanded (a 10,000-route file holds
#: about 200,000).
MAX_NODES = 1_000_000
#: Mappings and sequences nested in one another.
MAX_DEPTH = 100
#: Characters of a scalar that reads as a number (no setting needs more; Python's int parsing
#: is quadratic in the digits).
MAX_NUMBER_CHARS = 100

#: libyaml's parser when PyYAML was built with it (10× faster on large files); marks are the same.
_PARSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ, _MERGE = _TAG + "str", _TAG + "map", _TAG + "seq", _TAG + "merge"
#: The scalar tags read, and what an invalid value of each is called.
_SCALARS = {_TAG + "null": "null", _TAG + "bool": "boolean", _TAG + "int": "integer", _TAG + "float": "number",
            _TAG + "binary": "base64 value", _TAG + "timestamp": "date", _STR: "string"}
_NUMBERS = {_TAG + "int", _TAG + "float"}
#: Syntax errors noticed only where the text goes on without closing something opened earlier
#: (a quote, a bracket, a key without its colon): the line it was opened on is the broken one.
_LEFT_OPEN = ("while scanning a quoted scalar", "while scanning a simple key", "while parsing a flow",
              "while scanning a block scalar")


def load_text(text: str, file: str = "routes.yaml", env: Mapping[str, str] | None = None, *,
              max_nodes: int = MAX_NODES) -> Source:
    """Parse YAML text, interpolating ``${VAR}``. Raises :class:`ConfigError`, never anything else."""
    return _Reader(text, file, os.environ if env is None else env, max_nodes).source()


def load_data(text: str, file: str = "sample", *, max_nodes: int = MAX_NODES) -> Any:
    """YAML or JSON data that is not a config (a sample message, route tests): read with the same
    rules and bounds as :func:`load_text`, ``${VAR}`` left as written. Raises :class:`ConfigError`."""
    return _Reader(text, file, None, max_nodes).source().data


def load_file(path: str, env: Mapping[str, str] | None = None, *, max_nodes: int = MAX_NODES) -> Source:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([Issue((), f"cannot read config: {exc.strerror}", None, path)]) from None
    except UnicodeDecodeError:
        with open(path, "rb") as fb:
            decode(fb.read(), path)
        raise ConfigError([Issue((), "config is not valid UTF-8", None, path)]) from None
    return load_text(text, file=path, env=env, max_nodes=max_nodes)


def decode(raw: bytes, file: str = "routes.yaml") -> str:
    """UTF-8 bytes as text; :class:`ConfigError` with the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([Issue((), f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})", line, file)]) from None


class _Stop(Exception):
    """The rest of the document cannot be read: a syntax error or a bound."""

    def __init__(self, issue: Issue):
        super().__init__(issue.message)
        self.issue = issue


@dataclass
class _Span:
    """A value read once and used again (an anchor, a merge source): the value and the entries
    ``log[start:end]`` its reading added, whose paths begin with ``cut`` elements of its own."""

    value: Any
    start: int
    end: int
    cut: int
    nodes: int
    depth: int
    line: int


class _Reader:
    """One load: the parser's events turned into data, with the line of every path.

    Lines go to ``log`` in reading order as ``(path, line)``, so an alias can replay its anchor's
    entries under another path; the last entry of a path wins.
    """

    def __init__(self, text: str, file: str, env: Mapping[str, str] | None, max_nodes: int):
        self.text, self.file, self.env, self.max_nodes = text, file, env, max_nodes
        self.constructor = SafeConstructor()
        self.parser: Any = None
        self.issues: list[Issue] = []
        self.log: list[tuple[Path, int]] = []
        self.anchors: dict[str, _Span] = {}
        self.open_anchors: set[str] = set()
        self.nodes = 0
        self.deepest = 0

    def source(self) -> Source:
        try:
            parser = _PARSER(self.text)
        except UnicodeEncodeError as exc:  # a lone surrogate: libyaml reads UTF-8 bytes
            line = self.text.count("\n", 0, exc.start) + 1
            raise ConfigError([Issue((), f"not valid Unicode (lone surrogate U+{ord(self.text[exc.start]):04X})",
                                     line, self.file)]) from None
        self.parser = parser
        try:
            data = self._stream()
        except _Stop as stop:
            raise ConfigError([*self.issues, stop.issue]) from None
        finally:
            parser.dispose()
        if self.issues:
            raise ConfigError(self.issues)
        lines: dict[Path, int] = {}
        for path, line in self.log:  # not dict(self.log): one C call would hold the GIL for all of it
            lines[path] = line
        return Source(data=data, lines=lines, file=self.file, text=self.text)

    # --- events ----------------------------------------------------------------------------

    def _next(self) -> yaml.Event:
        try:
            ev: yaml.Event = self.parser.get_event()
        except yaml.YAMLError as exc:
            raise _Stop(self._syntax_issue(exc)) from None
        return ev

    def _peek(self) -> yaml.Event:
        try:
            ev: yaml.Event = self.parser.peek_event()
        except yaml.YAMLError as exc:
            raise _Stop(self._syntax_issue(exc)) from None
        return ev

    def _syntax_issue(self, exc: yaml.YAMLError) -> Issue:
        if isinstance(exc, yaml.MarkedYAMLError):
            problem = exc.problem_mark.line + 1 if exc.problem_mark else None
            context = exc.context_mark.line + 1 if exc.context_mark else None
            line = context if context and exc.context and exc.context.startswith(_LEFT_OPEN) else problem or context
            msg = f"YAML syntax error: {exc.problem or exc}"
            if exc.context:
                msg += f" ({exc.context})"
            if problem and problem != line:
                msg += f"; noticed at line {problem}"
            return Issue((), msg, line, self.file)
        if isinstance(exc, yaml.reader.ReaderError):
            # libyaml counts the position in UTF-8 bytes, PyYAML's own reader in characters.
            before = self.text.encode("utf-8")[:exc.position] if _PARSER is not yaml.SafeLoader \
                else self.text[:exc.position].encode("utf-8")
            char = exc.character if isinstance(exc.character, int) else ord(exc.character)
            return Issue((), f"character U+{char:04X} is not allowed in YAML ({exc.reason})",
                         before.count(b"\n") + 1, self.file)
        return Issue((), f"YAML error: {exc}", None, self.file)

    def _stream(self) -> Any:
        self._next()  # StreamStart
        if isinstance(self._peek(), yaml.StreamEndEvent):
            return {}
        self._next()  # DocumentStart
        data = self._node((), 0)
        self._next()  # DocumentEnd
        ev = self._next()
        if not isinstance(ev, yaml.StreamEndEvent):
            raise _Stop(Issue((), "a second YAML document starts here; the file holds one document",
                              _line(ev), self.file))
        return {} if data is None else data

    # --- nodes -----------------------------------------------------------------------------

    def _node(self, path: Path, depth: int) -> Any:
        """Read the next node (and everything in it) as the value at ``path``."""
        ev = self._next()
        line = _line(ev)
        if isinstance(ev, yaml.AliasEvent):
            span = self._alias(ev.anchor or "", path, depth, line)
            if span is None:
                return None
            for i in range(span.start, span.end):
                p, ln = self.log[i]
                self.log.append(((*path, *p[span.cut:]), ln))
            self.log.append((path, line))
            return _copy(span.value)
        if depth > MAX_DEPTH:
            raise _Stop(Issue((), f"mappings and sequences nested deeper than {MAX_DEPTH} levels", line, self.file))
        self._count(1, path, line)
        self.deepest = max(self.deepest, depth)
        anchor: str | None = getattr(ev, "anchor", None)
        if anchor is None:
            return self._content(ev, path, depth, line)
        # The anchor names this node from its start: an alias to it inside it is a cycle.
        self.anchors.pop(anchor, None)
        self.open_anchors.add(anchor)
        start, nodes, outer = len(self.log), self.nodes - 1, self.deepest
        self.deepest = depth
        value = self._content(ev, path, depth, line)
        self.anchors[anchor] = _Span(value, start, len(self.log), len(path), self.nodes - nodes,
                                     self.deepest - depth, line)
        self.deepest = max(outer, self.deepest)
        self.open_anchors.discard(anchor)
        return value

    def _content(self, ev: yaml.Event, path: Path, depth: int, line: int) -> Any:
        self.log.append((path, line))
        if isinstance(ev, yaml.ScalarEvent):
            return self._scalar(ev, path, line)
        tag = ev.tag  # type: ignore[attr-defined]
        if isinstance(ev, yaml.SequenceStartEvent):
            if tag not in (None, "!", _SEQ):
                self._unknown_tag(path, tag, line)
            out: list[Any] = []
            while not isinstance(self._peek(), yaml.SequenceEndEvent):
                out.append(self._node((*path, len(out)), depth + 1))
            self._next()
            return out
        if isinstance(ev, yaml.MappingStartEvent):
            if tag not in (None, "!", _MAP):
                self._unknown_tag(path, tag, line)
            return self._mapping(path, depth)
        raise _Stop(Issue(path, f"unexpected {type(ev).__name__}", line, self.file))

    def _alias(self, name: str, path: Path, depth: int, line: int) -> _Span | None:
        """The anchor ``*name`` refers to, counted against the bounds; None (an issue) if there is none."""
        span = self.anchors.get(name)
        if span is None:
            why = (f"alias *{name} is inside its own anchor &{name} (a value cannot contain itself)"
                   if name in self.open_anchors else f"alias *{name} has no anchor &{name} before it")
            self.issues.append(Issue(path, why, line, self.file))
            return None
        if depth + span.depth > MAX_DEPTH:
            raise _Stop(Issue(path, f"alias *{name} (anchor at line {span.line}) nests the document deeper "
                                    f"than {MAX_DEPTH} levels", line, self.file))
        self._count(span.nodes, path, line, f"alias *{name} (anchor at line {span.line}) adds {span.nodes} values: ")
        self.deepest = max(self.deepest, depth + span.depth)
        return span

    def _count(self, nodes: int, path: Path, line: int, why: str = "") -> None:
        self.nodes += nodes
        if self.nodes > self.max_nodes:
            raise _Stop(Issue(path, f"{why}the document holds more than {self.max_nodes} values and keys with its "
                                    "aliases expanded (aliases of aliases multiply)", line, self.file))

    def _scalar(self, ev: yaml.ScalarEvent, path: Path, line: int) -> Any:
        tag = ev.tag
        if tag is None or tag == "!":
            tag = self.parser.resolve(yaml.ScalarNode, ev.value, ev.implicit)
        text = ev.value
        if tag in (_STR, _MERGE):  # a "<<" that is not a key is just text
            value: Any = text
        elif tag not in _SCALARS:
            self._unknown_tag(path, tag, line)
            return None
        elif tag in _NUMBERS and len(text) > MAX_NUMBER_CHARS:
            self.issues.append(Issue(path, f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})",
                                     line, self.file))
            return None
        else:
            try:
                value = SafeConstructor.yaml_constructors[tag](
                    self.constructor, yaml.ScalarNode(tag, text, style=ev.style))
            except Exception as exc:  # PyYAML's constructors fail with any of half a dozen types
                self.issues.append(Issue(path, self._invalid_scalar(text, tag, ev, exc), line, self.file))
                return None
        if self.env is not None and isinstance(value, str) and "$" in value:
            try:
                return interpolate(value, self.env)
            except KeyError as exc:
                self.issues.append(Issue(path, f"environment variable {exc.args[0]} is not set (use "
                                               f"${{{exc.args[0]}:-default}} for a default)", line, self.file))
        return value

    def _unknown_tag(self, path: Path, tag: str, line: int) -> None:
        self.issues.append(Issue(path, f"unknown tag {_short(tag)} (routes.yaml takes plain YAML)", line, self.file))

    @staticmethod
    def _invalid_scalar(text: str, tag: str, ev: yaml.ScalarEvent, exc: Exception) -> str:
        shown = text if len(text) <= 40 else text[:37] + "..."
        msg = f"{shown!r} is not a valid {_SCALARS[tag]}"
        if isinstance(exc, ValueError) and tag == _TAG + "timestamp":
            msg += f" ({exc})"
        if ev.tag is None:
            msg += "; quote it if it is text"
        return msg

    def _mapping(self, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merges: list[_Span] = []
        merged_at: int | None = None
        while not isinstance(self._peek(), yaml.MappingEndEvent):
            ev = self._next()
            line = _line(ev)
            self._count(1, path, line)
            key = self._key(ev, path, line)
            if key is _MERGE_KEY and merged_at is None:
                merged_at = line
                merges = self._merge_sources(path, depth, line)
                continue
            if key is _MERGE_KEY:
                self.issues.append(Issue(path, f"a second merge key '<<' (the first is at line {merged_at})",
                                         line, self.file))
                key = None
            elif isinstance(key, str) and key in out:
                self.issues.append(Issue((*path, key), "duplicate key", line, self.file))
                key = None
            if not isinstance(key, str):
                self._skip()
                continue
            out[key] = self._node((*path, key), depth + 1)
            self.log.append(((*path, key), line))
        self._next()
        for span in merges:
            self._merge(out, span, path)
        return out

    def _key(self, ev: yaml.Event, path: Path, line: int) -> str | object | None:
        """The key ``ev`` starts: its text, :data:`_MERGE_KEY`, or None (an issue; the key is consumed)."""
        if isinstance(ev, yaml.ScalarEvent):
            tag = ev.tag
            if tag is None and self.parser.resolve(yaml.ScalarNode, ev.value, ev.implicit) == _MERGE:
                return _MERGE_KEY
            if tag not in (None, "!") and tag not in _SCALARS:
                self._unknown_tag(path, tag, line)
                return None
            if ev.value == "" and ev.implicit[0]:
                self.issues.append(Issue(path, "a key is missing before ':'", line, self.file))
                return None
            if ev.anchor is not None:
                self.anchors[ev.anchor] = _Span(ev.value, 0, 0, 0, 1, 0, line)
            return ev.value
        if isinstance(ev, yaml.AliasEvent):
            self.issues.append(Issue(path, f"an alias (*{ev.anchor}) cannot be a key", line, self.file))
            return None
        kind = "mapping" if isinstance(ev, yaml.MappingStartEvent) else "sequence"
        self.issues.append(Issue(path, f"a key must be a string, not a {kind}", line, self.file))
        self._skip(1)
        return None

    def _skip(self, level: int = 0) -> None:
        """Consume the rest of a node without reading it (its aliases are not expanded)."""
        while True:
            ev = self._next()
            if isinstance(ev, yaml.SequenceStartEvent | yaml.MappingStartEvent):
                level += 1
            elif isinstance(ev, yaml.SequenceEndEvent | yaml.MappingEndEvent):
                level -= 1
            if level <= 0:
                return

    def _merge_sources(self, path: Path, depth: int, line: int) -> list[_Span]:
        """The mappings a ``<<`` key merges: an alias, a mapping, or a sequence of those."""
        ev = self._peek()
        if isinstance(ev, yaml.SequenceStartEvent):
            self._next()
            spans = []
            for i in itertools.count():
                if isinstance(self._peek(), yaml.SequenceEndEvent):
                    break
                spans.extend(self._merge_source(path, (*path, "<<", i), depth, line))
            self._next()
            return spans
        return self._merge_source(path, (*path, "<<"), depth, line)

    def _merge_source(self, owner: Path, path: Path, depth: int, line: int) -> list[_Span]:
        ev = self._peek()
        if isinstance(ev, yaml.AliasEvent):
            self._next()
            span = self._alias(ev.anchor or "", path, depth, _line(ev))
            if span is not None and isinstance(span.value, dict):
                return [span]
            if span is not None:
                self.issues.append(Issue(owner, f"'<<' merges mappings; *{ev.anchor} is not one", line, self.file))
            return []
        if isinstance(ev, yaml.MappingStartEvent):
            start, nodes, outer = len(self.log), self.nodes, self.deepest
            self.deepest = depth
            value = self._node(path, depth)
            span = _Span(value, start, len(self.log), len(path), self.nodes - nodes, self.deepest - depth, line)
            self.deepest = max(outer, self.deepest)
            return [span]
        self.issues.append(Issue(owner, "'<<' merges a mapping, an alias of one (<<: *defaults) or a list of them",
                                 line, self.file))
        self._skip()
        return []

    def _merge(self, out: dict[str, Any], span: _Span, path: Path) -> None:
        """Add the keys of ``span`` that ``out`` does not have, with their lines."""
        added = {k for k in span.value if k not in out}
        for k in span.value:
            if k in added:
                out[k] = _copy(span.value[k])
        for i in range(span.start, span.end):
            p, ln = self.log[i]
            rel = p[span.cut:]
            if rel and rel[0] in added:
                self.log.append(((*path, *rel), ln))


_MERGE_KEY = object()


def _line(ev: yaml.Event) -> int:
    return ev.start_mark.line + 1 if ev.start_mark else 0


def _short(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _copy(value: Any) -> Any:
    """A copy of an alias's value, so no two paths share a mutable object (depth ≤ MAX_DEPTH)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
