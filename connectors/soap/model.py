"""Typed XML ⇄ JSON mapping, driven by the WSDL's schema instead of guesses.

The model is built once per WSDL from zeep's resolved XSD objects (zeep parses the schema; we
only read its element and type tree). Both directions follow the same rules:

* numbers stay numbers (``xs:int`` → int, ``xs:decimal`` → an exact decimal number, ``xs:double``
  → float; ``INF``/``-INF``/``NaN`` have no JSON number and stay strings), ``xs:boolean`` → bool;
* an element that may repeat (``maxOccurs > 1``) is always a list, even with one item or none;
  ``null`` for it means no items (``[null]`` is one nil item);
* a choice that may repeat keeps the document's order: it is the key ``_choice`` (``_choice2``…
  when a type has several), a list of one-key objects such as ``[{"note": "a"}, {"ref": 5}]``;
  a choice that occurs once is its branches' keys, exactly one of them present;
* ``xsi:nil="true"`` ⇄ ``null``; an absent optional element ⇄ an absent key;
* numbers beyond 1e308 in magnitude are refused (``xs:double`` has no room for them and no peer
  of ours takes longer decimals), base64 and hex binary must decode;
* dates, times, durations, binary and every other simple type keep their XSD lexical form as a
  string (JSON has no better type); attributes are keys like child elements; simple content of
  an element with attributes is ``_value``; ``xs:any`` content is ``_any`` (a list of XML strings).

Everything here is pure: no IO, no zeep calls after the model is built.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

from lxml import etree
from zeep.xsd import elements as zelements
from zeep.xsd.types import builtins as zb
from zeep.xsd.types.collection import ListType, UnionType
from zeep.xsd.types.complex import ComplexType
from zeep.xsd.types.simple import AnySimpleType

XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSI_NIL = f"{{{XSI}}}nil"
VALUE_KEY = "_value"
ANY_KEY = "_any"
CHOICE_KEY = "_choice"
#: Decimal exponents beyond this are refused: the lexical form of 1e999999999 is a gigabyte.
MAX_EXPONENT = 308


class MappingError(ValueError):
    """A value does not fit the schema. ``errors`` are ``(path, message)`` pairs."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        first = errors[0] if errors else ("", "invalid")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{first[0] or '/'}: {first[1]}{more}")

    def as_list(self) -> list[dict[str, str]]:
        return [{"path": p or "/", "message": m} for p, m in self.errors]


# --- the model ------------------------------------------------------------------------


@dataclass(eq=False)
class Simple:
    """A simple type. ``kind`` decides the JSON type; ``xsd`` is the builtin's local name."""

    kind: str  # boolean, integer, decimal, double, string, list
    xsd: str
    name: str | None = None  # QName text of a named restriction (for facets)
    item: Simple | None = None  # list item type

    def describe(self) -> str:
        return f"xs:{self.xsd}" if self.name is None else f"{self.name.rpartition('}')[2]} (xs:{self.xsd})"


@dataclass(eq=False)
class Attr:
    key: str
    name: str  # as set on the element: local name or Clark notation
    required: bool
    type: Simple


@dataclass(eq=False, repr=False)
class Field:
    """One element particle: where it goes in XML and in JSON."""

    key: str
    tag: str  # Clark notation
    min_occurs: int
    max_occurs: int | None  # None: unbounded
    nillable: bool
    type: Simple | Complex

    def __repr__(self) -> str:
        occurs = f"[{self.min_occurs}..{'*' if self.max_occurs is None else self.max_occurs}]"
        return f"Field({self.key} {occurs}{' nillable' if self.nillable else ''}: {self.type!r})"

    @property
    def repeated(self) -> bool:
        return self.max_occurs is None or self.max_occurs > 1

    @property
    def local(self) -> str:
        return self.tag.rpartition("}")[2]


@dataclass(eq=False, repr=False)
class Choice:
    """A choice that may repeat: its elements in document order, each a one-key object."""

    key: str
    min_occurs: int
    max_occurs: int | None
    branches: list[Field]

    @property
    def repeated(self) -> bool:
        return True


@dataclass(eq=False, repr=False)
class Complex:
    name: str | None  # QName text when the type is global
    fields: list[Field] = field(default_factory=list)
    attrs: list[Attr] = field(default_factory=list)
    text: Simple | None = None  # simple content
    wildcard: bool = False
    choices: list[Choice] = field(default_factory=list)
    #: Fields and repeated choices in schema order (the order elements are written in).
    particles: list[Field | Choice] = field(default_factory=list)
    #: Keys of the branches of each choice that occurs once, and whether one of them is required.
    exclusive: list[tuple[list[str], bool]] = field(default_factory=list)
    by_tag: dict[str, Field] = field(default_factory=dict)
    by_local: dict[str, Field] = field(default_factory=dict)
    by_key: dict[str, Field] = field(default_factory=dict)
    choice_of: dict[str, tuple[Choice, Field]] = field(default_factory=dict)

    def index(self) -> None:
        self.by_tag = {f.tag: f for f in self.fields}
        self.by_key = {f.key: f for f in self.fields}
        self.by_local = {}
        for f in self.fields:
            self.by_local.setdefault(f.local, f)
        self.choice_of = {b.tag: (c, b) for c in self.choices for b in c.branches}

    def choice_by_local(self, local: str) -> tuple[Choice, Field] | None:
        return next(((c, b) for c in self.choices for b in c.branches if b.local == local), None)

    def __repr__(self) -> str:  # the tree may be recursive: never print it whole
        return f"Complex({self.name or 'anonymous'}: {', '.join(self.keys())})"

    def keys(self) -> list[str]:
        out = [a.key for a in self.attrs] + [p.key for p in self.particles]
        if self.text is not None:
            out.append(VALUE_KEY)
        if self.wildcard:
            out.append(ANY_KEY)
        return out


# zeep builtin class → (kind, xsd local name). Order matters: subclasses first.
_BUILTINS: list[tuple[type[Any], str]] = [
    (zb.Boolean, "boolean"),
    (zb.Integer, "integer"),
    (zb.Decimal, "decimal"),
    (zb.Float, "double"),
    (zb.Double, "double"),
]
_NUMERIC_RANGES: dict[str, tuple[int | None, int | None]] = {
    "long": (-(2**63), 2**63 - 1), "int": (-(2**31), 2**31 - 1), "short": (-(2**15), 2**15 - 1),
    "byte": (-128, 127), "nonNegativeInteger": (0, None), "positiveInteger": (1, None),
    "unsignedLong": (0, 2**64 - 1), "unsignedInt": (0, 2**32 - 1), "unsignedShort": (0, 65535),
    "unsignedByte": (0, 255), "nonPositiveInteger": (None, 0), "negativeInteger": (None, -1),
}


def _builtin_name(xsd_type: Any) -> str:
    """The XSD builtin a (possibly restricted) zeep simple type derives from."""
    for cls in type(xsd_type).__mro__:
        if cls.__module__ == "zeep.xsd.types.builtins" and cls is not zb.BuiltinType:
            name = cls.__dict__.get("_default_qname")
            if name is not None:
                return str(etree.QName(name).localname)
    return "anySimpleType"


def simple_of(xsd_type: Any) -> Simple:
    name = None
    qname = getattr(xsd_type, "qname", None)
    if qname is not None and etree.QName(qname).namespace != "http://www.w3.org/2001/XMLSchema":
        name = etree.QName(qname).text
    if isinstance(xsd_type, ListType):
        return Simple("list", "list", name, simple_of(xsd_type.item_type))
    if isinstance(xsd_type, UnionType):
        return Simple("string", "union", name)
    xsd = _builtin_name(xsd_type)
    kind = "string"
    for cls, k in _BUILTINS:
        if isinstance(xsd_type, cls):
            kind = k
            break
    return Simple(kind, xsd, name)


class ModelBuilder:
    """Turns zeep elements into :class:`Field` trees; named types are shared (and may recurse)."""

    def __init__(self) -> None:
        self._complex: dict[int, Complex] = {}

    def element(self, elem: Any) -> Field:
        return self._field(elem, elem.attr_name or elem.name, 1, 1)

    def _field(self, elem: Any, key: str, min_factor: int, max_factor: int | None) -> Field:
        own_max = None if elem.max_occurs == "unbounded" else int(elem.max_occurs)
        max_occurs = None if own_max is None or max_factor is None else own_max * max_factor
        return Field(key=key, tag=etree.QName(elem.qname).text, min_occurs=int(elem.min_occurs) * min_factor,
                     max_occurs=max_occurs, nillable=bool(elem.nillable), type=self._type(elem.type))

    def _type(self, xsd_type: Any) -> Simple | Complex:
        if isinstance(xsd_type, ComplexType):
            return self._complex_of(xsd_type)
        if isinstance(xsd_type, AnySimpleType):
            return simple_of(xsd_type)
        # xs:anyType and unresolved oddities: keep the lexical text.
        return Simple("string", "anyType")

    def _complex_of(self, ct: ComplexType) -> Complex:
        known = self._complex.get(id(ct))
        if known is not None:
            return known
        qname = getattr(ct, "qname", None)
        out = Complex(name=etree.QName(qname).text if qname is not None and getattr(ct, "is_global", False) else None)
        self._complex[id(ct)] = out
        for key, attr in ct.attributes:
            if isinstance(attr, zelements.Attribute) and attr.qname is not None:
                out.attrs.append(Attr(key=key, name=etree.QName(attr.qname).text, required=bool(attr.required),
                                      type=simple_of(attr.type)))
        root = ct._element
        if isinstance(root, zelements.Element) and isinstance(root.type, AnySimpleType):
            out.text = simple_of(root.type)
        elif root is not None:
            self._particles(root, out, 1, 1)
        out.index()
        return out

    def _particles(self, node: Any, out: Complex, min_factor: int, max_factor: int | None) -> None:
        node_max = None if getattr(node, "max_occurs", 1) == "unbounded" else int(getattr(node, "max_occurs", 1))
        node_min = int(getattr(node, "min_occurs", 1))
        if isinstance(node, zelements.Any):
            out.wildcard = True
            return
        if isinstance(node, zelements.Element):
            f = self._field(node, str(node.attr_name or node.name), min_factor, max_factor)
            out.fields.append(f)
            out.particles.append(f)
            return
        child_min = min_factor * node_min
        child_max = None if max_factor is None or node_max is None else max_factor * node_max
        if isinstance(node, zelements.Choice):
            elements = all(isinstance(c, zelements.Element) for c in node)
            if elements and (child_max is None or child_max > 1):
                key = CHOICE_KEY if not out.choices else f"{CHOICE_KEY}{len(out.choices) + 1}"
                branches = [Field(key=str(c.attr_name or c.name), tag=etree.QName(c.qname).text, min_occurs=1,
                                  max_occurs=1, nillable=bool(c.nillable), type=self._type(c.type)) for c in node]
                choice = Choice(key, child_min, child_max, branches)
                out.choices.append(choice)
                out.particles.append(choice)
                return
            if elements:
                out.exclusive.append(([str(c.attr_name or c.name) for c in node], child_min > 0))
            child_min = 0  # any one branch may be absent
        if isinstance(node, zelements.Group):
            self._particles(node.child, out, child_min, child_max)
            return
        for child in node:  # Sequence / All / Choice are lists of particles
            self._particles(child, out, child_min, child_max)


# --- XML → JSON -------------------------------------------------------------------------

_INT = re.compile(r"^[+-]?\d+$")
_DEC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_DBL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SPECIAL_DOUBLES = {"INF", "-INF", "NaN", "+INF"}


def _lexical_to_json(text: str, t: Simple, path: str) -> Any:
    if t.kind == "list":
        assert t.item is not None
        return [_lexical_to_json(part, t.item, f"{path}/{i}") for i, part in enumerate(text.split())]
    if t.kind == "string":
        if t.xsd in ("base64Binary", "hexBinary"):
            _check_binary(text, t, path)
        return text if t.xsd in ("string", "anyType", "anySimpleType") else text.strip()
    value = text.strip()
    if t.kind == "boolean":
        if value in ("true", "1"):
            return True
        if value in ("false", "0"):
            return False
    elif t.kind == "integer":
        if _INT.match(value):
            return int(value)
    elif t.kind == "decimal":
        if _DEC.match(value):
            return Decimal(value)
    elif t.kind == "double":
        if value in _SPECIAL_DOUBLES:
            return value.lstrip("+")
        if _DBL.match(value):
            number = float(value)
            # XSD 1.1: a double literal beyond the range is rounded to ±INF, which JSON spells so.
            return number if math.isfinite(number) else ("-INF" if number < 0 else "INF")
    raise MappingError([(path, f"not a valid {t.describe()}")])


_HEX = re.compile(r"^(?:[0-9a-fA-F]{2})*$")


def _check_binary(text: str, t: Simple, path: str) -> None:
    """Linear in the text: base64 must decode (whitespace allowed), hex must be pairs of digits."""
    if t.xsd == "hexBinary":
        if not _HEX.match(text.strip()):
            raise MappingError([(path, f"not valid hexadecimal for {t.describe()} (pairs of 0-9, a-f)")])
        return
    try:
        base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MappingError([(path, f"not valid base64 for {t.describe()}")]) from None


def xml_to_json(elem: Any, f: Field, path: str = "", *, lenient: bool = False,
                ignored: list[str] | None = None) -> Any:
    """The JSON value of one element (already known to be ``f``'s). Raises :class:`MappingError`.

    ``lenient`` (replies from a peer): unknown children and attributes are skipped and their
    paths appended to ``ignored`` instead of failing, and a namespace mismatch is forgiven when
    the local name is unambiguous.
    """
    if elem.get(XSI_NIL) in ("true", "1"):
        return None
    t = f.type
    if isinstance(t, Simple):
        if len(elem):
            raise MappingError([(path, f"{f.local} must be a simple value, not an element tree")])
        return _lexical_to_json(elem.text or "", t, path)
    return _complex_to_json(elem, t, path, lenient, ignored)


def _complex_to_json(elem: Any, t: Complex, path: str, lenient: bool, ignored: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    errors: list[tuple[str, str]] = []
    for a in t.attrs:
        raw = elem.get(a.name)
        if raw is not None:
            try:
                out[a.key] = _lexical_to_json(raw, a.type, f"{path}/{a.key}")
            except MappingError as exc:
                errors.extend(exc.errors)
    values: dict[str, Any] = {p.key: [] for p in t.particles if p.repeated}
    for child in elem:
        tag = child.tag
        if not isinstance(tag, str):
            continue  # comments and processing instructions carry no data
        f = t.by_tag.get(tag)
        if f is None and lenient:
            f = t.by_local.get(tag.rpartition("}")[2])
        branch = t.choice_of.get(tag) if f is None else None
        if branch is None and f is None and lenient:
            branch = t.choice_by_local(tag.rpartition("}")[2])
        if branch is not None:
            choice, b = branch
            items = values[choice.key]
            try:
                items.append({b.key: xml_to_json(child, b, f"{path}/{choice.key}/{len(items)}/{b.key}",
                                                 lenient=lenient, ignored=ignored)})
            except MappingError as exc:
                errors.extend(exc.errors)
            continue
        if f is None:
            if t.wildcard:
                out.setdefault(ANY_KEY, []).append(etree.tostring(child, encoding="unicode", with_tail=False))
                continue
            local = tag.rpartition("}")[2]
            if lenient:
                if ignored is not None:
                    ignored.append(f"{path}/{local}")
                continue
            errors.append((f"{path}/{local}", f"unexpected element {local!r}"))
            continue
        try:
            if f.repeated:
                items = values[f.key]
                items.append(xml_to_json(child, f, f"{path}/{f.key}/{len(items)}", lenient=lenient, ignored=ignored))
            elif f.key in values:
                errors.append((f"{path}/{f.key}", f"{f.key!r} may occur only once"))
            else:
                values[f.key] = xml_to_json(child, f, f"{path}/{f.key}", lenient=lenient, ignored=ignored)
        except MappingError as exc:
            errors.extend(exc.errors)
    for p in t.particles:  # schema order, whatever order the peer used
        if p.key in values:
            out[p.key] = values[p.key]
    if ANY_KEY in out:
        out[ANY_KEY] = out.pop(ANY_KEY)
    if t.text is not None:
        try:
            out[VALUE_KEY] = _lexical_to_json(elem.text or "", t.text, f"{path}/{VALUE_KEY}")
        except MappingError as exc:
            errors.extend(exc.errors)
    if errors:
        raise MappingError(errors)
    return out


# --- JSON → XML -------------------------------------------------------------------------


def _json_to_lexical(value: Any, t: Simple, path: str, from_text: bool) -> str:
    """The XSD lexical form of a JSON value. ``from_text``: the value came out of a template."""
    if t.kind == "list":
        assert t.item is not None
        if from_text and isinstance(value, str):
            value = value.split()
        if not isinstance(value, list):
            raise MappingError([(path, f"expected a list for {t.describe()}")])
        return " ".join(_json_to_lexical(v, t.item, f"{path}/{i}", from_text) for i, v in enumerate(value))
    if from_text and isinstance(value, str) and t.kind != "string":
        value = _lexical_to_json(value, t, path)  # a template rendered the lexical form
    if t.kind == "boolean":
        if isinstance(value, bool):
            return "true" if value else "false"
        raise MappingError([(path, f"expected true or false for {t.describe()}")])
    if t.kind in ("integer", "decimal", "double") and isinstance(value, int | float | Decimal) \
            and not isinstance(value, bool) and _out_of_range(value, t.kind):
        raise MappingError([(path, f"{value} is out of range for {t.describe()} (at most 1e{MAX_EXPONENT} "
                                   "in magnitude)")])
    if t.kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float | Decimal) and not isinstance(value, bool) and _finite(value) \
                and value == int(value):
            return str(int(value))
        raise MappingError([(path, f"expected an integer for {t.describe()}")])
    if t.kind == "decimal":
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal) or not _finite(value):
            raise MappingError([(path, f"expected a number for {t.describe()}")])
        return format(Decimal(repr(value)) if isinstance(value, float) else Decimal(value), "f")
    if t.kind == "double":
        if isinstance(value, str) and value in _SPECIAL_DOUBLES:
            return value.lstrip("+")
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise MappingError([(path, f"expected a number for {t.describe()}")])
        return repr(float(value))
    if isinstance(value, str):
        if t.xsd in ("base64Binary", "hexBinary"):
            _check_binary(value, t, path)
        return value
    raise MappingError([(path, f"expected a string for {t.describe()}")])


def _out_of_range(value: int | float | Decimal, kind: str) -> bool:
    """Too large for any kind, or (for exact kinds) so small that its digits would run on and on."""
    if isinstance(value, Decimal):
        if not value.is_finite() or value == 0:
            return False
        return value.adjusted() > MAX_EXPONENT or (kind != "double" and value.adjusted() < -MAX_EXPONENT)
    if isinstance(value, float):
        return not math.isfinite(value)
    return value.bit_length() > 1024


def _finite(value: float | Decimal) -> bool:
    return value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)


@dataclass
class RenderOptions:
    #: Values were rendered by templates: a string may hold a lexical form (``"42"`` for an
    #: ``xs:int``) or JSON text for a list or a complex element (``{{ x | tojson }}``).
    from_text: bool = False
    #: Keys the schema does not know are skipped (and listed in ``ignored``) instead of refused.
    lenient: bool = False
    ignored: list[str] = field(default_factory=list)
    #: Parses an ``_any`` XML string (hardened); None refuses ``_any``.
    parse_any: Callable[[str], Any] | None = None


def json_to_xml(value: Any, f: Field, opts: RenderOptions | None = None) -> Any:
    """The element ``f`` holding ``value``. Raises :class:`MappingError` with every problem."""
    opts = opts or RenderOptions()
    errors: list[tuple[str, str]] = []
    holder = etree.Element("holder")
    _render_one(holder, f, value, "", opts, errors, nsmap={**namespaces(f), "xsi": XSI})
    if errors:
        raise MappingError(errors)
    return holder[0]


def _decode_text(value: Any, want: type[Any], path: str, opts: RenderOptions) -> Any:
    if opts.from_text and isinstance(value, str):
        try:
            decoded = json.loads(value, parse_float=Decimal)
        except ValueError:
            raise MappingError([(path, f"expected {'a list' if want is list else 'an object'} "
                                       "(a template must render JSON here: use | tojson)")]) from None
        return decoded
    return value


def _render(parent: Any, f: Field, value: Any, path: str, opts: RenderOptions,
            errors: list[tuple[str, str]]) -> None:
    if f.repeated and value is None:
        # No items: the list itself has no nil in XML ([null] is one nil item).
        if f.min_occurs > 0:
            errors.append((path, f"{f.key!r} needs at least {f.min_occurs} item(s)"))
        return
    if f.repeated:
        try:
            value = _decode_text(value, list, path, opts)
        except MappingError as exc:
            errors.extend(exc.errors)
            return
        if not isinstance(value, list):
            errors.append((path, f"{f.key!r} repeats: it must be a list (even with one item)"))
            return
        if len(value) < f.min_occurs:
            errors.append((path, f"{f.key!r} needs at least {f.min_occurs} item(s)"))
        if f.max_occurs is not None and len(value) > f.max_occurs:
            errors.append((path, f"{f.key!r} allows at most {f.max_occurs} item(s)"))
        for i, item in enumerate(value):
            _render_one(parent, f, item, f"{path}/{i}", opts, errors)
        return
    _render_one(parent, f, value, path, opts, errors)


def _render_one(parent: Any, f: Field, value: Any, path: str, opts: RenderOptions,
                errors: list[tuple[str, str]], nsmap: dict[str, str] | None = None) -> None:
    if value is None:
        if f.nillable:
            etree.SubElement(parent, f.tag, nsmap=nsmap).set(XSI_NIL, "true")
        elif f.min_occurs > 0 or f.repeated:
            errors.append((path, f"{f.key!r} is required and not nillable: it cannot be null"))
        return
    elem = etree.SubElement(parent, f.tag, nsmap=nsmap)
    t = f.type
    if isinstance(t, Simple):
        try:
            elem.text = _json_to_lexical(value, t, path, opts.from_text)
        except MappingError as exc:
            errors.extend(exc.errors)
        except ValueError:  # lxml refuses NUL and most control characters: XML cannot carry them
            errors.append((path, "the text holds characters XML cannot carry (control characters)"))
        return
    try:
        value = _decode_text(value, dict, path, opts)
    except MappingError as exc:
        errors.extend(exc.errors)
        return
    if not isinstance(value, dict):
        errors.append((path, f"{f.key!r} must be an object"))
        return
    render_complex(elem, t, value, path, opts, errors)


def _render_choice(parent: Any, c: Choice, value: Any, path: str, opts: RenderOptions,
                   errors: list[tuple[str, str]]) -> None:
    if value is None:
        value = []
    try:
        value = _decode_text(value, list, path, opts)
    except MappingError as exc:
        errors.extend(exc.errors)
        return
    names = ", ".join(b.key for b in c.branches)
    if not isinstance(value, list):
        errors.append((path, f"{c.key!r} is a list of one-key objects, each one of: {names}"))
        return
    if len(value) < c.min_occurs:
        errors.append((path, f"{c.key!r} needs at least {c.min_occurs} item(s)"))
    if c.max_occurs is not None and len(value) > c.max_occurs:
        errors.append((path, f"{c.key!r} allows at most {c.max_occurs} item(s)"))
    by_key = {b.key: b for b in c.branches}
    for i, item in enumerate(value):
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in by_key:
            errors.append((f"{path}/{i}", f"each item of {c.key!r} is an object with exactly one key, one of: "
                                          f"{names}"))
            continue
        key, inner = next(iter(item.items()))
        _render_one(parent, by_key[key], inner, f"{path}/{i}/{key}", opts, errors)


def render_complex(elem: Any, t: Complex, value: dict[str, Any], path: str, opts: RenderOptions,
                   errors: list[tuple[str, str]]) -> None:
    known = set()
    for a in t.attrs:
        known.add(a.key)
        if a.key in value and value[a.key] is not None:
            try:
                elem.set(a.name, _json_to_lexical(value[a.key], a.type, f"{path}/{a.key}", opts.from_text))
            except MappingError as exc:
                errors.extend(exc.errors)
            except ValueError:
                errors.append((f"{path}/{a.key}", "the text holds characters XML cannot carry"))
        elif a.required:
            errors.append((f"{path}/{a.key}", f"attribute {a.key!r} is required"))
    if t.text is not None:
        known.add(VALUE_KEY)
        if VALUE_KEY in value and value[VALUE_KEY] is not None:
            try:
                elem.text = _json_to_lexical(value[VALUE_KEY], t.text, f"{path}/{VALUE_KEY}", opts.from_text)
            except MappingError as exc:
                errors.extend(exc.errors)
            except ValueError:
                errors.append((f"{path}/{VALUE_KEY}", "the text holds characters XML cannot carry"))
    for p in t.particles:
        known.add(p.key)
        if isinstance(p, Choice):
            _render_choice(elem, p, value.get(p.key), f"{path}/{p.key}", opts, errors)
        elif p.key in value:
            _render(elem, p, value[p.key], f"{path}/{p.key}", opts, errors)
        elif p.min_occurs > 0:
            errors.append((f"{path}/{p.key}", f"required element {p.key!r} is missing"))
    for keys, required in t.exclusive:
        present = [k for k in keys if k in value]
        if len(present) > 1:
            errors.append((f"{path}/{present[1]}", f"only one of {', '.join(keys)} may be given (a choice)"))
        elif required and not present:
            errors.append((f"{path}/{keys[0]}", f"one of {', '.join(keys)} is required (a choice)"))
    if t.wildcard:
        known.add(ANY_KEY)
        items = value.get(ANY_KEY) or []
        if items and opts.parse_any is None:
            errors.append((f"{path}/{ANY_KEY}", "free-form XML is not accepted here"))
        elif isinstance(items, list) and opts.parse_any is not None:
            for i, raw in enumerate(items):
                try:
                    elem.append(opts.parse_any(str(raw)))
                except ValueError as exc:
                    errors.append((f"{path}/{ANY_KEY}/{i}", str(exc)))
    for key in value:
        if key not in known:
            if opts.lenient:
                opts.ignored.append(f"{path}/{key}")
            else:
                errors.append((f"{path}/{key}", f"unknown field {key!r}; expected one of {sorted(known)}"))


# --- JSON text ------------------------------------------------------------------------


def dumps(value: Any) -> bytes:
    """JSON with exact decimals (``Decimal`` is written as a number literal, not a float)."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def _encode(v: Any, out: list[str]) -> None:
    if v is None:
        out.append("null")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif isinstance(v, str):
        out.append(json.dumps(v, ensure_ascii=False))
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, float):
        out.append(json.dumps(v) if math.isfinite(v) else json.dumps(str(v)))
    elif isinstance(v, Decimal):
        out.append(format(v, "f") if v.is_finite() else json.dumps(str(v)))
    elif isinstance(v, dict):
        out.append("{")
        for i, (k, item) in enumerate(v.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(k), ensure_ascii=False))
            out.append(":")
            _encode(item, out)
        out.append("}")
    elif isinstance(v, list | tuple):
        out.append("[")
        for i, item in enumerate(v):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        out.append(json.dumps(str(v), ensure_ascii=False))


def loads(body: bytes | str) -> Any:
    """JSON with decimals kept exact (so ``xs:decimal`` values are not rounded through float)."""
    try:
        return json.loads(body, parse_float=Decimal)
    except (ValueError, RecursionError) as exc:
        raise MappingError([("", f"invalid JSON: {exc}")]) from None


# --- JSON Schema ------------------------------------------------------------------------


@dataclass
class Facets:
    enumeration: list[str] = field(default_factory=list)
    pattern: list[str] = field(default_factory=list)
    numbers: dict[str, str] = field(default_factory=dict)  # minInclusive, maxExclusive, ...
    lengths: dict[str, int] = field(default_factory=dict)  # length, minLength, maxLength

    NUMERIC: ClassVar[tuple[str, ...]] = ("minInclusive", "maxInclusive", "minExclusive", "maxExclusive")
    LENGTH: ClassVar[tuple[str, ...]] = ("length", "minLength", "maxLength")


XS_NS = "http://www.w3.org/2001/XMLSchema"


def facets_from_schemas(schemas: list[Any]) -> dict[str, Facets]:
    """Facets of every named simple type in these ``xs:schema`` elements (zeep drops them)."""
    out: dict[str, Facets] = {}
    for schema in schemas:
        tns = schema.get("targetNamespace") or ""
        for st in schema.findall(f"{{{XS_NS}}}simpleType"):
            name = st.get("name")
            restriction = st.find(f"{{{XS_NS}}}restriction")
            if not name or restriction is None:
                continue
            fc = Facets()
            for facet in restriction:
                if not isinstance(facet.tag, str):
                    continue
                local = etree.QName(facet).localname
                val = facet.get("value")
                if val is None:
                    continue
                if local == "enumeration":
                    fc.enumeration.append(val)
                elif local == "pattern":
                    fc.pattern.append(val)
                elif local in Facets.NUMERIC:
                    fc.numbers[local] = val
                elif local in Facets.LENGTH and val.isdigit():
                    fc.lengths[local] = int(val)
            out[etree.QName(tns, name).text] = fc
    return out


_ZONE = r"(Z|[+-]\d{2}:\d{2})?"
#: XSD lexical forms. JSON Schema's date-time, date and time formats are RFC 3339's, which demand
#: a zone on date-time and time and forbid one on date; XSD makes it optional on all three, and
#: the gateway passes values through as written, so the document describes them by pattern.
_PATTERNS = {
    "dateTime": rf"^-?\d{{4,}}-\d{{2}}-\d{{2}}T\d{{2}}:\d{{2}}:\d{{2}}(\.\d+)?{_ZONE}$",
    "date": rf"^-?\d{{4,}}-\d{{2}}-\d{{2}}{_ZONE}$",
    "time": rf"^\d{{2}}:\d{{2}}:\d{{2}}(\.\d+)?{_ZONE}$",
    "duration": r"^-?P(?=\d|T\d)(\d+Y)?(\d+M)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$",
}


class JsonSchemaBuilder:
    """Schemas for the model in the OpenAPI 3.0 dialect of JSON Schema (what Swagger UI and most
    generators read); named complex types become shared ``$ref`` components."""

    def __init__(self, facets: dict[str, Facets], ref_prefix: str = "#/components/schemas/"):
        self.facets = facets
        self.ref_prefix = ref_prefix
        self.definitions: dict[str, Any] = {}
        self._names: dict[int, str] = {}

    def for_complex_content(self, f: Field) -> dict[str, Any]:
        """The schema of the element's content (what a JSON body holds for it)."""
        t = f.type
        if isinstance(t, Simple):
            return self.simple(t)
        return self.complex(t)

    def complex(self, t: Complex) -> dict[str, Any]:
        if t.name is None:
            return self._complex_body(t)
        name = self._names.get(id(t))
        if name is None:
            name = self._unique(t.name.rpartition("}")[2])
            self._names[id(t)] = name
            self.definitions[name] = {}  # placeholder: recursion ends here
            self.definitions[name] = self._complex_body(t)
        return {"$ref": self.ref_prefix + name}

    def _unique(self, base: str) -> str:
        name, n = base, 2
        while name in self.definitions:
            name, n = f"{base}{n}", n + 1
        return name

    def _complex_body(self, t: Complex) -> dict[str, Any]:
        props: dict[str, Any] = {}
        required: list[str] = []
        for a in t.attrs:
            props[a.key] = {**self.simple(a.type), "description": "XML attribute"}
            if a.required:
                required.append(a.key)
        for p in t.particles:
            if isinstance(p, Choice):
                props[p.key] = self.choice(p)
            else:
                props[p.key] = self.field(p)
            if p.min_occurs > 0:
                required.append(p.key)
        if t.text is not None:
            props[VALUE_KEY] = {**self.simple(t.text), "description": "the element's text"}
        if t.wildcard:
            props[ANY_KEY] = {"type": "array", "items": {"type": "string"},
                              "description": "free-form XML elements (xs:any), one string each"}
        out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        groups = []
        for keys, required_one in t.exclusive:
            one_of: list[dict[str, Any]] = [{"required": [k]} for k in keys]
            if not required_one:
                one_of.append({"not": {"anyOf": [{"required": [k]} for k in keys]}})
            groups.append({"oneOf": one_of})
        if len(groups) == 1:
            out.update(groups[0])
        elif groups:
            out["allOf"] = groups
        return out

    def choice(self, c: Choice) -> dict[str, Any]:
        branches = [{"type": "object", "properties": {b.key: self.field(b)}, "required": [b.key],
                     "additionalProperties": False} for b in c.branches]
        out: dict[str, Any] = {"type": "array", "items": {"oneOf": branches},
                               "description": "a repeated xs:choice in document order: one object per element, "
                                              "keyed by its name"}
        if c.min_occurs:
            out["minItems"] = c.min_occurs
        if c.max_occurs is not None:
            out["maxItems"] = c.max_occurs
        return out

    def field(self, f: Field) -> dict[str, Any]:
        item = self.simple(f.type) if isinstance(f.type, Simple) else self.complex(f.type)
        if f.nillable:
            item = {"allOf": [item], "nullable": True} if "$ref" in item else {**item, "nullable": True}
        if not f.repeated:
            return item
        out: dict[str, Any] = {"type": "array", "items": item}
        if f.min_occurs:
            out["minItems"] = f.min_occurs
        if f.max_occurs is not None:
            out["maxItems"] = f.max_occurs
        return out

    def simple(self, t: Simple) -> dict[str, Any]:
        if t.kind == "list":
            assert t.item is not None
            return {"type": "array", "items": self.simple(t.item)}
        out: dict[str, Any]
        if t.kind == "boolean":
            out = {"type": "boolean"}
        elif t.kind == "integer":
            out = {"type": "integer"}
            low, high = _NUMERIC_RANGES.get(t.xsd, (None, None))
            if low is not None:
                out["minimum"] = low
            if high is not None:
                out["maximum"] = high
        elif t.kind == "decimal":
            out = {"type": "number"}
        elif t.kind == "double":
            out = {"anyOf": [{"type": "number"}, {"enum": ["INF", "-INF", "NaN"]}]}
        else:
            out = {"type": "string"}
            if t.xsd in _PATTERNS:
                out["pattern"] = _PATTERNS[t.xsd]
            elif t.xsd == "base64Binary":
                out["format"] = "byte"
        fc = self.facets.get(t.name or "")
        if fc is not None:
            if fc.enumeration:
                out["enum"] = [_enum_value(v, t) for v in fc.enumeration]
            if fc.pattern and "type" in out and out["type"] == "string":
                out["pattern"] = "^(?:" + ")$|^(?:".join(_xsd_regex(p) for p in fc.pattern) + ")$"
            for k, v in fc.numbers.items():
                num = _number(v)
                if num is not None and "type" in out and out["type"] in ("integer", "number"):
                    bound = "minimum" if k.startswith("min") else "maximum"
                    out[bound] = num
                    if "Exclusive" in k:
                        out["exclusiveMinimum" if bound == "minimum" else "exclusiveMaximum"] = True
            for k, n in fc.lengths.items():
                if k == "length":
                    out["minLength"] = out["maxLength"] = n
                else:
                    out[k] = n
        out["description"] = t.describe()
        return out


def _number(v: str) -> int | float | None:
    try:
        d = Decimal(v)
    except InvalidOperation:
        return None
    return int(d) if d == d.to_integral_value() else float(d)


def _enum_value(v: str, t: Simple) -> Any:
    try:
        return _lexical_to_json(v, t, "")
    except MappingError:
        return v


def _xsd_regex(p: str) -> str:
    # XSD patterns are implicitly anchored; the character-class escapes \i and \c have no
    # ECMA equivalent, so they are widened to "any name character".
    return p.replace("\\i", "[A-Za-z_:]").replace("\\c", "[-.0-9A-Za-z_:]")


def json_path(root: Any, f: Field, xpath: str) -> str:
    """The JSON path (``/order/line/1/quantity``) of the node that ``xpath`` (libxml2's path of an
    XSD error) names in ``root``, the element built for ``f``; ``/`` when it cannot be placed."""
    # lxml validates the element as a document of its own: the path's first step is ``root``.
    steps = xpath.split("/")[2:]
    try:
        found = root.xpath("/".join([".", *steps]), namespaces={k: v for k, v in root.nsmap.items() if k})
    except etree.XPathError:
        return "/"
    node = found[0] if isinstance(found, list) and found and isinstance(found[0], etree._Element) else None
    chain = []
    while node is not None and node is not root:
        chain.append(node)
        node = node.getparent()
    if node is None:
        return "/"
    parts: list[str] = []
    t: Simple | Complex = f.type
    for elem in reversed(chain):
        if not isinstance(t, Complex):
            break
        parent = elem.getparent()
        field_ = t.by_tag.get(elem.tag)
        branch = t.choice_of.get(elem.tag)
        if field_ is not None:
            parts.append(field_.key)
            if field_.repeated:
                parts.append(str(_position(parent, elem, {elem.tag})))
            t = field_.type
        elif branch is not None:
            choice, b = branch
            parts += [choice.key, str(_position(parent, elem, {x.tag for x in choice.branches})), b.key]
            t = b.type
        else:
            parts.append(etree.QName(elem).localname)
            break
    return "/" + "/".join(parts)


def _position(parent: Any, elem: Any, tags: set[str]) -> int:
    """How many of ``parent``'s children with one of ``tags`` come before ``elem``."""
    n = 0
    for sibling in parent:
        if sibling is elem:
            break
        if sibling.tag in tags:
            n += 1
    return n


def walk_fields(f: Field) -> Iterator[Field]:
    """``f`` and every field below it, each complex type visited once."""
    yield f
    seen: set[int] = set()
    stack = [f.type] if isinstance(f.type, Complex) else []
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        for child in [*c.fields, *(b for choice in c.choices for b in choice.branches)]:
            yield child
            if isinstance(child.type, Complex):
                stack.append(child.type)


def namespaces(f: Field) -> dict[str, str]:
    """Short prefixes for every namespace under ``f`` (declared once, on the top element)."""
    found: list[str] = []
    for child in walk_fields(f):
        ns = child.tag[1:].partition("}")[0] if child.tag.startswith("{") else ""
        if ns and ns not in found:
            found.append(ns)
    return {f"ns{i}": ns for i, ns in enumerate(found)}
