"""Flow validation and stage selection, decided purely."""

from __future__ import annotations

from typing import Any

import pytest

from core.conditions import MAX_CONDITION_STEPS, MAX_SELECTION_STEPS
from core.errors import InvalidInput, StageTransitionError
from core.flow import (
    FlowInvalid,
    StageDecision,
    entry_stage,
    parse_stage_choice,
    rules_for_stage,
    select_next_stage,
    stage_by_name,
    template_by_id,
    validate_flow,
)
from core.flow_models import (
    ExtractionRule,
    ExtractorKind,
    FieldType,
    Flow,
    FlowContext,
    Stage,
    Template,
    TemplateType,
    Transition,
)
from core.types import BusinessId

BIZ = BusinessId("biz-1")


def stage(stage_id: str, **kwargs: Any) -> Stage:
    return Stage(stage_id=stage_id, business_id=BIZ, name=kwargs.pop("name", stage_id), **kwargs)


def transition(
    transition_id: str, src: str, dst: str, condition: str | None = None, priority: int = 0
) -> Transition:
    return Transition(transition_id, BIZ, src, dst, condition=condition, priority=priority)


def template(template_id: str, kind: TemplateType) -> Template:
    return Template(template_id, BIZ, name=f"{template_id}-name", type=kind, content="{{ message }}")


def rule(
    rule_id: str, field: str, kind: ExtractorKind = ExtractorKind.PATTERN, **kwargs: Any
) -> ExtractionRule:
    return ExtractionRule(rule_id, BIZ, field, kind, **kwargs)


def ctx(message: str = "hi", stage_name: str = "greet", **kwargs: Any) -> FlowContext:
    return FlowContext(message=message, stage=stage_name, **kwargs)


def valid_flow() -> Flow:
    """greet -> qualify -> (book | lost); qualify picks with the model; book is final."""
    return Flow(
        business_id=BIZ,
        stages=(
            stage("greet", is_entry=True, response_template_id="t-resp"),
            stage(
                "qualify",
                selection_template_id="t-sel",
                extraction_template_id="t-ext",
                response_template_id="t-resp",
            ),
            stage("book"),
            stage("lost"),
        ),
        transitions=(
            transition("greet-qualify", "greet", "qualify", "turns >= 1"),
            transition("qualify-book", "qualify", "book", "has(data.email)"),
            transition("qualify-lost", "qualify", "lost"),
        ),
        templates=(
            template("t-sel", TemplateType.STAGE_SELECTION),
            template("t-ext", TemplateType.DATA_EXTRACTION),
            template("t-resp", TemplateType.RESPONSE_GENERATION),
        ),
        rules=(
            rule("r-email", "email", field_type=FieldType.EMAIL),
            rule("r-phone", "phone", field_type=FieldType.PHONE, stage_id="qualify"),
            rule("r-size", "party_size", pattern=r"(?P<value>\d+) people", field_type=FieldType.NUMBER),
            rule("r-need", "need", ExtractorKind.LLM, stage_id="qualify"),
        ),
    )


def replace(flow: Flow, **kwargs: Any) -> Flow:
    fields = {
        "business_id": flow.business_id,
        "stages": flow.stages,
        "transitions": flow.transitions,
        "templates": flow.templates,
        "rules": flow.rules,
    }
    return Flow(**{**fields, **kwargs})


def problems_of(flow: Flow) -> list[str]:
    with pytest.raises(FlowInvalid) as caught:
        validate_flow(flow)
    assert caught.value.message == "flow is invalid: " + "; ".join(caught.value.problems)
    return caught.value.problems


# --- validation ------------------------------------------------------------------------------


def test_a_valid_flow_passes() -> None:
    """Final stages without transitions and email/phone rules without a pattern are fine."""
    validate_flow(valid_flow())


def test_flow_invalid_is_invalid_input() -> None:
    assert issubclass(FlowInvalid, InvalidInput)


def test_no_entry_stage() -> None:
    flow = valid_flow()
    stages = tuple(stage(s.stage_id) for s in flow.stages if not s.is_entry)
    assert "no entry stage" in problems_of(replace(flow, stages=stages, transitions=()))


def test_several_entry_stages_are_named() -> None:
    flow = replace(valid_flow(), stages=(*valid_flow().stages, stage("other", is_entry=True)))
    assert "several entry stages: 'greet', 'other'" in problems_of(flow)


def test_duplicate_stage_names() -> None:
    flow = replace(valid_flow(), stages=(*valid_flow().stages, stage("book-2", name="book")))
    assert "stage name 'book' is used by several stages" in problems_of(flow)


def test_transition_to_an_unknown_stage_names_both() -> None:
    flow = replace(valid_flow(), transitions=(*valid_flow().transitions, transition("t-x", "book", "ghost")))
    assert "transition 't-x': to stage 'ghost' does not exist" in problems_of(flow)


def test_transition_from_an_unknown_stage_names_both() -> None:
    flow = replace(valid_flow(), transitions=(*valid_flow().transitions, transition("t-y", "ghost", "book")))
    assert "transition 't-y': from stage 'ghost' does not exist" in problems_of(flow)


def test_a_missing_template() -> None:
    flow = replace(valid_flow(), templates=valid_flow().templates[1:])
    assert "stage 'qualify': selection template 't-sel' does not exist" in problems_of(flow)


@pytest.mark.parametrize(
    ("attribute", "template_id", "role", "actual", "expected"),
    [
        ("selection_template_id", "t-resp", "selection", "response_generation", "stage_selection"),
        ("extraction_template_id", "t-sel", "extraction", "stage_selection", "data_extraction"),
        ("response_template_id", "t-ext", "response", "data_extraction", "response_generation"),
    ],
)
def test_a_template_of_the_wrong_type(
    attribute: str, template_id: str, role: str, actual: str, expected: str
) -> None:
    stages = (*valid_flow().stages, stage("extra", **{attribute: template_id}))
    transitions = (*valid_flow().transitions, transition("to-extra", "greet", "extra"))
    assert (
        f"stage 'extra': {role} template {template_id!r} is a {actual} template, not a {expected} template"
        in problems_of(replace(valid_flow(), stages=stages, transitions=transitions))
    )


def test_a_rule_in_an_unknown_stage() -> None:
    flow = replace(valid_flow(), rules=(rule("r-x", "zip", pattern=r"\d{5}", stage_id="ghost"),))
    assert problems_of(flow) == ["extraction rule 'r-x': stage 'ghost' does not exist"]


def test_a_pattern_rule_without_a_pattern_for_a_type_without_a_default() -> None:
    flow = replace(valid_flow(), rules=(rule("r-x", "zip", field_type=FieldType.TEXT),))
    assert problems_of(flow) == [
        "extraction rule 'r-x': a pattern rule needs a pattern (only email and phone fields have a built-in one)"
    ]


def test_a_pattern_that_does_not_compile() -> None:
    flow = replace(valid_flow(), rules=(rule("r-x", "zip", pattern="(unclosed"),))
    [problem] = problems_of(flow)
    assert problem.startswith("extraction rule 'r-x': pattern does not compile: missing )")


def test_a_validator_that_does_not_compile() -> None:
    flow = replace(valid_flow(), rules=(rule("r-x", "zip", pattern=r"\d+", validator="[a-"),))
    [problem] = problems_of(flow)
    assert problem.startswith("extraction rule 'r-x': validator does not compile")


def test_patterns_and_validators_re2_cannot_run_are_problems_naming_the_feature() -> None:
    flow = replace(
        valid_flow(),
        rules=(
            rule("r-back", "a", pattern=r"(\w)\1"),
            rule("r-look", "b", pattern=r"\d+", validator=r"(?<!0)\d+"),
        ),
    )
    assert problems_of(flow) == [
        "extraction rule 'r-back': pattern does not compile: backreferences are not supported "
        "(patterns run on RE2, in linear time): invalid escape sequence: \\1",
        "extraction rule 'r-look': validator does not compile: lookbehind are not supported "
        "(patterns run on RE2, in linear time): invalid perl operator: (?<!",
    ]


def test_a_costly_condition_is_a_problem() -> None:
    digits = "[0,1,2,3,4,5,6,7,8,9]"
    nested = f"{digits}.all(a, {digits}.all(b, {digits}.all(c, a + b + c > 0)))"
    base = valid_flow()
    flow = replace(base, transitions=(*base.transitions, transition("t-x", "greet", "qualify", nested)))
    [problem] = problems_of(flow)
    assert problem.startswith("transition 't-x': condition nests comprehensions")
    assert "3 deep; the maximum is 2" in problem


def test_all_conditions_of_one_selection_share_a_budget() -> None:
    """Many costly transitions out of one stage: each condition has its own budget, and all of
    them together the selection's; once that is spent, the conditions left are false at once."""
    thirty = "[" + ",".join(str(n) for n in range(30)) + "]"
    costly = f"{thirty}.all(a, {thirty}.exists(b, a + b < 0))"
    base = valid_flow()
    many = tuple(transition(f"t-{n}", "greet", "qualify", costly, priority=10) for n in range(12))
    flow = replace(base, transitions=(*many, *base.transitions))
    assert select_next_stage(base, "greet", ctx(turns=1)).via == "condition:greet-qualify"
    decision = select_next_stage(flow, "greet", ctx(turns=1))
    # The cheap `turns >= 1` comes last (lower priority), after the selection's budget is spent.
    assert (decision.stage, decision.via) == ("greet", "none")
    assert len(decision.errors) == 13
    spent = [e for e in decision.errors if "the stage selection took" in e and "(the limit)" in e]
    assert len(spent) >= 13 - MAX_SELECTION_STEPS // MAX_CONDITION_STEPS, decision.errors
    assert "turns >= 1" in decision.errors[-1]
    assert "the stage selection took" in decision.errors[-1]


def test_an_llm_rule_in_a_stage_without_an_extraction_template() -> None:
    flow = replace(valid_flow(), rules=(rule("r-x", "need", ExtractorKind.LLM, stage_id="greet"),))
    assert problems_of(flow) == [
        "extraction rule 'r-x': an LLM rule in stage 'greet', which has no extraction template"
    ]


def test_a_stage_less_llm_rule_needs_some_stage_with_an_extraction_template() -> None:
    flow = valid_flow()
    stages = tuple(stage(s.stage_id, is_entry=s.is_entry) for s in flow.stages)
    flow = replace(flow, stages=stages, rules=(rule("r-x", "need", ExtractorKind.LLM),))
    assert problems_of(flow) == [
        "extraction rule 'r-x': an LLM rule, but no stage has an extraction template"
    ]


def test_an_invalid_condition_names_the_transition_and_the_problem() -> None:
    transitions = (transition("greet-qualify", "greet", "qualify", "turns >"), *valid_flow().transitions[1:])
    [problem] = problems_of(replace(valid_flow(), transitions=transitions))
    assert problem.startswith("transition 'greet-qualify': condition syntax error at column 7")


def test_unreachable_stages_are_named() -> None:
    flow = replace(valid_flow(), stages=(*valid_flow().stages, stage("island"), stage("rock")))
    assert problems_of(flow) == ["unreachable stages (no path from the entry stage): 'island', 'rock'"]


def test_every_problem_is_listed() -> None:
    """One flow with many problems reports all of them, not just the first."""
    flow = Flow(
        business_id=BIZ,
        stages=(stage("a", selection_template_id="nope"), stage("b"), stage("c", name="b")),
        transitions=(transition("t1", "a", "ghost", "data.x >"),),
        templates=(),
        rules=(rule("r1", "x", stage_id="ghost"), rule("r2", "y", ExtractorKind.LLM, stage_id="b")),
    )
    problems = problems_of(flow)
    assert problems[:3] == [
        "no entry stage",
        "stage name 'b' is used by several stages",
        "transition 't1': to stage 'ghost' does not exist",
    ]
    assert problems[3].startswith("transition 't1': condition syntax error")
    assert problems[4:] == [
        "stage 'a': selection template 'nope' does not exist",
        "extraction rule 'r1': stage 'ghost' does not exist",
        "extraction rule 'r1': a pattern rule needs a pattern (only email and phone fields have a built-in one)",
        "extraction rule 'r2': an LLM rule in stage 'b', which has no extraction template",
    ]


# --- lookups ---------------------------------------------------------------------------------


def test_lookups() -> None:
    flow = valid_flow()
    assert entry_stage(flow).name == "greet"
    assert stage_by_name(flow, "book") == flow.stages[2]
    assert stage_by_name(flow, "nope") is None
    assert template_by_id(flow, "t-ext") == flow.templates[1]
    assert template_by_id(flow, "nope") is None
    assert [r.rule_id for r in rules_for_stage(flow, "qualify")] == ["r-email", "r-phone", "r-size", "r-need"]
    assert [r.rule_id for r in rules_for_stage(flow, "greet")] == ["r-email", "r-size"]


def test_entry_stage_of_a_flow_without_one_raises() -> None:
    with pytest.raises(FlowInvalid, match="no entry stage"):
        entry_stage(Flow(business_id=BIZ, stages=(stage("a"),)))


# --- selection by condition ------------------------------------------------------------------


def linear_flow(*transitions: Transition) -> Flow:
    stages = (stage("start", is_entry=True), stage("a"), stage("b"), stage("c"))
    return Flow(business_id=BIZ, stages=stages, transitions=transitions)


def test_the_highest_priority_true_condition_wins() -> None:
    flow = linear_flow(
        transition("low", "start", "a", "true", priority=1),
        transition("high", "start", "b", "true", priority=5),
        transition("false", "start", "c", "false", priority=9),
    )
    assert select_next_stage(flow, "start", ctx()) == StageDecision("b", True, "condition:high")


def test_ties_go_by_order_in_the_flow() -> None:
    flow = linear_flow(transition("first", "start", "c"), transition("second", "start", "a"))
    assert select_next_stage(flow, "start", ctx()).via == "condition:first"


def test_a_condition_error_is_reported_and_skipped() -> None:
    flow = linear_flow(
        transition("broken", "start", "a", 'data.email == "x"', priority=2),
        transition("fine", "start", "b", "turns >= 1", priority=1),
    )
    decision = select_next_stage(flow, "start", ctx(turns=1))
    assert (decision.stage, decision.via) == ("b", "condition:fine")
    [error] = decision.errors
    assert error.startswith("transition 'broken': condition 'data.email == \"x\"' failed: no such member")


def test_nothing_matches_so_the_conversation_stays() -> None:
    flow = linear_flow(transition("t", "start", "a", "turns > 5"))
    assert select_next_stage(flow, "start", ctx(turns=1)) == StageDecision("start", False, "none")


def test_a_final_stage_stays() -> None:
    assert select_next_stage(linear_flow(), "c", ctx()) == StageDecision("c", False, "none")


def test_conditions_see_the_context() -> None:
    flow = linear_flow(transition("t", "start", "a", 'has(data.email) && message.contains("book")'))
    assert select_next_stage(flow, "start", ctx("book it", data={"email": "a@b.co"})).stage == "a"
    assert select_next_stage(flow, "start", ctx("book it", data={})).stage == "start"


def test_a_removed_stage_falls_back_to_the_entry_stage() -> None:
    """A conversation in a stage the admin deleted restarts from the entry stage, and says so."""
    flow = linear_flow(transition("t", "start", "a", "turns > 5"))
    decision = select_next_stage(flow, "deleted", ctx(turns=1))
    assert decision == StageDecision(
        "start",
        True,
        "none",
        errors=("stage 'deleted' is not in the flow; starting again from entry stage 'start'",),
    )


def test_a_removed_stage_then_follows_the_entry_stage_transitions() -> None:
    flow = linear_flow(transition("t", "start", "a"))
    decision = select_next_stage(flow, "deleted", ctx())
    assert (decision.stage, decision.changed, decision.via) == ("a", True, "condition:t")


def test_a_removed_stage_without_an_entry_stage_is_a_stage_transition_error() -> None:
    flow = Flow(business_id=BIZ, stages=(stage("a"),))
    with pytest.raises(StageTransitionError, match="stage 'gone' is not in the flow, and flow is invalid"):
        select_next_stage(flow, "gone", ctx())


# --- selection by the model ------------------------------------------------------------------


def test_a_stage_with_a_selection_template_asks_the_model() -> None:
    """The model may pick the current stage or any target whose guard holds (no condition = allowed)."""
    flow = valid_flow()
    decision = select_next_stage(flow, "qualify", ctx(stage_name="qualify", data={"email": "a@b.co"}))
    assert decision == StageDecision("qualify", False, "llm", ("qualify", "book", "lost"))


def test_a_false_guard_removes_the_target_from_the_allowed_list() -> None:
    decision = select_next_stage(valid_flow(), "qualify", ctx(stage_name="qualify", data={}))
    assert decision.allowed == ("qualify", "lost")
    assert decision.errors == ()


def test_a_failing_guard_is_not_allowed_and_reported() -> None:
    flow = replace(
        valid_flow(),
        transitions=(
            *valid_flow().transitions[:2],
            transition("qualify-lost", "qualify", "lost", "data.x > 1"),
        ),
    )
    decision = select_next_stage(flow, "qualify", ctx(stage_name="qualify", data={}))
    assert decision.allowed == ("qualify",)
    [error] = decision.errors
    assert error.startswith("transition 'qualify-lost': condition 'data.x > 1' failed")


def test_the_allowed_list_is_ordered_by_priority() -> None:
    flow = replace(
        valid_flow(),
        transitions=(
            *valid_flow().transitions[:1],
            transition("qualify-book", "qualify", "book"),
            transition("qualify-lost", "qualify", "lost", priority=3),
        ),
    )
    assert select_next_stage(flow, "qualify", ctx()).allowed == ("qualify", "lost", "book")


# --- the model's pick ------------------------------------------------------------------------


ALLOWED = ("qualify", "book_call", "Lost")


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("book_call", "book_call"),
        ("  BOOK_CALL \n", "book_call"),
        ('"book_call"', "book_call"),
        ("'lost'.", "Lost"),
        ("**qualify**", "qualify"),
        ("`book_call`!", "book_call"),
        ('["book_call"]', "book_call"),
        ('{"stage": "book_call"}', "book_call"),
        ('{"stage": " Lost "}', "Lost"),
    ],
)
def test_parse_stage_choice_accepts_the_name_in_the_usual_wrappings(answer: str, expected: str) -> None:
    assert parse_stage_choice(answer, ALLOWED) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "book",
        "unknown",
        "I think book_call",
        "Stage: book_call",
        '{"stage": "nowhere"}',
        '{"next": "book_call"}',
        '{"stage": 3}',
        "{not json",
    ],
)
def test_parse_stage_choice_refuses_everything_else(answer: str) -> None:
    assert parse_stage_choice(answer, ALLOWED) is None


def test_parse_stage_choice_refuses_a_name_that_is_not_allowed() -> None:
    assert parse_stage_choice("book", ("qualify", "lost")) is None
