"""Subject pattern index: one trie per source connector, so matching cost follows the subject's
depth, not the number of routes.

Three syntaxes, chosen by the source connector's kind:

* ``topic`` (MQTT): levels split on ``/``; ``+`` is one level, ``#`` (last) is zero or more.
  Subjects starting with ``$`` are not matched by a leading wildcard (MQTT 3.1.1 §4.7.2).
* ``dotted`` (AMQP): words split on ``.``; ``*`` is one word, ``#`` is zero or more words.
* ``glob`` (HTTP paths, mail addresses): segments split on ``/``; a segment may use shell
  wildcards (``*``, ``?``, ``[..]``), and ``**`` is zero or more segments.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

SYNTAXES = ("topic", "dotted", "glob")
_GLOBBY = re.compile(r"[*?[]")


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    single: _Node | None = None
    multi: _Node | None = None
    globs: list[tuple[re.Pattern[str], _Node]] = field(default_factory=list)
    glob_index: dict[str, _Node] = field(default_factory=dict)
    values: list[int] = field(default_factory=list)


def _config(syntax: str) -> tuple[str, str, str]:
    if syntax == "topic":
        return "/", "+", "#"
    if syntax == "dotted":
        return ".", "*", "#"
    if syntax == "glob":
        return "/", "\0never\0", "**"
    raise ValueError(f"unknown subject syntax {syntax!r}")


def validate_pattern(pattern: str, syntax: str) -> str | None:
    """An error message for an invalid pattern, or None."""
    if pattern == "":
        return "an empty subject pattern matches nothing; omit 'subject' to match every subject"
    sep, single, multi = _config(syntax)
    parts = pattern.split(sep)
    if syntax == "topic":
        for i, part in enumerate(parts):
            if "#" in part and (part != "#" or i != len(parts) - 1):
                return "'#' must be a whole level and the last one (e.g. 'plant/#')"
            if "+" in part and part != "+":
                return "'+' must be a whole level (e.g. 'plant/+/alert')"
    elif syntax == "dotted":
        for part in parts:
            if part not in (single, multi) and ("*" in part or "#" in part):
                return "'*' and '#' must be whole words (e.g. 'orders.*.created')"
    else:
        for part in parts:
            if "**" in part and part != "**":
                return "'**' must be a whole segment (e.g. '/orders/**')"
    return None


class SubjectTrie:
    def __init__(self, syntax: str):
        self.syntax = syntax
        self.sep, self.single, self.multi = _config(syntax)
        self.root = _Node()
        #: Compiled glob segments by text: 10,000 routes ending in ``/*`` compile it once.
        self._globs: dict[str, re.Pattern[str]] = {}

    def add(self, pattern: str, value: int) -> None:
        node = self.root
        for part in pattern.split(self.sep):
            if part == self.multi:
                node.multi = node.multi or _Node()
                node = node.multi
            elif part == self.single:
                node.single = node.single or _Node()
                node = node.single
            elif self.syntax == "glob" and _GLOBBY.search(part):
                existing = node.glob_index.get(part)
                if existing is None:
                    existing = _Node()
                    node.glob_index[part] = existing
                    rx = self._globs.get(part)
                    if rx is None:
                        rx = self._globs[part] = re.compile(fnmatch.translate(part))
                    node.globs.append((rx, existing))
                node = existing
            else:
                child = node.children.get(part)
                if child is None:
                    child = node.children[part] = _Node()
                node = child
        node.values.append(value)

    def match(self, subject: str) -> set[int]:
        parts = subject.split(self.sep)
        out: set[int] = set()
        self._walk(self.root, parts, 0, out, dollar=subject.startswith("$"))
        return out

    def _walk(self, node: _Node, parts: list[str], i: int, out: set[int], dollar: bool) -> None:
        wild_ok = not (dollar and i == 0 and self.syntax == "topic")
        if node.multi is not None and wild_ok:
            # zero or more remaining parts
            m = node.multi
            for j in range(i, len(parts) + 1):
                self._walk_after_multi(m, parts, j, out, dollar)
        if i == len(parts):
            out.update(node.values)
            return
        part = parts[i]
        child = node.children.get(part)
        if child is not None:
            self._walk(child, parts, i + 1, out, dollar)
        if node.single is not None and wild_ok:
            self._walk(node.single, parts, i + 1, out, dollar)
        if node.globs and wild_ok:
            for rx, g in node.globs:
                if rx.match(part):
                    self._walk(g, parts, i + 1, out, dollar)

    def _walk_after_multi(self, node: _Node, parts: list[str], j: int, out: set[int], dollar: bool) -> None:
        if j == len(parts):
            out.update(node.values)
            if node.multi is not None:
                out.update(node.multi.values)
            return
        if node.children or node.single or node.globs or node.multi:
            self._walk(node, parts, j, out, dollar)
