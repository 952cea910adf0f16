"""Stage selection and flow validation, decided purely.

Stages are named by the conversation (`FlowContext.stage`, `StageDecision.stage`); transitions
and rules refer to stages by id. `select_next_stage` either settles the next stage from the
transitions' conditions or tells the caller to ask the model (`via == "llm"`), which then checks
the model's pick with `parse_stage_choice`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.budget import running
from core.conditions import ConditionError, compile_condition, evaluate_or_false, selection_budget
from core.errors import InvalidInput, StageTransitionError
from core.extraction import default_pattern
from core.flow_models import (
    ExtractionRule,
    ExtractorKind,
    Flow,
    FlowContext,
    Stage,
    Template,
    TemplateType,
    Transition,
)
from core.patterns import pattern_problem


class FlowInvalid(InvalidInput):
    """A flow configuration with problems; `problems` names each of them."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("flow is invalid: " + "; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class StageDecision:
    stage: str
    """The stage name to be in after this message (for via == "llm": until the model picks)."""
    changed: bool
    via: str
    """How it was decided: `condition:<transition_id>`, `none` (stay), or `llm` (ask the model)."""
    allowed: tuple[str, ...] = ()
    """The stage names the model may pick when via == "llm", the current stage first."""
    errors: tuple[str, ...] = ()
    """Condition evaluation errors and inconsistencies met on the way, for the caller to count."""


def stage_by_name(flow: Flow, name: str) -> Stage | None:
    return next((stage for stage in flow.stages if stage.name == name), None)


def stage_by_id(flow: Flow, stage_id: str) -> Stage | None:
    return next((stage for stage in flow.stages if stage.stage_id == stage_id), None)


def template_by_id(flow: Flow, template_id: str) -> Template | None:
    return next((t for t in flow.templates if t.template_id == template_id), None)


def entry_stage(flow: Flow) -> Stage:
    """The flow's one entry stage; raise `FlowInvalid` when there is none or several."""
    entries = [stage for stage in flow.stages if stage.is_entry]
    problem = _entry_problem(entries)
    if problem is not None:
        raise FlowInvalid([problem])
    return entries[0]


def rules_for_stage(flow: Flow, stage_id: str) -> list[ExtractionRule]:
    """The rules that apply in a stage: its own and the stage-less ones, in flow order."""
    return [rule for rule in flow.rules if rule.stage_id in (stage_id, None)]


def _outgoing(flow: Flow, stage_id: str) -> list[Transition]:
    """The stage's transitions, higher priority first, ties in flow order (sort is stable)."""
    return sorted((t for t in flow.transitions if t.from_stage_id == stage_id), key=lambda t: -t.priority)


# --- selection -------------------------------------------------------------------------------


def select_next_stage(flow: Flow, current: str, ctx: FlowContext) -> StageDecision:
    """Where the conversation in stage `current` goes after the message in `ctx`.

    A stage with a selection template leaves the pick to the model among `allowed` (its
    transitions' conditions are guards). Otherwise the first transition by priority whose
    condition holds is taken; none: stay. A condition that fails to evaluate counts as false
    and is reported in `errors`. A current stage that is no longer in the flow restarts from
    the entry stage (reported too); with no usable entry stage that raises
    `StageTransitionError`. All the conditions evaluated share one budget (`selection_budget`).
    """
    with running(selection_budget()):
        return _select(flow, current, ctx)


def _select(flow: Flow, current: str, ctx: FlowContext) -> StageDecision:
    errors: list[str] = []
    stage = stage_by_name(flow, current)
    if stage is None:
        try:
            stage = entry_stage(flow)
        except FlowInvalid as exc:
            raise StageTransitionError(f"stage {current!r} is not in the flow, and {exc.message}") from exc
        errors.append(f"stage {current!r} is not in the flow; starting again from entry stage {stage.name!r}")
    if stage.selection_template_id is not None:
        allowed = _allowed_targets(flow, stage, ctx, errors)
        return StageDecision(stage.name, stage.name != current, "llm", allowed, tuple(errors))
    for transition in _outgoing(flow, stage.stage_id):
        target = stage_by_id(flow, transition.to_stage_id)
        if target is None:
            errors.append(
                f"transition {transition.transition_id!r} leads to unknown stage {transition.to_stage_id!r}"
            )
        elif _holds(transition, ctx, errors):
            via = f"condition:{transition.transition_id}"
            return StageDecision(target.name, target.name != current, via, (), tuple(errors))
    return StageDecision(stage.name, stage.name != current, "none", (), tuple(errors))


def _allowed_targets(flow: Flow, stage: Stage, ctx: FlowContext, errors: list[str]) -> tuple[str, ...]:
    allowed = [stage.name]
    for transition in _outgoing(flow, stage.stage_id):
        target = stage_by_id(flow, transition.to_stage_id)
        if target is None:
            errors.append(
                f"transition {transition.transition_id!r} leads to unknown stage {transition.to_stage_id!r}"
            )
        elif target.name not in allowed and _holds(transition, ctx, errors):
            allowed.append(target.name)
    return tuple(allowed)


def _holds(transition: Transition, ctx: FlowContext, errors: list[str]) -> bool:
    if transition.condition is None:
        return True
    try:
        condition = compile_condition(transition.condition)
    except ConditionError as exc:
        errors.append(f"transition {transition.transition_id!r}: {exc.message}")
        return False
    value, error = evaluate_or_false(condition, ctx)
    if error is not None:
        errors.append(f"transition {transition.transition_id!r}: {error}")
    return value


_STRIP = " \t\r\n\"'`\u2018\u2019\u201c\u201d.,;:!?*()[]"


def parse_stage_choice(answer: str, allowed: Sequence[str]) -> str | None:
    """The allowed stage the model picked, spelled as in `allowed`; None for anything else.

    Accepts the bare name (any case, surrounded by whitespace, quotes or punctuation) or a JSON
    object `{"stage": "<name>"}`.
    """
    text = answer.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or not isinstance(parsed.get("stage"), str):
            return None
        text = parsed["stage"]
    candidate = text.strip(_STRIP)
    if candidate in allowed:
        return candidate
    matches = [name for name in allowed if name.casefold() == candidate.casefold()]
    return matches[0] if len(matches) == 1 else None


# --- validation ------------------------------------------------------------------------------


def validate_flow(flow: Flow) -> None:
    """Raise `FlowInvalid` listing every problem of the flow; return if there is none."""
    problems = [
        *_stage_problems(flow),
        *_transition_problems(flow),
        *_template_problems(flow),
        *_rule_problems(flow),
        *_reachability_problems(flow),
    ]
    if problems:
        raise FlowInvalid(problems)


def _entry_problem(entries: Sequence[Stage]) -> str | None:
    if not entries:
        return "no entry stage"
    if len(entries) > 1:
        return "several entry stages: " + ", ".join(repr(stage.name) for stage in entries)
    return None


def _duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for value in values:
        if value in seen and value not in repeated:
            repeated.append(value)
        seen.add(value)
    return repeated


def _stage_problems(flow: Flow) -> list[str]:
    problems = [
        f"stage name {name!r} is used by several stages" for name in _duplicates(s.name for s in flow.stages)
    ]
    problems += [
        f"stage id {sid!r} is used by several stages" for sid in _duplicates(s.stage_id for s in flow.stages)
    ]
    entry = _entry_problem([stage for stage in flow.stages if stage.is_entry])
    return ([entry] if entry else []) + problems


def _transition_problems(flow: Flow) -> list[str]:
    stage_ids = {stage.stage_id for stage in flow.stages}
    problems: list[str] = []
    for t in flow.transitions:
        for end, stage_id in (("from", t.from_stage_id), ("to", t.to_stage_id)):
            if stage_id not in stage_ids:
                problems.append(f"transition {t.transition_id!r}: {end} stage {stage_id!r} does not exist")
        if t.condition is not None:
            try:
                compile_condition(t.condition)
            except ConditionError as exc:
                problems.append(f"transition {t.transition_id!r}: {exc.message}")
    return problems


_TEMPLATE_ROLES = (
    ("selection", "selection_template_id", TemplateType.STAGE_SELECTION),
    ("extraction", "extraction_template_id", TemplateType.DATA_EXTRACTION),
    ("response", "response_template_id", TemplateType.RESPONSE_GENERATION),
)


def _template_problems(flow: Flow) -> list[str]:
    problems: list[str] = []
    for stage in flow.stages:
        for role, attribute, expected in _TEMPLATE_ROLES:
            template_id: str | None = getattr(stage, attribute)
            if template_id is None:
                continue
            template = template_by_id(flow, template_id)
            if template is None:
                problems.append(f"stage {stage.name!r}: {role} template {template_id!r} does not exist")
            elif template.type is not expected:
                problems.append(
                    f"stage {stage.name!r}: {role} template {template_id!r} is a {template.type} "
                    f"template, not a {expected} template"
                )
    return problems


def _rule_problems(flow: Flow) -> list[str]:
    problems: list[str] = []
    for rule in flow.rules:
        stage = None if rule.stage_id is None else stage_by_id(flow, rule.stage_id)
        if rule.stage_id is not None and stage is None:
            problems.append(f"extraction rule {rule.rule_id!r}: stage {rule.stage_id!r} does not exist")
        if rule.kind is ExtractorKind.PATTERN:
            problems += _pattern_problems(rule)
        elif stage is not None and stage.extraction_template_id is None:
            problems.append(
                f"extraction rule {rule.rule_id!r}: an LLM rule in stage {stage.name!r}, "
                "which has no extraction template"
            )
        elif rule.stage_id is None and not any(s.extraction_template_id for s in flow.stages):
            problems.append(
                f"extraction rule {rule.rule_id!r}: an LLM rule, but no stage has an extraction template"
            )
        if rule.validator is not None:
            problems += _regex_problems(rule, "validator", rule.validator)
    return problems


def _pattern_problems(rule: ExtractionRule) -> list[str]:
    if rule.pattern is not None:
        return _regex_problems(rule, "pattern", rule.pattern)
    if default_pattern(rule.field_type) is None:
        return [
            f"extraction rule {rule.rule_id!r}: a pattern rule needs a pattern "
            f"(only email and phone fields have a built-in one)"
        ]
    return []


def _regex_problems(rule: ExtractionRule, what: str, regex: str) -> list[str]:
    problem = pattern_problem(regex)
    return [] if problem is None else [f"extraction rule {rule.rule_id!r}: {what} {problem}"]


def _reachability_problems(flow: Flow) -> list[str]:
    entries = [stage for stage in flow.stages if stage.is_entry]
    if len(entries) != 1:
        return []  # reported as an entry problem; reachability has no start
    reached = {entries[0].stage_id}
    frontier = [entries[0].stage_id]
    while frontier:
        stage_id = frontier.pop()
        for t in flow.transitions:
            if t.from_stage_id == stage_id and t.to_stage_id not in reached:
                reached.add(t.to_stage_id)
                frontier.append(t.to_stage_id)
    unreachable = [stage.name for stage in flow.stages if stage.stage_id not in reached]
    if not unreachable:
        return []
    return ["unreachable stages (no path from the entry stage): " + ", ".join(map(repr, unreachable))]
