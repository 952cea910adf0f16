"""Data extraction: typed values, regex rules, the model's JSON answer, and stored data."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.errors import DataExtractionError
from core.extraction import (
    default_pattern,
    extract_with_patterns,
    llm_schema,
    merge_extracted,
    normalise,
    parse_llm_extraction,
    plain_values,
)
from core.flow_models import ExtractedField, ExtractionRule, ExtractorKind, FieldType
from core.types import BusinessId

BIZ = BusinessId("biz-1")


def pattern_rule(rule_id: str, field: str, pattern: str | None = None, **kwargs: Any) -> ExtractionRule:
    return ExtractionRule(rule_id, BIZ, field, ExtractorKind.PATTERN, pattern=pattern, **kwargs)


def llm_rule(
    rule_id: str, field: str, field_type: FieldType = FieldType.TEXT, **kwargs: Any
) -> ExtractionRule:
    return ExtractionRule(rule_id, BIZ, field, ExtractorKind.LLM, field_type=field_type, **kwargs)


# --- normalise -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field_type", "raw", "expected"),
    [
        (FieldType.EMAIL, " First.Last+tag@Example.COM ", "First.Last+tag@example.com"),
        (FieldType.PHONE, "+49 (151) 123-45.678", "+4915112345678"),
        (FieldType.PHONE, "030 1234567", "0301234567"),
        (FieldType.NUMBER, "1,234.5", 1234.5),
        (FieldType.NUMBER, "42", 42),
        (FieldType.NUMBER, "12.0", 12),
        (FieldType.NUMBER, "-3.25", -3.25),
        (FieldType.NUMBER, 7, 7),
        (FieldType.NUMBER, 2.0, 2),
        (FieldType.NUMBER, 2.5, 2.5),
        (FieldType.DATE, "2026-11-25", "2026-11-25"),
        (FieldType.DATE, "25 Nov 2026", "2026-11-25"),
        (FieldType.DATE, "25 November 2026", "2026-11-25"),
        (FieldType.DATE, "November 25, 2026", "2026-11-25"),
        (FieldType.DATE, "Nov. 25th, 2026", "2026-11-25"),
        (FieldType.DATE, "2026/11/25", "2026-11-25"),
        (FieldType.TEXT, "  a table by the window ", "a table by the window"),
    ],
)
def test_normalise_gives_the_canonical_value(field_type: FieldType, raw: Any, expected: Any) -> None:
    value = normalise(field_type, raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("field_type", "raw", "problem"),
    [
        (FieldType.EMAIL, "guest@", "not a valid email address"),
        (FieldType.EMAIL, "guest@example", "not a valid email address"),
        (FieldType.EMAIL, "first..last@example.com", "not a valid email address"),
        (FieldType.EMAIL, "first last@example.com", "not a valid email address"),
        (FieldType.PHONE, "12345", "7 to 15 digits, not 5"),
        (FieldType.PHONE, "+1 234 567 890 123 456", "7 to 15 digits, not 16"),
        (FieldType.PHONE, "call 0301234567", "only digits"),
        (FieldType.PHONE, "030+1234567", "only digits"),
        (FieldType.NUMBER, "12 apples", "not a number"),
        (FieldType.NUMBER, "1,23", "not a number"),
        (FieldType.NUMBER, True, "expected a number, got bool"),
        (FieldType.NUMBER, float("nan"), "not a finite number"),
        (FieldType.DATE, "01/02/2026", "ambiguous date"),
        (FieldType.DATE, "25.11.2026", "ambiguous date"),
        (FieldType.DATE, "2026-02-30", "not a date"),
        (FieldType.DATE, "next Tuesday", "not a date"),
        (FieldType.TEXT, "   ", "text is empty"),
        (FieldType.TEXT, 5, "expected text for a text field, got int"),
    ],
)
def test_normalise_refuses_invalid_input(field_type: FieldType, raw: Any, problem: str) -> None:
    with pytest.raises(DataExtractionError, match=problem):
        normalise(field_type, raw)


def test_default_patterns_exist_only_for_email_and_phone() -> None:
    assert default_pattern(FieldType.EMAIL) is not None
    assert default_pattern(FieldType.PHONE) is not None
    assert [default_pattern(t) for t in (FieldType.NUMBER, FieldType.DATE, FieldType.TEXT)] == [None] * 3


# --- pattern rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field_type", "message", "expected"),
    [
        (FieldType.EMAIL, "Mail me at guest@Example.com, thanks", "guest@example.com"),
        (FieldType.PHONE, "call +44 20 7946 0958 after six", "+442079460958"),
        (FieldType.PHONE, "my number is (555) 123-4567.", "5551234567"),
    ],
)
def test_built_in_patterns_find_emails_and_phones(field_type: FieldType, message: str, expected: str) -> None:
    rules = [pattern_rule("r1", "contact", field_type=field_type)]
    found, errors = extract_with_patterns(rules, message, message_id="m1")
    assert errors == []
    assert found == {"contact": ExtractedField(expected, "pattern:r1", "m1")}


@pytest.mark.parametrize(
    "message", ["we arrive 2026-11-25", "on 25.11.2026", "order 12345", "no number here"]
)
def test_the_phone_pattern_leaves_dates_and_short_numbers_alone(message: str) -> None:
    rules = [pattern_rule("r1", "phone", field_type=FieldType.PHONE)]
    assert extract_with_patterns(rules, message, message_id=None) == ({}, [])


def test_the_value_group_then_the_field_group_then_the_whole_match() -> None:
    rules = [
        pattern_rule("r1", "guests", r"for (?P<value>\d+) (?P<unit>people)", field_type=FieldType.NUMBER),
        pattern_rule("r2", "day", r"on (?P<day>\d{4}-\d{2}-\d{2})", field_type=FieldType.DATE),
        pattern_rule("r3", "code", r"[A-Z]{3}-\d{3}"),
    ]
    found, errors = extract_with_patterns(
        rules, "A table for 4 people on 2026-11-25, ref ABC-123", message_id="m9"
    )
    assert errors == []
    assert found == {
        "guests": ExtractedField(4, "pattern:r1", "m9"),
        "day": ExtractedField("2026-11-25", "pattern:r2", "m9"),
        "code": ExtractedField("ABC-123", "pattern:r3", "m9"),
    }


def test_numbers_and_dates_are_normalised() -> None:
    rules = [
        pattern_rule("r1", "budget", r"budget (?P<value>[\d,.]+)", field_type=FieldType.NUMBER),
        pattern_rule("r2", "day", r"on (?P<value>\w+ \d+, \d{4})", field_type=FieldType.DATE),
    ]
    found, _ = extract_with_patterns(rules, "budget 1,234.5 on November 25, 2026", message_id=None)
    assert plain_values(merge_extracted({}, found)) == {"budget": 1234.5, "day": "2026-11-25"}


def test_the_first_matching_rule_for_a_field_wins() -> None:
    rules = [
        pattern_rule("first", "size", r"(?P<value>\d+) people", field_type=FieldType.NUMBER),
        pattern_rule("second", "size", r"(?P<value>\d+)", field_type=FieldType.NUMBER),
    ]
    found, _ = extract_with_patterns(rules, "room 12 for 3 people", message_id=None)
    assert found["size"] == ExtractedField(3, "pattern:first", None)
    found, _ = extract_with_patterns(rules, "room 12", message_id=None)
    assert found["size"] == ExtractedField(12, "pattern:second", None)


def test_a_validator_must_match_the_normalised_value_in_full() -> None:
    rules = [pattern_rule("r1", "zip", r"zip (?P<value>\S+)", validator=r"\d{5}")]
    assert extract_with_patterns(rules, "zip 12345", message_id=None)[0]["zip"].value == "12345"
    found, errors = extract_with_patterns(rules, "zip 123456", message_id=None)
    assert found == {}
    assert errors == ["rule 'r1' (zip): value does not match the rule's validator"]


def test_an_invalid_value_is_reported_and_the_next_rule_may_still_match() -> None:
    rules = [
        pattern_rule("strict", "day", r"on (?P<value>\S+)", field_type=FieldType.DATE),
        pattern_rule("iso", "day", r"\d{4}-\d{2}-\d{2}", field_type=FieldType.DATE),
    ]
    found, errors = extract_with_patterns(rules, "on 01/02/2026 or 2026-02-03", message_id=None)
    assert found["day"].value == "2026-02-03"
    assert errors == ["rule 'strict' (day): ambiguous date (day and month order unknown); use YYYY-MM-DD"]


def test_bad_regexes_are_reported_not_raised() -> None:
    rules = [
        pattern_rule("bad", "a", "(unclosed"),
        pattern_rule("bad-validator", "b", r"\w+", validator="[z-a]"),
        pattern_rule("no-pattern", "c", field_type=FieldType.NUMBER),
        pattern_rule("good", "d", r"\d+", field_type=FieldType.NUMBER),
    ]
    found, errors = extract_with_patterns(rules, "hello 5", message_id=None)
    assert found == {"d": ExtractedField(5, "pattern:good", None)}
    assert errors[0].startswith("rule 'bad' (a): pattern does not compile: missing )")
    assert errors[1].startswith(
        "rule 'bad-validator' (b): validator does not compile: invalid character class range: z-a"
    )
    assert errors[2] == "rule 'no-pattern' (c): no pattern, and none built in for number"
    assert len(errors) == 3


def test_llm_rules_are_ignored_by_pattern_extraction() -> None:
    assert extract_with_patterns([llm_rule("r1", "need")], "anything", message_id=None) == ({}, [])


# --- model rules -----------------------------------------------------------------------------

LLM_RULES = [
    llm_rule("r1", "name"),
    llm_rule("r2", "guests", FieldType.NUMBER),
    llm_rule("r3", "day", FieldType.DATE),
    llm_rule("r4", "email", FieldType.EMAIL),
    pattern_rule("p1", "phone", field_type=FieldType.PHONE),
]


def test_llm_schema_is_strict_and_nullable() -> None:
    """Every LLM field is required and nullable, typed by field type; nothing else is allowed."""
    schema = llm_schema(LLM_RULES)
    assert schema["type"] == "object"
    assert schema["required"] == ["name", "guests", "day", "email"]
    assert schema["additionalProperties"] is False
    assert {field: spec["type"] for field, spec in schema["properties"].items()} == {
        "name": ["string", "null"],
        "guests": ["number", "null"],
        "day": ["string", "null"],
        "email": ["string", "null"],
    }
    assert "YYYY-MM-DD" in schema["properties"]["day"]["description"]
    json.dumps(schema)


def test_llm_schema_takes_the_first_rule_per_field() -> None:
    schema = llm_schema([llm_rule("a", "x", FieldType.NUMBER), llm_rule("b", "x", FieldType.TEXT)])
    assert schema["required"] == ["x"]
    assert schema["properties"]["x"]["type"] == ["number", "null"]


def test_parse_llm_extraction_with_good_json() -> None:
    answer = json.dumps({"name": " Guest ", "guests": 4, "day": "25 Nov 2026", "email": "guest@Example.com"})
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id="m2", template_name="booking")
    assert errors == []
    assert found == {
        "name": ExtractedField("Guest", "llm:booking", "m2"),
        "guests": ExtractedField(4, "llm:booking", "m2"),
        "day": ExtractedField("2026-11-25", "llm:booking", "m2"),
        "email": ExtractedField("guest@example.com", "llm:booking", "m2"),
    }


def test_null_values_are_skipped_without_error() -> None:
    answer = '{"name": null, "guests": null, "day": null, "email": "a@b.co"}'
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id=None, template_name="t")
    assert errors == []
    assert list(found) == ["email"]


def test_a_fenced_json_answer_is_accepted() -> None:
    answer = '```json\n{"name": "Guest", "guests": null, "day": null, "email": null}\n```'
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id=None, template_name="t")
    assert (list(found), errors) == (["name"], [])


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("not json at all", "extraction answer is not JSON: Expecting value"),
        ('{"name": "Guest",', "extraction answer is not JSON"),
        ('["Guest"]', "extraction answer is a JSON list, not an object"),
    ],
)
def test_invalid_json_is_reported_not_raised(answer: str, problem: str) -> None:
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id=None, template_name="t")
    assert found == {}
    assert len(errors) == 1
    assert errors[0].startswith(problem)


def test_schema_violations_drop_the_field_and_keep_the_rest() -> None:
    """A wrong type drops that field; a missing or extra field is reported; valid fields are kept."""
    answer = json.dumps({"name": "Guest", "guests": "four", "day": "2026-11-25", "extra": 1})
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id=None, template_name="t")
    assert sorted(found) == ["day", "name"]
    assert sorted(errors) == [
        "answer: 'email' is a required property",
        "answer: Additional properties are not allowed ('extra' was unexpected)",
        "field 'guests': expected number or null, got str",
    ]


def test_invalid_values_are_reported_by_field() -> None:
    answer = json.dumps({"name": "  ", "guests": 2, "day": "03/04/2026", "email": "nope"})
    found, errors = parse_llm_extraction(answer, LLM_RULES, message_id=None, template_name="t")
    assert list(found) == ["guests"]
    assert errors == [
        "field 'name': text is empty",
        "field 'day': ambiguous date (day and month order unknown); use YYYY-MM-DD",
        "field 'email': not a valid email address",
    ]


def test_llm_values_go_through_the_rule_validator() -> None:
    rules = [llm_rule("r1", "zip", validator=r"\d{5}")]
    found, errors = parse_llm_extraction('{"zip": "1234"}', rules, message_id=None, template_name="t")
    assert (found, errors) == ({}, ["field 'zip': value does not match the rule's validator"])


# --- stored data -----------------------------------------------------------------------------


def test_merge_keeps_source_and_extractor_and_new_replaces_old() -> None:
    stored = {
        "email": {"value": "old@example.com", "extractor": "pattern:r1", "source_message_id": "m1"},
        "name": {"value": "Guest", "extractor": "llm:t", "source_message_id": "m1"},
    }
    merged = merge_extracted(
        stored,
        {
            "email": ExtractedField("new@example.com", "llm:booking", "m5"),
            "guests": ExtractedField(4, "pattern:r2", None),
        },
    )
    assert merged == {
        "email": {"value": "new@example.com", "extractor": "llm:booking", "source_message_id": "m5"},
        "name": {"value": "Guest", "extractor": "llm:t", "source_message_id": "m1"},
        "guests": {"value": 4, "extractor": "pattern:r2", "source_message_id": None},
    }
    assert stored["email"]["value"] == "old@example.com"  # the input is not changed
    assert json.loads(json.dumps(merged)) == merged
    assert plain_values(merged) == {"email": "new@example.com", "name": "Guest", "guests": 4}


def test_plain_values_skips_entries_of_another_shape() -> None:
    assert plain_values({"a": {"value": 1}, "b": "loose", "c": {"other": 2}}) == {"a": 1}
