"""Read routes.yaml into plain Python data, remembering where every value came from.

Every value's YAML path (``("routes", 2, "to", 0, "connector")``) maps to its line, so each
later error — schema, cross-reference, expression, template — can name the file and line.
``${VAR}`` and ``${VAR:-default}`` are interpolated in string scalars here; a value that came
from the environment is an :class:`FromEnv` string, which is how secret fields know they were
given by reference.

The package: :mod:`~gateway.config.yamlsrc.source` (Source, Issue, ConfigError, interpolation)
and :mod:`~gateway.config.yamlsrc.reader` (the text read into a Source, with its bounds).

The contract: whatever the text, :func:`load_text` returns a :class:`Source` or raises
:class:`ConfigError`, whose issues carry the line; no other exception leaves it. Its time and
memory are bounded by the text's length and by ``max_nodes`` (default :data:`MAX_NODES`), the
number of values and keys the document holds once its aliases are expanded: the alias that
would take the document past it is refused at once, naming its anchor, before any of its
expansion is built. Every load has its own parser, and nothing of a load outlives it but the
:class:`Source`.

How YAML's features are read:

- ``*name`` copies its anchor's value; lines inside the copy are those of the anchor.
- Merge keys, ``<<: *defaults`` or ``<<: [*a, *b]`` (or an inline mapping), add the keys the
  mapping does not set itself, an earlier source before a later one; the lines of the merged
  values are where they are written.
- Keys are strings: a plain scalar key is its text as written (``yes:`` is ``"yes"``, ``1:`` is
  ``"1"``); an empty key, a mapping or a sequence as a key and a duplicate key are issues.
- Only YAML's own tags (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!timestamp``,
  ``!!binary`` on scalars, ``!!map``/``!!seq`` on collections); any other tag is an issue.
- A scalar that reads as a number or a date but is not a valid one (``2024-13-45``), or a
  number longer than :data:`MAX_NUMBER_CHARS` characters, is an issue.
- One document per file, nested at most :data:`MAX_DEPTH` levels deep.
"""

from gateway.config.yamlsrc.reader import (
    MAX_DEPTH,
    MAX_NODES,
    MAX_NUMBER_CHARS,
    decode,
    load_data,
    load_file,
    load_text,
)
from gateway.config.yamlsrc.source import ConfigError, FromEnv, Issue, Path, Source, format_path, interpolate

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_NUMBER_CHARS",
    "ConfigError",
    "FromEnv",
    "Issue",
    "Path",
    "Source",
    "decode",
    "format_path",
    "interpolate",
    "load_data",
    "load_file",
    "load_text",
]
