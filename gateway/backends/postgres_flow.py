"""How PostgresStore keeps a business's flow (stages, transitions, templates, extraction rules)
and its audit log: whole-flow reads and writes, inside the caller's transaction."""

from __future__ import annotations

import uuid

import asyncpg

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
from core.models import AuditEntry
from core.types import BusinessId, new_id
from gateway.backends.pg_ids import uuid_or_not_found as _uuid


async def insert_audit(c: asyncpg.Connection, business_id: uuid.UUID, entry: AuditEntry) -> None:
    # clock_timestamp(), not the column's now(): two records written in one transaction still get
    # the order they were written in.
    await c.execute(
        "INSERT INTO audit_logs (log_id, business_id, user_id, actor_type, action_type, action_data,"
        " conversation_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp())",
        uuid.UUID(new_id()),
        business_id,
        _uuid(entry.actor_id) if entry.actor_id else None,
        entry.actor_type,
        entry.action_type,
        dict(entry.action_data),
        _uuid(entry.conversation_id) if entry.conversation_id else None,
    )


async def read_flow(c: asyncpg.Connection, business_id: uuid.UUID) -> Flow | None:
    version = await c.fetchval("SELECT flow_version FROM businesses WHERE business_id = $1", business_id)
    if version is None:
        return None
    bid = BusinessId(str(business_id))
    templates = await c.fetch(
        "SELECT template_id, name, type, content, system_prompt, variables, version FROM templates"
        " WHERE business_id = $1 ORDER BY position",
        business_id,
    )
    stages = await c.fetch(
        "SELECT stage_id, name, description, is_entry, selection_template_id, extraction_template_id,"
        " response_template_id FROM stages WHERE business_id = $1 ORDER BY position",
        business_id,
    )
    transitions = await c.fetch(
        "SELECT transition_id, from_stage_id, to_stage_id, condition, priority FROM stage_transitions"
        " WHERE business_id = $1 ORDER BY position",
        business_id,
    )
    rules = await c.fetch(
        "SELECT rule_id, stage_id, field, kind, pattern, field_type, validator FROM extraction_rules"
        " WHERE business_id = $1 ORDER BY position",
        business_id,
    )
    return Flow(
        business_id=bid,
        version=version,
        templates=tuple(
            Template(
                template_id=str(r["template_id"]),
                business_id=bid,
                name=r["name"],
                type=TemplateType(r["type"]),
                content=r["content"],
                system_prompt=r["system_prompt"],
                variables=tuple(r["variables"]),
                version=r["version"],
            )
            for r in templates
        ),
        stages=tuple(
            Stage(
                stage_id=str(r["stage_id"]),
                business_id=bid,
                name=r["name"],
                description=r["description"],
                is_entry=r["is_entry"],
                selection_template_id=_opt_id(r["selection_template_id"]),
                extraction_template_id=_opt_id(r["extraction_template_id"]),
                response_template_id=_opt_id(r["response_template_id"]),
            )
            for r in stages
        ),
        transitions=tuple(
            Transition(
                transition_id=str(r["transition_id"]),
                business_id=bid,
                from_stage_id=str(r["from_stage_id"]),
                to_stage_id=str(r["to_stage_id"]),
                condition=r["condition"],
                priority=r["priority"],
            )
            for r in transitions
        ),
        rules=tuple(
            ExtractionRule(
                rule_id=str(r["rule_id"]),
                business_id=bid,
                stage_id=_opt_id(r["stage_id"]),
                field=r["field"],
                kind=ExtractorKind(r["kind"]),
                pattern=r["pattern"],
                field_type=FieldType(r["field_type"]),
                validator=r["validator"],
            )
            for r in rules
        ),
    )


async def write_flow(c: asyncpg.Connection, business_id: uuid.UUID, flow: Flow) -> None:
    """Replace every flow row of the business (inside the caller's transaction). Templates bump
    their version when their content changed."""
    old_templates = {
        str(r["template_id"]): (r["content"], r["system_prompt"], r["version"])
        for r in await c.fetch(
            "SELECT template_id, content, system_prompt, version FROM templates WHERE business_id = $1",
            business_id,
        )
    }
    await c.execute("DELETE FROM extraction_rules WHERE business_id = $1", business_id)
    await c.execute("DELETE FROM stage_transitions WHERE business_id = $1", business_id)
    await c.execute("DELETE FROM stages WHERE business_id = $1", business_id)
    await c.execute("DELETE FROM templates WHERE business_id = $1", business_id)
    await c.executemany(
        "INSERT INTO templates (template_id, business_id, name, type, content, system_prompt, variables, version,"
        " position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                _uuid(t.template_id),
                business_id,
                t.name,
                t.type.value,
                t.content,
                t.system_prompt,
                list(t.variables),
                _template_version(t, old_templates.get(t.template_id)),
                position,
            )
            for position, t in enumerate(flow.templates)
        ],
    )
    await c.executemany(
        "INSERT INTO stages (stage_id, business_id, name, description, is_entry, selection_template_id,"
        " extraction_template_id, response_template_id, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                _uuid(s.stage_id),
                business_id,
                s.name,
                s.description,
                s.is_entry,
                _uuid(s.selection_template_id) if s.selection_template_id else None,
                _uuid(s.extraction_template_id) if s.extraction_template_id else None,
                _uuid(s.response_template_id) if s.response_template_id else None,
                position,
            )
            for position, s in enumerate(flow.stages)
        ],
    )
    await c.executemany(
        "INSERT INTO stage_transitions (transition_id, business_id, from_stage_id, to_stage_id, condition,"
        " priority, position) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [
            (
                _uuid(t.transition_id),
                business_id,
                _uuid(t.from_stage_id),
                _uuid(t.to_stage_id),
                t.condition,
                t.priority,
                position,
            )
            for position, t in enumerate(flow.transitions)
        ],
    )
    await c.executemany(
        "INSERT INTO extraction_rules (rule_id, business_id, stage_id, field, kind, pattern, field_type,"
        " validator, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        [
            (
                _uuid(r.rule_id),
                business_id,
                _uuid(r.stage_id) if r.stage_id else None,
                r.field,
                r.kind.value,
                r.pattern,
                r.field_type.value,
                r.validator,
                position,
            )
            for position, r in enumerate(flow.rules)
        ],
    )


def _template_version(template: Template, old: tuple[str, str, int] | None) -> int:
    if old is None:
        return 1
    content, system_prompt, version = old
    return version if (content, system_prompt) == (template.content, template.system_prompt) else version + 1


def _opt_id(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None
