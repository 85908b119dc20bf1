"""Bounded templates: the Jinja sandbox with every operator, filter, call and loop budgeted.

Templates run on the event loop that carries every protocol and their inputs come from
messages, so one render may spend only what ``gateway.templates``
(:class:`~gateway.config.models.TemplateSettings`) allows:

* ``max_output``: the rendered text, and each string or list a template builds on the way
  (``*``, ``+``, ``%``, ``~``, ``str.format``, ``str`` methods, filters such as ``center``,
  ``join``, ``replace``), checked *before* it is built; all that one render builds together may
  take :data:`BUILT_PER_OUTPUT` times this. Integers stay below :data:`MAX_INT_BITS` bits.
* ``max_iterations``: loop iterations, calls (macros, methods) and includes in one render,
  across all loops, so nested loops multiply into the one budget. The code generator wraps
  every ``for`` iterable in a budgeted iterator, and :meth:`BoundedEnvironment.call` wraps the
  iterable a recursive loop's ``loop(...)`` is given.
* ``render_timeout``: a deadline checked at every loop step, call, built value and output chunk.

Jinja folds no filter or intercepted operator at compile time, so loading runs nothing
unbounded; the code generator evaluates constant expressions with the bounded operators
instead, so ``{{ 10**10000000 }}`` is refused at load with its line. A broken bound raises
:class:`LimitExceeded`; :mod:`gateway.routing.templates` turns it into a ``TemplateError``.
Removed: the ``lipsum`` global, the ``urlize`` and ``pprint`` filters (HTML and debugging
helpers, slow on large input).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from functools import wraps
from string import Formatter
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import _PassArg
from markupsafe import Markup

from gateway.config.models import TemplateSettings

MAX_INT_BITS = 16_384
#: All values one render builds may together take this many times ``max_output``.
BUILT_PER_OUTPUT = 4
#: Filters that work word by word in Python (``title``, ``wordwrap``, ``tojson`` with an indent)
#: take at most this much text.
SLOW_FILTER_INPUT = 64 * 1024
MAX_JSON_INDENT = 8


class LimitExceeded(Exception):
    """A template or one render breaks a bound; ``line`` is set when found at load."""

    line: int | None = None


class Budget:
    """What one render, or one template's load-time check, may still spend."""

    __slots__ = ("built", "deadline", "limits", "steps")

    def __init__(self, limits: TemplateSettings, deadline: float = math.inf):
        self.limits = limits
        self.deadline = deadline
        self.steps = 0
        self.built = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.max_iterations:
            raise LimitExceeded(f"more than {self.limits.max_iterations} loop iterations, calls and includes "
                                "in one render (gateway.templates.max_iterations)")
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"rendering took longer than {self.limits.render_timeout * 1000:g} ms "
                                "(gateway.templates.render_timeout)")

    def fits(self, size: int, what: str) -> None:
        if size > self.limits.max_output:
            raise LimitExceeded(f"{what} would be {size} characters, over the limit of "
                                f"{self.limits.max_output} (gateway.templates.max_output)")

    def build(self, size: int, what: str) -> None:
        """Account for a value of ``size`` characters about to be built; refuse it if too big."""
        self.fits(size, what)
        self.built += size
        if self.built > BUILT_PER_OUTPUT * self.limits.max_output:
            raise LimitExceeded(f"one render built more than {BUILT_PER_OUTPUT} × {self.limits.max_output} "
                                "characters (gateway.templates.max_output)")
        self.check_time()

    def text(self, value: Any, what: str) -> int:
        """The size of ``str(value)``; refused when over ``max_output``."""
        size = text_size(value, self.limits.max_output)
        self.fits(size, what)
        return size

    def charge(self, steps: int) -> None:
        self.steps += steps - 1
        self.step()

    def iterate(self, iterable: Iterable[Any]) -> Iterator[Any]:
        limit, deadline, clock = self.limits.max_iterations, self.deadline, time.monotonic
        for item in iterable:  # step() inlined: this runs for every item of every loop
            self.steps += 1
            if self.steps > limit or clock() > deadline:
                self.step()
            yield item


#: The budget of the render (or load-time check) running in this thread or task.
active: ContextVar[Budget | None] = ContextVar("gateway_template_budget", default=None)


def budget_for(limits: TemplateSettings) -> Budget:
    """The running render's budget; outside one, a fresh budget (bounds per value, no deadline)."""
    budget = active.get()
    return budget if budget is not None else Budget(limits)


def text_size(value: Any, limit: int) -> int:
    """About how many characters ``str(value)`` has, counting shared references each time
    (``[s] * 1000`` prints ``s`` a thousand times); stops counting once past ``limit``."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        elif isinstance(v, list | tuple | set | frozenset):
            total += 2 + 2 * len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, Mapping):
            total += 2 + 4 * len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        else:
            total += 8
    return total


def _int_arg(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return 0


def _bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


# --- operators -----------------------------------------------------------------------------

_PRINTF = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def check_printf(budget: Budget, fmt: str, args: Any) -> None:
    """Refuse ``fmt % args`` before it runs when widths, precisions or arguments make it too big."""
    size, specs = len(fmt), 0
    for m in _PRINTF.finditer(fmt):
        if m.group(4) == "%":
            continue
        specs += 1
        if "*" in (m.group(2), m.group(3)):
            raise LimitExceeded("'*' widths and precisions are not allowed in a % format")
        for number in (m.group(2), m.group(3)):
            if number:
                width = int(number) if len(number) < 12 else 10**12
                budget.fits(width, "a width or precision in a % format")
                size += width
    args_size = text_size(args, budget.limits.max_output)
    # A mapping's value may be named by every field; a tuple's items are used once each.
    size += args_size * specs if isinstance(args, Mapping) else args_size
    budget.build(size + 330 * specs, "the result of a % format")  # a float prints up to ~330 digits


def check_binop(budget: Budget, operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` when its result would break a bound, before computing it."""
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = left.bit_length() * right
            if bits > MAX_INT_BITS:
                raise LimitExceeded(f"the result of ** would have about {int(bits * math.log10(2))} digits "
                                    f"(at most {MAX_INT_BITS} bits)")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if _bits(left) + _bits(right) > MAX_INT_BITS:
                raise LimitExceeded(f"the result of * would be over {MAX_INT_BITS} bits")
            return
        seq, count = (right, left) if isinstance(left, int) else (left, right)
        if isinstance(count, int) and count > 0 and isinstance(seq, str | list | tuple):
            budget.build(max(text_size(seq, budget.limits.max_output), 1) * count, "the result of *")
    elif operator == "+":
        if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            limit = budget.limits.max_output
            budget.build(text_size(left, limit) + text_size(right, limit), "the result of +")
        elif _bits(left) > MAX_INT_BITS or _bits(right) > MAX_INT_BITS:
            raise LimitExceeded(f"an operand of + is over {MAX_INT_BITS} bits")
    elif operator == "%":
        if isinstance(left, str):
            check_printf(budget, left, right)
    elif operator == "//" and (_bits(left) > MAX_INT_BITS or _bits(right) > MAX_INT_BITS):
        raise LimitExceeded(f"an operand of // is over {MAX_INT_BITS} bits")


def _check_str_method(budget: Budget, text: str, method: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuse a ``str`` method call whose arguments would make its result too big."""
    if method in ("center", "ljust", "rjust", "zfill") and args:
        budget.build(max(len(text), _int_arg(args[0])), f"the result of str.{method}")
    elif method == "expandtabs":
        budget.build(len(text) + text.count("\t") * (_int_arg(args[0]) if args else 8), "the result of expandtabs")
    elif method == "replace" and len(args) >= 2:
        _pre_replace(budget, text, *args)
    elif method == "join" and args:
        items = list(args[0])
        return (_sized_items(budget, items, text, "str.join"), *args[1:])
    return args


def _sized_items(budget: Budget, items: list[Any], separator: Any, what: str) -> list[Any]:
    joined = text_size(items, budget.limits.max_output) - 2 - 2 * len(items)
    budget.build(joined + len(str(separator)) * max(len(items) - 1, 0), f"the result of {what}")
    return items


# --- str.format ----------------------------------------------------------------------------

class _BoundedFields(Formatter):
    """Checks every field of a ``str.format`` before formatting it, and what it adds up to."""

    budget: Budget

    def format_field(self, value: Any, format_spec: str) -> Any:
        for number in re.findall(r"\d+", format_spec):
            self.budget.fits(int(number) if len(number) < 12 else 10**12, "a width or precision in a format field")
        self.budget.text(value, "a format field")
        out = super().format_field(value, format_spec)
        self.budget.build(len(out), "the result of str.format")
        return out


class _BoundedFormatter(_BoundedFields, SandboxedFormatter):
    pass


class _BoundedEscapeFormatter(_BoundedFields, SandboxedEscapeFormatter):
    pass


# --- filters -------------------------------------------------------------------------------

def _pre_center(b: Budget, value: Any, width: Any = 80, *_: Any, **__: Any) -> None:
    b.build(max(b.text(value, "the text to center"), _int_arg(width)), "the result of center")


def _pre_indent(b: Budget, s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    b.text(s, "the text to indent")
    text = str(s)
    per_line = len(width) if isinstance(width, str) else _int_arg(width)
    b.build(len(text) + (text.count("\n") + 1) * per_line, "the result of indent")


def _pre_wordwrap(b: Budget, s: Any, width: Any = 79, break_long_words: Any = True,
                  wrapstring: Any = None, *_: Any, **__: Any) -> None:
    size = b.text(s, "the text to wrap")
    if size > SLOW_FILTER_INPUT:
        raise LimitExceeded(f"wordwrap takes at most {SLOW_FILTER_INPUT} characters, not {size}")
    text = str(s)
    lines = text.count(" ") + text.count("\n") + size // max(_int_arg(width), 1) + 1
    b.build(size + lines * len(str(wrapstring or "\n")), "the result of wordwrap")


def _pre_format(b: Budget, value: Any, *args: Any, **kwargs: Any) -> None:
    b.text(value, "a format")
    check_printf(b, str(value), kwargs or args)


def _pre_batch(b: Budget, value: Any, linecount: Any, *_: Any, **__: Any) -> None:
    b.fits(_int_arg(linecount), "a batch")


def _pre_slice(b: Budget, value: Any, slices: Any, *_: Any, **__: Any) -> None:
    if _int_arg(slices) > b.limits.max_iterations:
        raise LimitExceeded(f"slice into more than {b.limits.max_iterations} parts")


def _pre_replace(b: Budget, s: Any, old: Any, new: Any, count: Any = None, *_: Any, **__: Any) -> None:
    b.text(s, "the text to replace in")
    text, old, new = str(s), str(old), str(new)
    found = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    b.build(len(text) + found * max(0, len(new) - len(old)), "the result of replace")


def _pre_sum(b: Budget, iterable: Any, attribute: Any = None, start: Any = 0, *_: Any, **__: Any) -> None:
    if not isinstance(start, int | float):  # adding lists or strings one at a time is quadratic
        raise LimitExceeded("sum adds numbers only")


def _pre_tojson(b: Budget, value: Any, indent: Any = None, *_: Any, **__: Any) -> None:
    size = b.text(value, "the value to serialize")
    if indent is not None:
        if _int_arg(indent) > MAX_JSON_INDENT:
            raise LimitExceeded(f"tojson indents by at most {MAX_JSON_INDENT}")
        if size > SLOW_FILTER_INPUT:  # json.dumps with an indent runs in Python, not C
            raise LimitExceeded(f"tojson with indent takes at most {SLOW_FILTER_INPUT} characters, not {size}")


def _pre_text(b: Budget, value: Any, *_: Any, **__: Any) -> None:
    b.text(value, "the filter's input")


def _pre_title(b: Budget, value: Any, *_: Any, **__: Any) -> None:
    size = b.text(value, "the text to title-case")
    if size > SLOW_FILTER_INPUT:
        raise LimitExceeded(f"title takes at most {SLOW_FILTER_INPUT} characters, not {size}")


def _pre_nothing(b: Budget, *_: Any, **__: Any) -> None:
    pass


#: Filters that turn their input into text (a list of a thousand references to one big string
#: prints it a thousand times): the input's printed size is checked first.
_TEXT_FILTERS = ("capitalize", "e", "escape", "filesizeformat", "forceescape", "lower", "safe", "string",
                 "striptags", "trim", "truncate", "upper", "urlencode", "wordcount", "xmlattr")
#: Filters whose arguments size their output, checked before they run. ``join`` sizes its items.
_PRE_CHECKS: dict[str, Callable[..., None]] = {
    "center": _pre_center, "indent": _pre_indent, "wordwrap": _pre_wordwrap, "format": _pre_format,
    "batch": _pre_batch, "slice": _pre_slice, "replace": _pre_replace, "sum": _pre_sum,
    "tojson": _pre_tojson, "json": _pre_tojson, "title": _pre_title, **{name: _pre_text for name in _TEXT_FILTERS},
}
#: Filters that go through their input item by item in Python: each item is a step of the
#: render's ``max_iterations``, as a loop's would be.
_PER_ITEM = frozenset({"batch", "dictsort", "groupby", "join", "list", "map", "max", "min", "reject", "rejectattr",
                       "select", "selectattr", "slice", "sort", "sum", "unique"})
_REMOVED_FILTERS = ("urlize", "pprint")


def bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` checked before it runs (its arguments) and after (the size of what it built).

    The wrapper takes the render context, which also keeps Jinja from folding the filter at
    compile time: loading runs no filter (:class:`_BoundedCodeGenerator` checks constants).
    """
    pass_arg = _PassArg.from_obj(fn)
    pre: Callable[..., None] = _PRE_CHECKS.get(name, _pre_nothing)

    @jinja2.pass_context
    @wraps(fn)
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        budget = budget_for(context.environment.limits)  # type: ignore[attr-defined]
        budget.check_time()
        pre(budget, *args, **kwargs)
        if name in _PER_ITEM and args:
            if isinstance(args[0], Mapping):
                budget.charge(len(args[0]))
            else:
                args = (budget.iterate(args[0]), *args[1:])
        if name == "join" and args:
            separator = args[1] if len(args) > 1 else kwargs.get("d", "")
            args = (_sized_items(budget, list(args[0]), separator, "join"), *args[1:])
        if pass_arg is _PassArg.context:
            result = fn(context, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = fn(context.eval_ctx, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = fn(context.environment, *args, **kwargs)
        else:
            result = fn(*args, **kwargs)
        if isinstance(result, str | list | tuple):
            budget.build(len(result), f"the result of {name}")
        return result

    return bounded


# --- code generation -----------------------------------------------------------------------

INTERCEPTED_BINOPS = frozenset({"*", "**", "+", "%", "//"})
#: The filter every ``for`` iterable goes through; a name no template can write.
LOOP_FILTER = "budgeted loop"


@jinja2.pass_context
def _budgeted_loop(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    return budget_for(context.environment.limits).iterate(iterable)  # type: ignore[attr-defined]


_NOT_CONSTANT = object()


class _BoundedCodeGenerator(CodeGenerator):
    """Wraps ``for`` iterables and ``~`` in budgeted calls, and refuses a template whose
    constant expressions already break a bound (every render would)."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):  # jinja2 allows no node types of our own: a filter
            loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None, lineno=loop.iter.lineno)
        token = active.set(Budget(self.environment.limits))  # type: ignore[attr-defined]
        try:
            self._check_constants(node)
        finally:
            active.reset(token)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _check_constants(self, node: nodes.Node) -> Any:
        """Evaluate each constant expression once, bottom up, with the bounded operators and filters."""
        if isinstance(node, nodes.Const):
            return node.value
        values = [self._check_constants(child) for child in node.iter_child_nodes()]
        if _NOT_CONSTANT in values:
            return _NOT_CONSTANT
        env: BoundedEnvironment = self.environment  # type: ignore[assignment]
        try:
            if isinstance(node, nodes.BinExpr) and node.operator in INTERCEPTED_BINOPS:
                return env.call_binop(None, node.operator, values[0], values[1])  # type: ignore[arg-type]
            if isinstance(node, nodes.Concat):
                return env.concat_bounded(values)
            if isinstance(node, nodes.List):
                return values
            if isinstance(node, nodes.Tuple):
                return tuple(values)
            if isinstance(node, nodes.Filter) and node.node is not None and not node.kwargs:
                fn = env.filters.get(node.name)
                if fn is not None:
                    return fn(env.context_class(env, {}, None, {}), *values)
        except LimitExceeded as exc:
            exc.line = node.lineno
            raise
        except Exception:
            return _NOT_CONSTANT  # not constant after all: it fails (or not) when rendered
        return _NOT_CONSTANT


# --- the environment -----------------------------------------------------------------------

class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every operator, filter, call and loop budgeted."""

    intercepted_binops = INTERCEPTED_BINOPS
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, limits: TemplateSettings, **options: Any):
        super().__init__(**options)
        self.limits = limits
        self.globals["range"] = self.bounded_range
        del self.globals["lipsum"]  # builds as many paragraphs of filler text as it is asked for
        for name in _REMOVED_FILTERS:
            del self.filters[name]

    def bound_filters(self) -> None:
        """Wrap every filter (call once the environment's own filters are added)."""
        self.filters = {name: bounded_filter(name, fn) for name, fn in self.filters.items()}
        self.filters[LOOP_FILTER] = _budgeted_loop

    def bounded_range(self, *args: int) -> range:
        numbers = range(*args)
        if len(numbers) > self.limits.max_iterations:
            raise LimitExceeded(f"range of {len(numbers)} numbers, over the limit of {self.limits.max_iterations} "
                                "(gateway.templates.max_iterations)")
        return numbers

    def concat(self, parts: Iterable[str]) -> str:
        """A block's text (``{% set %}…{% endset %}``, a macro's, a ``{% filter %}``'s): a loop
        in it may have added the same long value many times."""
        items = list(parts)
        budget_for(self.limits).build(sum(map(len, items)), "the text of a block")
        return "".join(items)

    def concat_bounded(self, values: Iterable[Any]) -> str:
        items = list(values)
        budget_for(self.limits).build(sum(text_size(v, self.limits.max_output) for v in items), "the result of ~")
        return "".join(map(str, items))

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        check_binop(budget_for(self.limits), operator, left, right)
        return self.binop_table[operator](left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = budget_for(self.limits)
        budget.step()
        if isinstance(obj, LoopContext) and args:  # a recursive loop's next level
            args = (budget.iterate(args[0]), *args[1:])
        owner = getattr(obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(budget, owner, getattr(obj, "__name__", ""), args)
        result = super().call(context, obj, *args, **kwargs)
        if isinstance(result, str | list | tuple):
            budget.build(len(result), "the result of a call")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format`` and ``format_map`` with every field checked (:class:`_BoundedFields`)."""
        template = getattr(value, "__self__", None)
        name = getattr(value, "__name__", None)
        if not isinstance(template, str) or name not in ("format", "format_map"):
            return None
        text: str = template

        def format_bounded(*args: Any, **kwargs: Any) -> str:
            fields: Mapping[str, Any] = kwargs
            if name == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                fields, args = args[0], ()
            formatter: _BoundedFields
            if isinstance(text, Markup):
                formatter = _BoundedEscapeFormatter(self, escape=text.escape)
            else:
                formatter = _BoundedFormatter(self)
            formatter.budget = budget_for(self.limits)
            return type(text)(formatter.vformat(text, args, fields))

        return format_bounded

    def _load_template(self, name: str, globals: Any) -> jinja2.Template:
        budget = active.get()
        if budget is not None:  # an include, import or extends while rendering
            budget.step()
        return super()._load_template(name, globals)
