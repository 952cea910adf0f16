"""The admin API's JSON, to and from flow records (the shapes are documented in gateway/admin_api.py).

The API speaks in names; records refer to each other by id. Encoding turns ids into names;
decoding resolves names among the records given and refuses anything it cannot read with an
`InvalidInput` (400) naming the field. Whether the flow as a whole holds together is
`problems_of`'s to say (422).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from core.errors import InvalidInput
from core.flow import FlowInvalid, stage_by_id, template_by_id, validate_flow
from core.flow_models import (
    ExtractionRule,
    ExtractorKind,
    FieldType,
    Flow,
    Stage,
    Template,
    TemplateType,
    Transition,
)
from core.templates import template_problems
from core.types import BusinessId, new_id

E = TypeVar("E", bound=enum.Enum)

NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_. -]{0,98}[A-Za-z0-9_.-])?")
"""Stage and template names: they appear in URLs, in conditions and in the model's options."""
FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""Extracted fields and template variables: conditions read them as `data.<field>`."""
_NAME_RULE = "1 to 100 letters, digits, spaces, '_', '.' or '-', starting with a letter or digit"
_FIELD_RULE = "an identifier of at most 64 characters (letters, digits, '_')"
_INT32 = 2**31 - 1


class Body:
    """A JSON object of a request, read field by field; every mistake is an `InvalidInput` naming
    the field (`where` is the object's own place, e.g. `stages[2]`, for nested objects)."""

    def __init__(self, data: Any, where: str = "") -> None:
        if not isinstance(data, dict):
            raise InvalidInput(f"{f'field {where!r}' if where else 'the request body'} must be a JSON object")
        self._data: dict[str, Any] = data
        self.where = where

    def path(self, field: str) -> str:
        return f"{self.where}.{field}" if self.where else field

    def bad(self, field: str, problem: str) -> InvalidInput:
        return InvalidInput(f"field {self.path(field)!r} {problem}")

    def has(self, field: str) -> bool:
        return field in self._data

    def only(self, *fields: str) -> None:
        unknown = sorted(set(self._data) - set(fields))
        if unknown:
            where = repr(self.where) if self.where else "the request body"
            raise InvalidInput(f"unknown field(s) in {where}: {', '.join(unknown)}")

    def _get(self, field: str, default: Any) -> Any:
        if field in self._data:
            return self._data[field]
        if default is None:
            raise self.bad(field, "is required")
        return default

    def text(self, field: str, default: str | None = None) -> str:
        """A string; `default` when absent (None: the field is required)."""
        value = self._get(field, default)
        if not isinstance(value, str):
            raise self.bad(field, "must be a string")
        return value

    def opt_text(self, field: str, default: str | None = None) -> str | None:
        """A string or null; `default` when absent."""
        value = self._data.get(field, default)
        if value is not None and not isinstance(value, str):
            raise self.bad(field, "must be a string or null")
        return value

    def name(self, field: str, default: str | None = None) -> str:
        value = self.text(field, default)
        if not NAME_RE.fullmatch(value):
            raise self.bad(field, f"must be a name: {_NAME_RULE}")
        return value

    def field_name(self, field: str, default: str | None = None) -> str:
        value = self.text(field, default)
        if not FIELD_RE.fullmatch(value):
            raise self.bad(field, f"must be {_FIELD_RULE}")
        return value

    def flag(self, field: str, default: bool) -> bool:
        value = self._data.get(field, default)
        if not isinstance(value, bool):
            raise self.bad(field, "must be true or false")
        return value

    def integer(self, field: str, default: int | None, low: int = -_INT32, high: int = _INT32) -> int:
        value = self._get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.bad(field, f"must be an integer from {low} to {high}")
        return value

    def choice(self, field: str, kind: type[E], default: E | None = None) -> E:
        value = self._get(field, default)
        if isinstance(value, kind):
            return value
        try:
            return kind(value)
        except (ValueError, TypeError):
            known = ", ".join(str(member.value) for member in kind)
            raise self.bad(field, f"must be one of: {known}") from None

    def field_names(self, field: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._data.get(field, default)
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and FIELD_RE.fullmatch(v) for v in value
        ):
            raise self.bad(field, f"must be a list of names, each {_FIELD_RULE}")
        return tuple(value)

    def mapping(self, field: str) -> dict[str, Any]:
        value = self._data.get(field, {})
        if not isinstance(value, dict):
            raise self.bad(field, "must be a JSON object")
        return value

    def items(self, field: str) -> list[Any]:
        """A JSON list (required)."""
        value = self._get(field, None)
        if not isinstance(value, list):
            raise self.bad(field, "must be a list")
        return value

    def obj(self, field: str) -> Body:
        return Body(self._data.get(field, {}), self.path(field))

    def objects(self, field: str) -> list[Body]:
        value = self._data.get(field, [])
        if not isinstance(value, list):
            raise self.bad(field, "must be a list of objects")
        return [Body(item, f"{self.path(field)}[{n}]") for n, item in enumerate(value)]

    def record_id(self) -> str:
        """The object's `id` (a UUID) when given, else a new one."""
        value = self._data.get("id")
        if value is None:
            return new_id()
        try:
            return str(uuid.UUID(value))
        except (ValueError, TypeError, AttributeError):
            raise self.bad("id", "must be a UUID") from None


# --- records -> JSON ---------------------------------------------------------------------------


def _stage_name(flow: Flow, stage_id: str | None) -> str | None:
    stage = None if stage_id is None else stage_by_id(flow, stage_id)
    return stage.name if stage is not None else stage_id


def _template_name(flow: Flow, template_id: str | None) -> str | None:
    template = None if template_id is None else template_by_id(flow, template_id)
    return template.name if template is not None else template_id


def stage_json(flow: Flow, stage: Stage) -> dict[str, Any]:
    return {
        "id": stage.stage_id,
        "name": stage.name,
        "description": stage.description,
        "is_entry": stage.is_entry,
        "selection_template": _template_name(flow, stage.selection_template_id),
        "extraction_template": _template_name(flow, stage.extraction_template_id),
        "response_template": _template_name(flow, stage.response_template_id),
    }


def transition_json(flow: Flow, transition: Transition) -> dict[str, Any]:
    return {
        "id": transition.transition_id,
        "from": _stage_name(flow, transition.from_stage_id),
        "to": _stage_name(flow, transition.to_stage_id),
        "condition": transition.condition,
        "priority": transition.priority,
    }


def template_json(template: Template) -> dict[str, Any]:
    return {
        "id": template.template_id,
        "name": template.name,
        "type": template.type.value,
        "content": template.content,
        "system_prompt": template.system_prompt,
        "variables": list(template.variables),
        "version": template.version,
    }


def rule_json(flow: Flow, rule: ExtractionRule) -> dict[str, Any]:
    return {
        "id": rule.rule_id,
        "field": rule.field,
        "kind": rule.kind.value,
        "field_type": rule.field_type.value,
        "stage": _stage_name(flow, rule.stage_id),
        "pattern": rule.pattern,
        "validator": rule.validator,
    }


def flow_json(flow: Flow) -> dict[str, Any]:
    return {
        "version": flow.version,
        "stages": [stage_json(flow, s) for s in flow.stages],
        "transitions": [transition_json(flow, t) for t in flow.transitions],
        "templates": [template_json(t) for t in flow.templates],
        "rules": [rule_json(flow, r) for r in flow.rules],
    }


# --- JSON -> records ---------------------------------------------------------------------------
#
# Each builder reads a record's fields over `base`: for a new record (`new=True`) the fields
# without a default are required; for a change, an absent field keeps the base's value.


def _ref(body: Body, field: str, ids: dict[str, str], what: str, default: str | None) -> str | None:
    """The id of the record the field names (null: None); `default` when the field is absent."""
    if not body.has(field):
        return default
    if body.opt_text(field) is None:
        return None
    name = body.name(field)
    if name not in ids:
        raise body.bad(field, f"names no {what}: {name!r}")
    return ids[name]


def _stage_ref(body: Body, field: str, stages: Sequence[Stage], default: str | None) -> str | None:
    return _ref(body, field, {s.name: s.stage_id for s in reversed(stages)}, "stage", default)


def _required_stage_ref(body: Body, field: str, stages: Sequence[Stage], default: str | None) -> str:
    stage_id = _stage_ref(body, field, stages, default)
    if stage_id is None:
        raise body.bad(field, "is required (a stage name)")
    return stage_id


def _template_ref(body: Body, field: str, templates: Sequence[Template], default: str | None) -> str | None:
    return _ref(body, field, {t.name: t.template_id for t in reversed(templates)}, "template", default)


def _keep(value: str, new: bool) -> str | None:
    return None if new else value


def stage_record(
    body: Body, templates: Sequence[Template], base: Stage, *, new: bool, extra: tuple[str, ...] = ()
) -> Stage:
    body.only(
        "name",
        "description",
        "is_entry",
        "selection_template",
        "extraction_template",
        "response_template",
        *extra,
    )
    return replace(
        base,
        name=body.name("name", _keep(base.name, new)),
        description=body.text("description", base.description),
        is_entry=body.flag("is_entry", base.is_entry),
        selection_template_id=_template_ref(
            body, "selection_template", templates, base.selection_template_id
        ),
        extraction_template_id=_template_ref(
            body, "extraction_template", templates, base.extraction_template_id
        ),
        response_template_id=_template_ref(body, "response_template", templates, base.response_template_id),
    )


def transition_record(
    body: Body, stages: Sequence[Stage], base: Transition, *, new: bool, extra: tuple[str, ...] = ()
) -> Transition:
    body.only("from", "to", "condition", "priority", *extra)
    return replace(
        base,
        from_stage_id=_required_stage_ref(body, "from", stages, _keep(base.from_stage_id, new)),
        to_stage_id=_required_stage_ref(body, "to", stages, _keep(base.to_stage_id, new)),
        condition=body.opt_text("condition", base.condition),
        priority=body.integer("priority", base.priority),
    )


def incoming_record(body: Body, stages: Sequence[Stage], to_stage: Stage) -> Transition:
    """A new transition into `to_stage` from `{stage, condition, priority}` (a new stage's `from`)."""
    body.only("stage", "condition", "priority")
    return Transition(
        new_id(),
        to_stage.business_id,
        from_stage_id=_required_stage_ref(body, "stage", stages, None),
        to_stage_id=to_stage.stage_id,
        condition=body.opt_text("condition"),
        priority=body.integer("priority", 0),
    )


def template_record(body: Body, base: Template, *, new: bool, extra: tuple[str, ...] = ()) -> Template:
    body.only("name", "type", "content", "system_prompt", "variables", *extra)
    changed = replace(
        base,
        name=body.name("name", _keep(base.name, new)),
        type=body.choice("type", TemplateType, None if new else base.type),
        content=body.text("content", _keep(base.content, new)),
        system_prompt=body.text("system_prompt", base.system_prompt),
        variables=body.field_names("variables", base.variables),
    )
    return replace(changed, version=template_version(changed, None if new else base))


def template_version(template: Template, old: Template | None) -> int:
    """1 for a new template; the old version + 1 when the text changed (as the stores count)."""
    if old is None:
        return 1
    same = (template.content, template.system_prompt) == (old.content, old.system_prompt)
    return old.version if same else old.version + 1


def rule_record(
    body: Body, stages: Sequence[Stage], base: ExtractionRule, *, new: bool, extra: tuple[str, ...] = ()
) -> ExtractionRule:
    body.only("field", "kind", "field_type", "stage", "pattern", "validator", *extra)
    return replace(
        base,
        field=body.field_name("field", _keep(base.field, new)),
        kind=body.choice("kind", ExtractorKind, None if new else base.kind),
        field_type=body.choice("field_type", FieldType, base.field_type),
        stage_id=_stage_ref(body, "stage", stages, base.stage_id),
        pattern=body.opt_text("pattern", base.pattern),
        validator=body.opt_text("validator", base.validator),
    )


def blank_template(business_id: BusinessId, template_id: str | None = None) -> Template:
    """A template to read a new one's fields over (its type and content are required)."""
    return Template(template_id or new_id(), business_id, "", TemplateType.RESPONSE_GENERATION, "")


def flow_record(body: Body, current: Flow, *, version_required: bool) -> Flow:
    """The whole flow a body describes (for PUT and validate). Records keep the ids given; the
    others get new ones. Template versions count on from the current flow's."""
    body.only("version", "stages", "transitions", "templates", "rules")
    bid = current.business_id
    version = body.integer("version", None if version_required else current.version, 0)
    templates: list[Template] = []
    for item in body.objects("templates"):
        template = template_record(
            item, blank_template(bid, item.record_id()), new=True, extra=("id", "version")
        )
        old = template_by_id(current, template.template_id)
        templates.append(replace(template, version=template_version(template, old)))
    stages = [
        stage_record(item, templates, Stage(item.record_id(), bid, ""), new=True, extra=("id",))
        for item in body.objects("stages")
    ]
    transitions = [
        transition_record(item, stages, Transition(item.record_id(), bid, "", ""), new=True, extra=("id",))
        for item in body.objects("transitions")
    ]
    rules = [
        rule_record(
            item,
            stages,
            ExtractionRule(item.record_id(), bid, "", ExtractorKind.PATTERN),
            new=True,
            extra=("id",),
        )
        for item in body.objects("rules")
    ]
    for kind, ids in (
        ("templates", [t.template_id for t in templates]),
        ("transitions", [t.transition_id for t in transitions]),
        ("rules", [r.rule_id for r in rules]),
    ):
        for repeated in _repeated(ids):
            raise InvalidInput(f"field {kind!r}: id {repeated!r} is used by several records")
    return Flow(bid, tuple(stages), tuple(transitions), tuple(templates), tuple(rules), version)


# --- checks ------------------------------------------------------------------------------------


def _repeated(values: Iterable[str]) -> list[str]:
    return [value for value, count in Counter(values).items() if count > 1]


def problems_of(flow: Flow) -> list[str]:
    """Everything wrong with the flow as a whole (empty: it may be saved), records named by name."""
    try:
        validate_flow(flow)
        problems: list[str] = []
    except FlowInvalid as exc:
        problems = list(exc.problems)
    problems += [
        f"template name {name!r} is used by several templates"
        for name in _repeated(t.name for t in flow.templates)
    ]
    problems += [problem for t in flow.templates for problem in _syntax_problems(t)]
    return [_readable(problem, flow) for problem in problems]


def _syntax_problems(template: Template) -> list[str]:
    """Syntax errors, and limits a template is known to break before it renders (a literal
    `range()` over core.templates' maximum)."""
    return [
        f"template {template.name!r}: {part} {problem}"
        for part, source in (("content", template.content), ("system_prompt", template.system_prompt))
        for problem in template_problems(source)
    ]


def _readable(problem: str, flow: Flow) -> str:
    """A core problem message with the ids it names followed or replaced by names."""
    for t in flow.transitions:
        mark = f"transition {t.transition_id!r}"
        names = f"{_stage_name(flow, t.from_stage_id)} -> {_stage_name(flow, t.to_stage_id)}"
        problem = problem.replace(mark, f"{mark} ({names})")
    for template in flow.templates:
        problem = problem.replace(f"template {template.template_id!r}", f"template {template.name!r}")
    for stage in flow.stages:
        problem = problem.replace(f"stage {stage.stage_id!r}", f"stage {stage.name!r}")
    for rule in flow.rules:
        mark = f"extraction rule {rule.rule_id!r}"
        problem = problem.replace(mark, f"{mark} (field {rule.field!r})")
    return problem
