"""Transition conditions in CEL: compiled once, evaluated safely, failures reported as false."""

from __future__ import annotations

from typing import Any

import pytest

from core.conditions import (
    MAX_CONDITION_CHARS,
    MAX_CONDITION_DEPTH,
    MAX_CONDITION_NODES,
    MAX_CONDITION_SECONDS,
    MAX_CONDITION_STEPS,
    MAX_MACRO_NESTING,
    ConditionError,
    ConditionEvalError,
    compile_condition,
    evaluate_or_false,
)
from core.errors import InvalidInput, StageTransitionError
from core.flow_models import FlowContext


def ctx(message: str = "hello", **kwargs: Any) -> FlowContext:
    kwargs.setdefault("stage", "greet")
    return FlowContext(message=message, **kwargs)


@pytest.mark.parametrize(
    ("source", "context", "expected"),
    [
        (
            'has(data.email) && data.email.endsWith("@example.com")',
            ctx(data={"email": "a@example.com"}),
            True,
        ),
        ("has(data.email)", ctx(data={}), False),
        ('"email" in data', ctx(data={"email": "a@example.com"}), True),
        ("data.guests >= 4", ctx(data={"guests": 4}), True),
        ("data.guests >= 4", ctx(data={"guests": 3}), False),
        ('message.contains("refund")', ctx("I want a refund"), True),
        ('message.lowerAscii().contains("refund")', ctx("REFUND now"), True),
        ('message.matches("(?i)^yes\\\\b")', ctx("Yes please"), True),
        ('message.startsWith("no")', ctx("yes"), False),
        ("size(message) > 3", ctx("hey"), False),
        ("turns > 2 && turns_in_stage == 1", ctx(turns=3, turns_in_stage=1), True),
        ('stage == "qualify"', ctx(stage="qualify"), True),
        ('stage == "qualify"', ctx(stage="greet"), False),
        ('data.tags.exists(t, t == "vip")', ctx(data={"tags": ["new", "vip"]}), True),
    ],
)
def test_conditions_decide_on_data_message_and_turns(
    source: str, context: FlowContext, expected: bool
) -> None:
    """A condition sees the message, the stage, the extracted data and the turn counters."""
    assert compile_condition(source).evaluate(context) is expected
    assert evaluate_or_false(compile_condition(source), context) == (expected, None)


@pytest.mark.parametrize(
    ("source", "amount"),
    [("data.amount > 99.5", 100), ("data.amount == 100", 100.0), ("data.amount < 3", 2.5)],
)
def test_ints_and_doubles_compare_both_ways(source: str, amount: float) -> None:
    """An extracted number compares with a literal of the other numeric kind, as the CEL spec says."""
    assert compile_condition(source).evaluate(ctx(data={"amount": amount}))


def test_a_missing_key_makes_the_condition_false_and_says_how_to_test_presence() -> None:
    """Reading a field that was not extracted is an evaluation error: false, with the error text."""
    condition = compile_condition('data.email == "a@example.com"')
    value, error = evaluate_or_false(condition, ctx(data={}))
    assert value is False
    assert error is not None
    assert "'email'" in error
    assert "has(data.<field>)" in error
    with pytest.raises(ConditionEvalError, match="no such member"):
        condition.evaluate(ctx(data={}))


def test_has_guards_a_missing_key_by_short_circuit() -> None:
    """`has(...) && ...` never reads the missing field."""
    condition = compile_condition('has(data.email) && data.email.endsWith(".org")')
    assert evaluate_or_false(condition, ctx(data={})) == (False, None)


def test_a_type_error_is_false_with_the_error() -> None:
    """Comparing a string with a number fails and is reported, not raised."""
    value, error = evaluate_or_false(compile_condition("data.name > 3"), ctx(data={"name": "Guest"}))
    assert value is False
    assert error is not None
    assert "no matching overload" in error
    assert "data.name > 3" in error


@pytest.mark.parametrize(("source", "kind"), [("turns", "int"), ('message + "!"', "string"), ("data", "map")])
def test_a_non_bool_result_is_an_evaluation_error(source: str, kind: str) -> None:
    """A condition must give a bool; any other value counts as false with an error."""
    value, error = evaluate_or_false(compile_condition(source), ctx(turns=2))
    assert value is False
    assert error == f"condition {source!r} gave a value of type {kind}, not a bool"


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("turns >", "at column 7, unexpected end of the expression"),
        ("a ==== b", "unexpected '=='"),
        ("turns > 3 @", "unexpected character '@'"),
        ('message.contains("x"', "unexpected end of the expression"),
    ],
)
def test_a_syntax_error_names_the_problem_and_the_expression(source: str, problem: str) -> None:
    """Syntax errors are `ConditionError` (an `InvalidInput`) naming where and the source."""
    with pytest.raises(ConditionError) as caught:
        compile_condition(source)
    assert problem in caught.value.message
    assert repr(source) in caught.value.message
    assert isinstance(caught.value, InvalidInput)


def test_unknown_names_are_refused_at_compile_time() -> None:
    """A typo in a variable name is found when the flow is saved, not on a user's message."""
    with pytest.raises(ConditionError, match=r"unknown name 'turn' \(known: data, message, stage, turns"):
        compile_condition("turn > 3")
    with pytest.raises(ConditionError, match="unknown function 'lower'"):
        compile_condition('message.lower() == "x"')


def test_empty_and_overlong_conditions_are_refused() -> None:
    with pytest.raises(ConditionError, match="empty"):
        compile_condition("  ")
    with pytest.raises(ConditionError, match=f"the maximum is {MAX_CONDITION_CHARS}"):
        compile_condition("true || " * 300 + "true")


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ('__import__("os").system("true")', "unknown function '__import__'"),
        ('eval("1")', "unknown function 'eval'"),
        ('open("secrets.txt").size() > 0', "unknown function 'open'"),
        ('message.format("x")', "unknown function 'format'"),
        ("__builtins__ == null", "unknown name '__builtins__'"),
        ("google.protobuf.Struct{} == null", "unknown name 'google'"),
        ("data{}", "builds a message object"),
    ],
)
def test_calls_and_names_outside_the_language_do_not_compile(source: str, problem: str) -> None:
    """Only the context's variables and CEL's own functions exist."""
    with pytest.raises(ConditionError, match=problem):
        compile_condition(source)


@pytest.mark.parametrize(
    "source",
    ["message.__class__ == null", "message.__class__.__mro__ == null", 'data.__class__.__name__ == "dict"'],
)
def test_python_attributes_cannot_be_reached(source: str) -> None:
    """CEL's field selection never reaches Python attributes: the interpreter refuses it."""
    value, error = evaluate_or_false(compile_condition(source), ctx(data={"a": 1}))
    assert value is False
    assert error is not None


def test_an_evaluation_error_is_a_stage_transition_error() -> None:
    """Direct callers of `evaluate` get the pipeline's `StageTransitionError` family."""
    with pytest.raises(StageTransitionError):
        compile_condition("1 / 0 == 1").evaluate(ctx())


def test_compiled_conditions_are_cached_by_source() -> None:
    assert compile_condition("turns > 1") is compile_condition("turns > 1")
    assert compile_condition("turns > 1").source == "turns > 1"


# --- cost limits -------------------------------------------------------------------------------

DIGITS = "[0,1,2,3,4,5,6,7,8,9]"
THIRTY = "[" + ",".join(str(n) for n in range(30)) + "]"


def test_the_nested_comprehensions_that_froze_the_loop_are_refused_when_compiled() -> None:
    """What made a 203-character condition run for 9 s: comprehensions nested in one another over
    short literal lists multiply (four levels of ten are 10,000 evaluations of the innermost
    expression, each a few hundred microseconds in cel-python's interpreter)."""
    nested = f"{DIGITS}.all(a, {DIGITS}.all(b, {DIGITS}.all(c, {DIGITS}.all(d, a+b+c+d >= 0))))"
    with pytest.raises(ConditionError, match=f"4 deep; the maximum is {MAX_MACRO_NESTING}"):
        compile_condition(nested)
    in_range = f"{DIGITS}.map(a, {DIGITS}.map(b, {DIGITS}.map(c, c))).size() > 0"
    with pytest.raises(ConditionError, match="3 deep"):
        compile_condition(in_range)


def test_a_condition_nested_too_deep_to_evaluate_is_refused() -> None:
    """Evaluating is recursive: sixty brackets inside one another exhaust Python's stack."""
    assert compile_condition("(" * 15 + "true" + ")" * 15).evaluate(ctx()) is True
    with pytest.raises(ConditionError, match=f"levels deep .*; the maximum is {MAX_CONDITION_DEPTH}"):
        compile_condition("(" * 60 + "true" + ")" * 60)


def test_two_levels_of_comprehension_compile() -> None:
    condition = compile_condition(f"{DIGITS}.map(x, x * 2).exists(y, y == 18)")
    assert condition.evaluate(ctx()) is True


def test_a_condition_with_too_many_nodes_is_refused() -> None:
    source = "[" + ",".join("1" for _ in range(MAX_CONDITION_NODES // 5)) + "].size() > 0"
    assert len(source) <= MAX_CONDITION_CHARS
    with pytest.raises(ConditionError, match=f"expression nodes; the maximum is {MAX_CONDITION_NODES}"):
        compile_condition(source)


@pytest.mark.parametrize(
    "source",
    [
        f"{THIRTY}.all(a, {THIRTY}.all(b, a + b >= 0))",
        f"{THIRTY}.exists(a, {THIRTY}.exists(b, a + b < 0))",
        f"{THIRTY}.all(a, {THIRTY}.all(b, a + b >= 0)) || true",  # no short cut past the budget
        f"true || {THIRTY}.all(a, {THIRTY}.all(b, a + b >= 0))",
    ],
)
def test_an_evaluation_over_its_step_budget_fails_and_counts_as_false(source: str) -> None:
    condition = compile_condition(source)
    # The steps run out first; on a machine loaded enough the time (the backstop) may instead.
    spent = (
        rf"took (more than {MAX_CONDITION_STEPS} steps|longer than {MAX_CONDITION_SECONDS:g} s) \(the limit\)"
    )
    with pytest.raises(ConditionEvalError, match=spent):
        condition.evaluate(ctx())
    value, error = evaluate_or_false(condition, ctx())
    assert value is False
    assert error is not None
    assert "(the limit)" in error


def test_the_budget_is_per_evaluation() -> None:
    """A condition near the budget passes every time: steps do not carry over."""
    condition = compile_condition(f"{THIRTY}.all(a, a >= 0) && {THIRTY}.exists(b, b == 29)")
    assert [condition.evaluate(ctx()) for _ in range(3)] == [True, True, True]
