"""Data extraction: regex rules at no model cost, and the JSON schema and parsing for model rules.

Every function here reports failures as error texts beside what it did extract; a bad rule or a
bad value never raises out of an extraction (the turn goes on without that field). Error texts
name the rule or field and the problem, not the user's text.

Stored data is a JSON object `{field: {"value": ..., "extractor": ..., "source_message_id": ...}}`;
`merge_extracted` updates it and `plain_values` gives `{field: value}` for conditions and templates.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema

from core.errors import DataExtractionError
from core.flow_models import ExtractedField, ExtractionRule, ExtractorKind, FieldType
from core.patterns import (
    EMAIL_DOMAIN,
    EMAIL_LOCAL,
    MAX_MATCH_CHARS,
    PatternError,
    built_in,
    compile_pattern,
    fullmatch,
    search_built_in,
)

_EMAIL_FULL = re.compile(rf"{EMAIL_LOCAL}@{EMAIL_DOMAIN}")

_PHONE_CHARS = re.compile(r"\+?[\d\s().-]+")
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_ORDINAL = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)\b", re.IGNORECASE)
_AMBIGUOUS_DATE = re.compile(r"\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}")
_DATE_FORMATS = ("%Y/%m/%d", "%d %b %Y", "%d %B %Y", "%b %d %Y", "%B %d %Y")
_JSON_TYPES = {
    FieldType.EMAIL: "string",
    FieldType.PHONE: "string",
    FieldType.NUMBER: "number",
    FieldType.DATE: "string",
    FieldType.TEXT: "string",
}
_DESCRIPTIONS = {
    FieldType.EMAIL: "an email address",
    FieldType.PHONE: "a phone number, digits with an optional leading +",
    FieldType.NUMBER: "a number",
    FieldType.DATE: "a date as YYYY-MM-DD",
    FieldType.TEXT: "text",
}


def default_pattern(field_type: FieldType) -> str | None:
    """The built-in regex for a field type (EMAIL and PHONE only): a PATTERN rule may omit its own."""
    return built_in(field_type)


def normalise(field_type: FieldType, raw: Any) -> Any:
    """The canonical value of `raw` for `field_type`; raise `DataExtractionError` if it is invalid."""
    if field_type is FieldType.NUMBER:
        return _number(raw)
    if not isinstance(raw, str):
        raise DataExtractionError(f"expected text for a {field_type} field, got {type(raw).__name__}")
    text = raw.strip()
    if field_type is FieldType.EMAIL:
        return _email(text)
    if field_type is FieldType.PHONE:
        return _phone(text)
    if field_type is FieldType.DATE:
        return _date(text)
    if not text:
        raise DataExtractionError("text is empty")
    return text


def _email(text: str) -> str:
    if len(text) > 254 or not _EMAIL_FULL.fullmatch(text):
        raise DataExtractionError("not a valid email address")
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}"


def _phone(text: str) -> str:
    if not _PHONE_CHARS.fullmatch(text):
        raise DataExtractionError("a phone number may hold only digits, spaces, ().- and a leading +")
    digits = re.sub(r"\D", "", text)
    if not 7 <= len(digits) <= 15:
        raise DataExtractionError(f"a phone number has 7 to 15 digits, not {len(digits)}")
    return f"+{digits}" if text.startswith("+") else digits


def _number(raw: Any) -> int | float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise DataExtractionError(f"expected a number, got {type(raw).__name__}")
    if isinstance(raw, str):
        text = raw.strip()
        if not _NUMBER.fullmatch(text):
            raise DataExtractionError("not a number (digits, optional thousands commas and a decimal point)")
        raw = text.replace(",", "")
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise DataExtractionError("not a number") from exc
    if not value.is_finite():
        raise DataExtractionError("not a finite number")
    return int(value) if value == value.to_integral_value() else float(value)


def _date(text: str) -> str:
    if _AMBIGUOUS_DATE.fullmatch(text):
        raise DataExtractionError("ambiguous date (day and month order unknown); use YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    cleaned = " ".join(_ORDINAL.sub(r"\1", text).replace(",", " ").replace(".", " ").split())
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(cleaned, fmt).date().isoformat()
        except ValueError:
            continue
    raise DataExtractionError("not a date (use YYYY-MM-DD, '25 Nov 2026' or 'November 25, 2026')")


def _validated(rule: ExtractionRule, raw: Any) -> Any:
    """`raw` normalised and checked against the rule's validator; raise naming the problem."""
    value = normalise(rule.field_type, raw)
    if rule.validator is not None:
        try:
            matches = fullmatch(rule.validator, str(value))
        except PatternError as exc:
            raise DataExtractionError(f"validator {exc}") from exc
        if not matches:
            raise DataExtractionError("value does not match the rule's validator")
    return value


def _matched_text(match: Any, field: str) -> str | None:
    groups = match.groupdict()
    for name in ("value", field):
        if groups.get(name) is not None:
            return str(groups[name])
    return str(match.group(0))


def extract_with_patterns(
    rules: Sequence[ExtractionRule], message: str, *, message_id: str | None
) -> tuple[dict[str, ExtractedField], list[str]]:
    """Apply the PATTERN rules, in order, to `message`: (fields extracted, error texts).

    The first rule that yields a valid value for a field wins; a rule whose match is invalid
    (by type or validator) is reported and the next rule for that field is tried. Patterns run
    on RE2 (`core.patterns`), in time linear in the message.
    """
    found: dict[str, ExtractedField] = {}
    errors: list[str] = []
    for rule in rules:
        if rule.kind is not ExtractorKind.PATTERN or rule.field in found:
            continue
        try:
            raw = _search(rule, message)
        except PatternError as exc:
            errors.append(f"rule {rule.rule_id!r} ({rule.field}): pattern {exc}")
            continue
        except DataExtractionError as exc:
            errors.append(f"rule {rule.rule_id!r} ({rule.field}): {exc.message}")
            continue
        if raw is None:
            continue
        try:
            value = _validated(rule, raw)
        except DataExtractionError as exc:
            errors.append(f"rule {rule.rule_id!r} ({rule.field}): {exc.message}")
            continue
        found[rule.field] = ExtractedField(value, f"pattern:{rule.rule_id}", message_id)
    return found, errors


def _search(rule: ExtractionRule, message: str) -> str | None:
    """What the rule's pattern (or the built-in one) finds in the message; None: nothing."""
    if rule.pattern is None:
        if built_in(rule.field_type) is None:
            raise DataExtractionError(f"no pattern, and none built in for {rule.field_type}")
        return search_built_in(rule.field_type, message)
    program = compile_pattern(rule.pattern)
    match = program.search(message[:MAX_MATCH_CHARS])
    return None if match is None else _matched_text(match, rule.field)


def _llm_rules(rules: Sequence[ExtractionRule]) -> dict[str, ExtractionRule]:
    """The LLM rules by field; the first rule for a field wins."""
    by_field: dict[str, ExtractionRule] = {}
    for rule in rules:
        if rule.kind is ExtractorKind.LLM:
            by_field.setdefault(rule.field, rule)
    return by_field


def llm_schema(rules: Sequence[ExtractionRule]) -> dict[str, Any]:
    """A strict JSON schema for the LLM rules' fields: all required, each nullable, nothing else."""
    by_field = _llm_rules(rules)
    properties = {
        field: {
            "type": [_JSON_TYPES[rule.field_type], "null"],
            "description": f"{_DESCRIPTIONS[rule.field_type]}, or null if the message does not say",
        }
        for field, rule in by_field.items()
    }
    return {
        "type": "object",
        "properties": properties,
        "required": list(by_field),
        "additionalProperties": False,
    }


def _unfenced(text: str) -> str:
    """The JSON inside a ```json fenced block, if the model wrapped its answer in one."""
    stripped = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", stripped, re.DOTALL | re.IGNORECASE)
    return fenced.group(1) if fenced else stripped


def _schema_problem(error: jsonschema.ValidationError) -> str:
    where = f"field {error.path[0]!r}" if error.path else "answer"
    if error.validator == "type":
        expected = error.validator_value
        expected_text = " or ".join(expected) if isinstance(expected, list) else str(expected)
        return f"{where}: expected {expected_text}, got {type(error.instance).__name__}"
    return f"{where}: {error.message}"[:300]


def parse_llm_extraction(
    text: str, rules: Sequence[ExtractionRule], *, message_id: str | None, template_name: str
) -> tuple[dict[str, ExtractedField], list[str]]:
    """The model's JSON answer as extracted fields, and error texts for what was wrong.

    Checked against `llm_schema(rules)`: a field that violates it is dropped and reported, the
    others are kept; null means "not stated" and is skipped; values are normalised by type.
    """
    try:
        answer = json.loads(_unfenced(text))
    except (ValueError, RecursionError) as exc:
        return {}, [f"extraction answer is not JSON: {exc}"]
    if not isinstance(answer, dict):
        return {}, [f"extraction answer is a JSON {type(answer).__name__}, not an object"]
    schema = llm_schema(rules)
    errors: list[str] = []
    rejected: set[str] = set()
    for error in jsonschema.Draft202012Validator(schema).iter_errors(answer):
        errors.append(_schema_problem(error))
        if error.path:
            rejected.add(str(error.path[0]))
    found: dict[str, ExtractedField] = {}
    for field, rule in _llm_rules(rules).items():
        raw = answer.get(field)
        if field in rejected or raw is None:
            continue
        try:
            value = _validated(rule, raw)
        except DataExtractionError as exc:
            errors.append(f"field {field!r}: {exc.message}")
            continue
        found[field] = ExtractedField(value, f"llm:{template_name}", message_id)
    return found, errors


def merge_extracted(existing: Mapping[str, Any], new: Mapping[str, ExtractedField]) -> dict[str, Any]:
    """The stored data with `new` values replacing old ones per field, as a JSON-ready dict."""
    merged: dict[str, Any] = {
        field: dict(entry) if isinstance(entry, Mapping) else entry for field, entry in existing.items()
    }
    for field, extracted in new.items():
        merged[field] = {
            "value": extracted.value,
            "extractor": extracted.extractor,
            "source_message_id": extracted.source_message_id,
        }
    return merged


def plain_values(stored: Mapping[str, Any]) -> dict[str, Any]:
    """`{field: value}` from stored data (entries not shaped `{"value": ...}` are left out)."""
    return {
        field: entry["value"]
        for field, entry in stored.items()
        if isinstance(entry, Mapping) and "value" in entry
    }
