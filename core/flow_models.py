"""The records of a business's conversation flow: stages, transitions, templates, extraction rules.

Plain, immutable data. The rules that use them live in core/conditions.py, core/flow.py and
core/extraction.py; the store keeps them; the admin API edits them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.types import BusinessId


class TemplateType(enum.StrEnum):
    STAGE_SELECTION = "stage_selection"
    DATA_EXTRACTION = "data_extraction"
    RESPONSE_GENERATION = "response_generation"


class FieldType(enum.StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    NUMBER = "number"
    DATE = "date"
    TEXT = "text"


class ExtractorKind(enum.StrEnum):
    PATTERN = "pattern"  # a regex with named groups, at no model cost
    LLM = "llm"  # asked of the model, with a JSON schema


@dataclass(frozen=True, slots=True)
class Template:
    template_id: str
    business_id: BusinessId
    name: str
    type: TemplateType
    content: str
    system_prompt: str = ""
    variables: tuple[str, ...] = ()
    """Variables the template declares; rendering without one of them is an error naming it."""
    version: int = 1


@dataclass(frozen=True, slots=True)
class Stage:
    stage_id: str
    business_id: BusinessId
    name: str
    description: str = ""
    is_entry: bool = False
    selection_template_id: str | None = None
    """When set, the model picks the next stage among the allowed ones, with this template."""
    extraction_template_id: str | None = None
    """When set, the model extracts this stage's LLM fields, with this template."""
    response_template_id: str | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    transition_id: str
    business_id: BusinessId
    from_stage_id: str
    to_stage_id: str
    condition: str | None = None
    """A safe expression (see core/conditions.py); None means always."""
    priority: int = 0
    """Higher first; ties in creation order."""


@dataclass(frozen=True, slots=True)
class ExtractionRule:
    rule_id: str
    business_id: BusinessId
    field: str
    kind: ExtractorKind
    field_type: FieldType = FieldType.TEXT
    stage_id: str | None = None
    """The stage it applies in; None: every stage."""
    pattern: str | None = None
    """For PATTERN rules: a regex; the named group `value` (or the field's name, or the whole
    match) is the value."""
    validator: str | None = None
    """Optional regex the normalised value must match in full."""


@dataclass(frozen=True, slots=True)
class Flow:
    """A business's whole flow configuration, as one snapshot."""

    business_id: BusinessId
    stages: tuple[Stage, ...] = ()
    transitions: tuple[Transition, ...] = ()
    templates: tuple[Template, ...] = ()
    rules: tuple[ExtractionRule, ...] = ()
    version: int = 1

    def owners(self) -> set[BusinessId]:
        """The businesses the records name (a consistent flow names only its own)."""
        records: tuple[Stage | Transition | Template | ExtractionRule, ...] = (
            *self.stages,
            *self.transitions,
            *self.templates,
            *self.rules,
        )
        return {record.business_id for record in records}


@dataclass(frozen=True, slots=True)
class ExtractedField:
    """One extracted value, with where it came from."""

    value: Any
    extractor: str  # "pattern:<rule_id>" or "llm:<template name>"
    source_message_id: str | None


ExtractedData = Mapping[str, ExtractedField]


@dataclass(frozen=True, slots=True)
class FlowContext:
    """What conditions and templates see of a conversation at one message."""

    message: str
    stage: str
    data: Mapping[str, Any] = field(default_factory=dict)
    """Extracted values by field (plain values, not ExtractedField)."""
    turns: int = 0
    """User messages in the conversation so far, this one included."""
    turns_in_stage: int = 0
    """User messages since the conversation entered its current stage, this one included."""
