"""Transition conditions, written by business admins in CEL (the Common Expression Language).

CEL is a small, side-effect-free expression language: no statements, no loops beyond bounded
macros over literal data, no attribute access into Python objects, no imports. It is evaluated
by `cel-python`'s tree-walking interpreter (never `eval`/`exec`); its `matches()` uses RE2, so a
regex in a condition runs in linear time.

What a condition sees (`FlowContext`):

- `message` (string): the user's message.
- `stage` (string): the name of the conversation's current stage.
- `data` (map): the extracted values by field. Reading a field that was not extracted is an
  evaluation error (so the condition is false); test presence first with `has(data.email)` or
  `"email" in data`.
- `turns`, `turns_in_stage` (int): user messages so far, this one included.

String functions: `contains`, `startsWith`, `endsWith`, `matches` (RE2, `(?i)` for any case),
`size`, and `lowerAscii()` (CEL's strings extension). Examples::

    has(data.email) && has(data.phone)
    message.lowerAscii().contains("refund") || message.matches("(?i)money back")
    stage == "qualify" && turns_in_stage >= 3 && !has(data.budget)

A condition must give a bool; anything else is an evaluation error. Integers and doubles
compare with each other (`data.amount > 99.5` works when amount is 100), as the CEL spec says.
Names and functions are checked when a condition is compiled, so a typo (`turn > 3`) or an
attempt to reach something else (`__import__("os")`) is a syntax-time `ConditionError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import (
    CELEvalError,
    CELFunction,
    CELUnsupportedError,
    Context,
    Evaluator,
    base_functions,
)

from core.budget import Budget, BudgetExceeded, current, running, tick
from core.errors import InvalidInput, StageTransitionError
from core.flow_models import FlowContext

MAX_CONDITION_CHARS = 1000
MAX_CONDITION_NODES = 1000
"""Nodes of the parsed expression (a name, a literal, an operator, a call: each one or a few)."""
MAX_CONDITION_DEPTH = 200
"""Levels of the parsed expression inside one another (a plain condition has 30 to 60; each pair of
brackets adds about 10): evaluating is recursive, and a deeper one would exhaust Python's stack."""
MAX_MACRO_NESTING = 2
"""Comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) inside one another: each level
multiplies the work, so a few nested ones over short literal lists run for seconds."""
MAX_CONDITION_STEPS = 5000
"""Interpreter steps one evaluation may take (a step is one node visited; a plain condition takes
tens). Beyond it the evaluation fails, and a failed condition is false."""
MAX_CONDITION_SECONDS = 0.25
"""The backstop: an evaluation that runs longer than this fails the same way."""
MAX_SELECTION_STEPS = 20_000
MAX_SELECTION_SECONDS = 0.5
"""All the conditions one stage selection evaluates (a stage may have many transitions), together:
once spent, the conditions left fail at once, so they are false."""
VARIABLES = frozenset({"message", "stage", "data", "turns", "turns_in_stage"})
_MACROS = frozenset({"has", "all", "exists", "exists_one", "map", "filter"})
_BINDING_MACROS = frozenset({"all", "exists", "exists_one", "map", "filter"})
_TYPE_NAMES = frozenset(
    {"int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"}
)


class ConditionError(InvalidInput):
    """A condition does not compile: a syntax error, an unknown name or function, too long."""


class ConditionEvalError(StageTransitionError):
    """A condition failed at evaluation (a missing key, a type error, a non-bool result)."""


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _lower_ascii(value: celtypes.Value) -> celtypes.StringType:
    if not isinstance(value, celtypes.StringType):
        raise TypeError("lowerAscii() applies to a string")
    return celtypes.StringType(value.translate(_ASCII_LOWER))


def _numeric(compare: CELFunction) -> CELFunction:
    """Let an int and a double compare (cel-python only does double-with-int, not the reverse)."""

    def promoted(a: Any, b: Any) -> Any:
        if isinstance(a, celtypes.DoubleType) and isinstance(b, celtypes.IntType | celtypes.UintType):
            b = celtypes.DoubleType(b)
        elif isinstance(b, celtypes.DoubleType) and isinstance(a, celtypes.IntType | celtypes.UintType):
            a = celtypes.DoubleType(a)
        return compare(a, b)

    return promoted


_EXTRA_FUNCTIONS: dict[str, CELFunction] = {
    "lowerAscii": _lower_ascii,
    **{op: _numeric(base_functions[op]) for op in ("_<_", "_<=_", "_>_", "_>=_", "_==_", "_!=_")},
}
_FUNCTIONS = frozenset(name for name in base_functions if name[0].isalpha()) | {"lowerAscii"} | _MACROS


class _BudgetedEvaluator(Evaluator):
    """cel-python's interpreter, ticking the current budget at every node it visits (the nested
    evaluators of comprehensions too), so that no evaluation outruns `MAX_CONDITION_STEPS`."""

    def visit(self, tree: lark.Tree[lark.Token]) -> Any:
        tick()
        return super().visit(tree)

    def visit_children(self, tree: lark.Tree[lark.Token]) -> list[Any]:
        tick(sum(isinstance(child, lark.Tree) for child in tree.children))
        return super().visit_children(tree)

    def sub_evaluator(self, ast: lark.Tree[lark.Token]) -> Evaluator:
        return _BudgetedEvaluator(ast, activation=self.activation)


class _BudgetedRunner(celpy.InterpretedRunner):
    def evaluate(self, context: Context) -> celtypes.Value:
        return _BudgetedEvaluator(ast=self.ast, activation=self.new_activation()).evaluate(context)


@lru_cache(maxsize=1)
def _environment() -> celpy.Environment:
    # Built once: it loads the CEL grammar and builds its parser (and raises the recursion limit
    # to 2500, which CEL's nesting minimums need).
    return celpy.Environment(runner_class=_BudgetedRunner)


def prepare() -> None:
    """Build the CEL environment now (its parser: about 0.1 s of CPU) rather than on the first
    condition compiled, which would make the first message after a start wait for it."""
    _environment()


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    """A compiled condition; evaluate it as often as needed."""

    source: str
    _program: celpy.Runner

    def evaluate(self, context: FlowContext) -> bool:
        """The condition's value for `context`; raise `ConditionEvalError` naming the failure.

        The evaluation runs on a budget (`MAX_CONDITION_STEPS`, `MAX_CONDITION_SECONDS`): one
        that would take longer fails here, whatever the condition says."""
        budget = Budget(
            "the condition",
            max_steps=MAX_CONDITION_STEPS,
            max_seconds=MAX_CONDITION_SECONDS,
            within=current(),  # the stage selection's, when one runs
        )
        try:
            with running(budget):
                result = self._program.evaluate(_activation(context))
        except BudgetExceeded as exc:
            raise ConditionEvalError(f"condition {self.source!r} failed: {exc}") from exc
        except (CELEvalError, CELUnsupportedError) as exc:
            raise ConditionEvalError(f"condition {self.source!r} failed: {_describe(exc)}") from exc
        except (RecursionError, ValueError, TypeError, KeyError) as exc:
            raise ConditionEvalError(f"condition {self.source!r} failed: {exc!r}") from exc
        if isinstance(result, CELEvalError):
            raise ConditionEvalError(f"condition {self.source!r} failed: {_describe(result)}")
        if not isinstance(result, celtypes.BoolType | bool):
            kind = _cel_type_name(result)
            raise ConditionEvalError(f"condition {self.source!r} gave a value of type {kind}, not a bool")
        return bool(result)


def selection_budget() -> Budget:
    """The budget of one stage selection's conditions together (see `MAX_SELECTION_STEPS`)."""
    return Budget("the stage selection", max_steps=MAX_SELECTION_STEPS, max_seconds=MAX_SELECTION_SECONDS)


def evaluate_or_false(condition: Condition, context: FlowContext) -> tuple[bool, str | None]:
    """(value, None) or, when evaluation failed, (False, the error text) for the caller to count."""
    try:
        return condition.evaluate(context), None
    except ConditionEvalError as exc:
        return False, exc.message


@lru_cache(maxsize=1024)
def compile_condition(source: str) -> Condition:
    """Parse and check `source` once (cached by source); raise `ConditionError` naming the problem."""
    if len(source) > MAX_CONDITION_CHARS:
        raise ConditionError(
            f"condition is {len(source)} characters long; the maximum is {MAX_CONDITION_CHARS}"
        )
    if not source.strip():
        raise ConditionError("condition is empty")
    env = _environment()
    try:
        tree = env.compile(source)
    except CELParseError as exc:
        raise ConditionError(f"condition syntax error {_where(exc)}: {source!r}") from exc
    _check_names(tree, source)
    _check_size(tree, source)
    return Condition(source, env.program(tree, functions=_EXTRA_FUNCTIONS))


def _activation(context: FlowContext) -> dict[str, Any]:
    return {
        "message": celtypes.StringType(context.message),
        "stage": celtypes.StringType(context.stage),
        "data": json_to_cel(dict(context.data)),
        "turns": celtypes.IntType(context.turns),
        "turns_in_stage": celtypes.IntType(context.turns_in_stage),
    }


def _where(exc: CELParseError) -> str:
    cause = exc.__context__
    if isinstance(cause, lark.UnexpectedToken):
        found = "end of the expression" if cause.token.type == "$END" else f"{cause.token.value!r}"
        what = f"unexpected {found}"
    elif isinstance(cause, lark.UnexpectedCharacters):
        what = f"unexpected character {cause.char!r}"
    else:
        what = "cannot parse"
    if exc.column is None:
        return what
    return f"at column {exc.column}, {what}"


_CEL_TYPE_NAMES: tuple[tuple[type | tuple[type, ...], str], ...] = (
    (celtypes.UintType, "uint"),
    (int, "int"),
    (float, "double"),
    (str, "string"),
    (bytes, "bytes"),
    (list, "list"),
    (dict, "map"),
    (type(None), "null"),
)


def _cel_type_name(value: object) -> str:
    return next((name for kind, name in _CEL_TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def _describe(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    text = text.split(" (in activation", 1)[0]
    text = re.sub(r"<class 'celpy\.celtypes\.(\w+?)Type'>", lambda m: m[1].lower(), text)
    text = re.sub(r"Token\('RULE', '(\w+)'\)", r"\1", text)
    if text.startswith("no such member in mapping"):
        text += " (test presence with has(data.<field>) first)"
    return text[:300]


def _check_names(tree: lark.Tree[lark.Token], source: str) -> None:
    bound = set(_macro_variables(tree))
    for kind, name in _references(tree):
        if kind == "name" and name not in VARIABLES | bound | _TYPE_NAMES:
            known = ", ".join(sorted(VARIABLES))
            raise ConditionError(f"condition uses unknown name {name!r} (known: {known}): {source!r}")
        if kind == "function" and name not in _FUNCTIONS:
            raise ConditionError(f"condition calls unknown function {name!r}: {source!r}")
        if kind == "object":
            raise ConditionError(f"condition builds a message object, which conditions cannot: {source!r}")


def _check_size(tree: lark.Tree[lark.Token], source: str) -> None:
    nodes = sum(1 for _ in tree.iter_subtrees())
    if nodes > MAX_CONDITION_NODES:
        raise ConditionError(
            f"condition has {nodes} expression nodes; the maximum is {MAX_CONDITION_NODES}: {source!r}"
        )
    levels = _depth(tree)
    if levels > MAX_CONDITION_DEPTH:
        raise ConditionError(
            f"condition nests {levels} levels deep (brackets, calls and operators inside one another); "
            f"the maximum is {MAX_CONDITION_DEPTH}: {source!r}"
        )
    depth = _macro_depth(tree)
    if depth > MAX_MACRO_NESTING:
        raise ConditionError(
            f"condition nests comprehensions (all, exists, exists_one, map, filter) {depth} deep; "
            f"the maximum is {MAX_MACRO_NESTING}: {source!r}"
        )


def _depth(tree: lark.Tree[lark.Token]) -> int:
    deepest = 0
    stack: list[tuple[lark.Tree[lark.Token], int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return deepest


def _macro_depth(node: Any) -> int:
    """How many comprehensions are nested in one another at most, in the range or the body."""
    if not isinstance(node, lark.Tree):
        return 0
    # Iteratively, deepest first: a nested expression may be deeper than the recursion limit.
    deepest = 0
    stack: list[tuple[Any, int]] = [(node, 0)]
    while stack:
        current, depth = stack.pop()
        if not isinstance(current, lark.Tree):
            continue
        if current.data == "member_dot_arg" and _token(current) in _BINDING_MACROS:
            depth += 1
            deepest = max(deepest, depth)
        stack.extend((child, depth) for child in current.children)
    return deepest


def _references(tree: lark.Tree[lark.Token]) -> Iterator[tuple[str, str]]:
    for node in tree.iter_subtrees():
        if node.data in ("ident", "dot_ident"):
            yield "name", _token(node)
        elif node.data in ("ident_arg", "dot_ident_arg", "member_dot_arg"):
            yield "function", _token(node)
        elif node.data == "member_object":
            yield "object", ""


def _macro_variables(tree: lark.Tree[lark.Token]) -> Iterator[str]:
    """The variables `list.exists(x, ...)` and its kin bind (allowed anywhere in this expression)."""
    for node in tree.iter_subtrees():
        if node.data == "member_dot_arg" and _token(node) in _BINDING_MACROS and len(node.children) > 2:
            args = node.children[2]
            if isinstance(args, lark.Tree) and args.children:
                first = _single_ident(args.children[0])
                if first is not None:
                    yield first


def _single_ident(node: Any) -> str | None:
    while isinstance(node, lark.Tree) and len(node.children) == 1 and node.data != "ident":
        node = node.children[0]
    if isinstance(node, lark.Tree) and node.data == "ident":
        return _token(node)
    return None


def _token(node: lark.Tree[lark.Token]) -> str:
    """The node's first token: the name of an identifier, a function call or a method call."""
    return next((str(child) for child in node.children if isinstance(child, lark.Token)), "")
