"""Prompt templates, rendered in a sandbox with limits.

Jinja2's immutable sandbox with attribute access refused altogether: templates can substitute
variables and use filters and control flow, but cannot reach into objects or run code. A variable
the template uses but the caller did not provide is an error naming it, never an empty string.

A business writes its templates, and every message renders them, so what a render may cost is
bounded (each limit fails the render with a `TemplateError` naming it):

- `range()` gives at most `MAX_RANGE_ITEMS` numbers (Jinja's own sandbox allows 100,000 and
  raises an `OverflowError` beyond, which is now a `TemplateError` like every other failure);
- a render takes at most `MAX_RENDER_STEPS` steps (each loop iteration, call and filter is one)
  and `MAX_RENDER_SECONDS` seconds;
- its output, and every string or list it builds on the way (`*`, `%`, `+`, `~`, filters such as
  `center`, `indent`, `replace`, `join`, `batch`), is at most `MAX_OUTPUT_CHARS` long, checked
  before the large value is built where the operation could make it huge at once;
- an integer it computes has at most `MAX_INT_BITS` bits (`**` and `*` on integers);
- `lipsum()` is not available.

`template_problems` reports, when a template is saved, what can be known then: a syntax error, a
literal `range()` over the limit. The rest fails at render time; the caller decides what a failed
render means (a failed answer, an error in a dry run).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from core.budget import Budget, BudgetExceeded, running, tick
from core.errors import TemplateError

MAX_RANGE_ITEMS = 1000
MAX_RENDER_STEPS = 100_000
MAX_RENDER_SECONDS = 0.5
MAX_OUTPUT_CHARS = 1_000_000
MAX_INT_BITS = 4096
MAX_WIDTH = 1000
MAX_TEMPLATE_CHARS = 20_000
"""A template's source (its content, or its system prompt): compiling one costs time linear in it,
and long ones (Jinja2 compiles a dense 500 KB template for half a minute) would hold up a worker."""
"""The largest width, indent or count a filter may be given (`center`, `indent`, `batch` ...)."""

_LOOP_FILTER = "chatgw_loop"
_SIZE_FILTER = "chatgw_size"


class _Limit(Exception):
    """A template went over one of the limits; the message names it."""


_SEQUENCES = (str, bytes, list, tuple)


def _weight(value: Any, limit: int = MAX_OUTPUT_CHARS) -> int:
    """About how many characters `value` prints as, nested values and repeated references
    included (what `str()` would build), counted only until it is over `limit`: the count costs
    at most `limit` steps, however a value shares its parts."""
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, list | tuple | set | frozenset):
            total += len(item) + 1
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, dict):
            total += 2 * len(item) + 1
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            total += 1
    return total


def _checked(value: Any, what: str = "a value") -> Any:
    size = _weight(value)
    if size > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} of {size} items or characters; the maximum is {MAX_OUTPUT_CHARS}")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"a number over {MAX_INT_BITS} bits")
    return value


def _capped_range(*args: int) -> range:
    numbers = range(*args)
    try:
        count = str(len(numbers))
    except OverflowError:  # more than sys.maxsize
        count = f"more than {sys.maxsize}"
    if count.startswith("more") or int(count) > MAX_RANGE_ITEMS:
        raise _Limit(f"range() of {count} numbers; the maximum is {MAX_RANGE_ITEMS}")
    return numbers


def _loop(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every `{% for %}` iterates through: one budget step per iteration."""
    for item in iterable:
        tick()
        yield item


def _joined(parts: Iterable[str]) -> str:
    """Jinja's `concat` (how macros, `{% set %}` blocks, `{% filter %}` blocks and calls put their
    output together), counting the length before the string is built."""
    items = parts if isinstance(parts, list) else list(parts)
    total = sum(map(len, items))
    if total > MAX_OUTPUT_CHARS:
        raise _Limit(f"a block of {total} characters; the maximum is {MAX_OUTPUT_CHARS}")
    return "".join(items)


def _concatenated(value: Any) -> Any:
    tick()
    return _checked(value, "a value built or printed")


# --- binary operators, checked before a huge value is built --------------------------------------

_FORMAT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _multiply(left: Any, right: Any) -> Any:
    for seq, times in ((left, right), (right, left)):
        if (
            isinstance(seq, _SEQUENCES)
            and isinstance(times, int)
            and _weight(seq) * max(times, 0) > MAX_OUTPUT_CHARS
        ):
            raise _Limit(f"repeating a value {times} times; the result would be over {MAX_OUTPUT_CHARS}")
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_INT_BITS
    ):
        raise _Limit(f"a number over {MAX_INT_BITS} bits")
    return left * right


def _power(left: Any, right: Any) -> Any:
    growing = isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
    if growing and left.bit_length() * right > MAX_INT_BITS:
        raise _Limit(f"a number over {MAX_INT_BITS} bits")
    return left**right


def _check_format(text: str) -> None:
    for width, precision in _FORMAT_SPEC.findall(text):
        for part in (width, precision):
            if part == "*" or (part and int(part) > MAX_WIDTH):
                raise _Limit(f"a % format width or precision over {MAX_WIDTH}")


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check_format(left)
    return left % right


_BINOPS: dict[str, Callable[[Any, Any], Any]] = {
    "*": _multiply,
    "**": _power,
    "%": _modulo,
    "+": lambda left, right: left + right,
}


# --- filters -----------------------------------------------------------------------------------


def _at_most(value: Any, what: str, limit: int = MAX_WIDTH) -> None:
    if isinstance(value, int) and value > limit:
        raise _Limit(f"{what} {value}; the maximum is {limit}")
    if isinstance(value, str) and len(value) > limit:
        raise _Limit(f"{what} of {len(value)} characters; the maximum is {limit}")


def _estimate(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} would make {size} characters; the maximum is {MAX_OUTPUT_CHARS}")


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], at: int, name: str) -> Any:
    return args[at] if len(args) > at else kwargs.get(name)


def _precheck(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse the arguments with which a filter would build a huge value in one step. `args` are
    the filter's arguments without the environment or context Jinja passes first."""
    value = args[0] if args else None
    text = str(value) if isinstance(value, str) else ""
    if name == "center":
        _at_most(_argument(args, kwargs, 1, "width"), "center() width")
    elif name == "indent":
        width = _argument(args, kwargs, 1, "width")
        _at_most(width, "indent() width")
        pad = width if isinstance(width, int) else len(width or "")
        _estimate(len(text) + (text.count("\n") + 1) * pad, "indent()")
    elif name in ("batch", "slice"):
        _at_most(_argument(args, kwargs, 1, "linecount" if name == "batch" else "slices"), f"{name}() count")
    elif name == "tojson":
        _at_most(_argument(args, kwargs, 1, "indent"), "tojson() indent", 16)
    elif name == "wordwrap":
        wrap = _argument(args, kwargs, 3, "wrapstring")
        _estimate(len(text) * (1 + len(wrap or "\n")), "wordwrap()")
    elif name == "replace":
        old, new = _argument(args, kwargs, 1, "old"), _argument(args, kwargs, 2, "new")
        if isinstance(old, str) and isinstance(new, str):
            times = text.count(old) if old else len(text) + 1
            _estimate(len(text) + times * len(new), "replace()")
    elif name == "join" and isinstance(value, list):
        sep = _argument(args, kwargs, 1, "d")
        parts = sum(len(item) for item in value if isinstance(item, str))
        _estimate(len(value) * len(sep if isinstance(sep, str) else "") + parts, "join()")
    elif name == "format" and isinstance(value, str):
        _check_format(value)


def _materialised(value: Any) -> Any:
    if isinstance(value, str | dict) or not isinstance(value, Iterable):
        return value
    items = []
    for item in value:
        tick()
        items.append(item)
    return items


def _guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # A filter marked with Jinja's pass_context, pass_eval_ctx or pass_environment gets that
    # first, and the value second.
    first = 1 if hasattr(function, "jinja_pass_arg") else 0

    @functools.wraps(function)  # keeps that mark, for Jinja to see on the guarded filter too
    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if name == "join" and len(args) > first:  # counted before the joined string is built
            args = (*args[:first], _materialised(args[first]), *args[first + 1 :])
        _precheck(name, args[first:], kwargs)
        result = function(*args, **kwargs)
        if name in ("list", "string", "join", "map", "select", "reject") or isinstance(result, str):
            result = _checked(result, f"the result of {name}()")
        return result

    return guarded


# --- the environment ---------------------------------------------------------------------------


def _sized(node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, _SIZE_FILTER, [], [], None, None, lineno=node.lineno)


class _Guards(NodeTransformer):
    """Route every loop's iterable through the budget, and every `~`, list, tuple and dict literal
    and every printed value through the size check (before `str()` builds its text)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _sized(node)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        self.generic_visit(node)
        return _sized(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        self.generic_visit(node)
        return _sized(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _sized(node) if node.ctx == "load" else node  # not `{% for a, b in ... %}`

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            child if isinstance(child, nodes.TemplateData) else _sized(child) for child in node.nodes
        ]
        return node


class _SandboxEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(_BINOPS)
    concat = staticmethod(_joined)

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, autoescape=False)
        self.globals["range"] = _capped_range
        self.globals.pop("lipsum", None)
        self.filters = {name: _guarded_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = _loop
        self.filters[_SIZE_FILTER] = _concatenated

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        tick()
        return _checked(_BINOPS[operator](left, right))

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        tick()
        return _checked(super().call(__context, __obj, *args, **kwargs), "a call's result")


_ENV = _SandboxEnvironment()


@lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template is {len(source)} characters long; the maximum is {MAX_TEMPLATE_CHARS}")
    try:
        guarded = _Guards().visit(_ENV.parse(source))
        assert isinstance(guarded, nodes.Template)
        return _ENV.from_string(guarded)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error on line {exc.lineno}: {exc.message}") from exc
    except (RecursionError, SyntaxError, MemoryError) as exc:  # Python's own limits, compiling it
        raise TemplateError(
            "template nests too deeply to compile: fewer tags or brackets inside one another"
        ) from exc


def render(source: str, variables: Mapping[str, Any]) -> str:
    """Render `source` with `variables` within the limits; raise `TemplateError` naming what went
    wrong (a missing variable, something the sandbox refuses, a limit, any other failure)."""
    template = _compile(source)
    budget = Budget("the template", max_steps=MAX_RENDER_STEPS, max_seconds=MAX_RENDER_SECONDS)
    parts: list[str] = []
    length = 0
    try:
        with running(budget):
            for part in template.generate(dict(variables)):
                budget.tick()
                length += len(part)
                if length > MAX_OUTPUT_CHARS:
                    raise _Limit(f"output over {MAX_OUTPUT_CHARS} characters (the maximum)")
                parts.append(part)
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template variable missing: {exc.message}") from exc
    except SecurityError as exc:
        raise TemplateError(f"template not allowed: {exc}") from exc
    except (_Limit, BudgetExceeded) as exc:
        raise TemplateError(f"template over a limit: {exc}") from exc
    except TemplateError:
        raise
    except Exception as exc:  # the template's own failure (a type error, 1/0): never the caller's
        raise TemplateError(f"template failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return "".join(parts)


# --- checks when a template is saved -------------------------------------------------------------


def template_problems(source: str) -> list[str]:
    """What is wrong with `source` that can be known without rendering it (empty: nothing)."""
    try:
        _compile(source)
    except TemplateError as exc:
        return [exc.message.removeprefix("template ")]
    problems = []
    try:
        calls = list(_ENV.parse(source).find_all(nodes.Call))
        for call in calls:
            if isinstance(call.node, nodes.Name) and call.node.name == "range" and not call.kwargs:
                bounds = [_constant(arg) for arg in call.args]
                if bounds and all(isinstance(b, int) for b in bounds):
                    try:
                        _capped_range(*bounds)  # type: ignore[arg-type]
                    except _Limit as exc:
                        problems.append(f"line {call.lineno}: {exc}")
                    except (ValueError, TypeError):
                        pass
    except RecursionError:  # compiled, so only the literal checks gave up: nothing known
        pass
    return problems


def _constant(node: nodes.Node) -> int | None:
    """The value of a literal integer expression (`1000`, `10**9`, `-5`), within bounds; None
    for anything else or anything too large to compute safely."""
    if isinstance(node, nodes.Const) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, nodes.Neg):
        inner = _constant(node.node)
        return None if inner is None else -inner
    if isinstance(node, nodes.BinExpr):
        left, right = _constant(node.left), _constant(node.right)
        if left is None or right is None:
            return None
        try:
            value = _BINOPS.get(node.operator, _PLAIN_BINOPS.get(node.operator))
            if value is None:
                return None
            result = value(left, right)
        except (_Limit, ArithmeticError, ValueError):
            return None
        return result if isinstance(result, int) else None
    return None


_PLAIN_BINOPS: dict[str, Callable[[int, int], int]] = {
    "-": lambda a, b: a - b,
    "//": lambda a, b: a // b,
}
