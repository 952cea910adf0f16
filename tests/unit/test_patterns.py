"""Admins' regular expressions on RE2: linear time, refused features named, inputs bounded, and the
built-in email and phone patterns written for RE2."""

from __future__ import annotations

import pytest

from core.extraction import extract_with_patterns
from core.flow_models import ExtractedField, ExtractionRule, ExtractorKind, FieldType
from core.patterns import (
    MAX_MATCH_CHARS,
    MAX_PATTERN_CHARS,
    PatternError,
    built_in,
    compile_pattern,
    fullmatch,
    pattern_problem,
    search,
    search_built_in,
)
from core.types import BusinessId


def pattern_rule(
    field: str, pattern: str | None = None, field_type: FieldType = FieldType.TEXT
) -> ExtractionRule:
    return ExtractionRule(
        f"r-{field}", BusinessId("biz-1"), field, ExtractorKind.PATTERN, field_type, pattern=pattern
    )


@pytest.mark.parametrize("field_type", [FieldType.EMAIL, FieldType.PHONE])
def test_the_built_in_patterns_compile_in_re2(field_type: FieldType) -> None:
    pattern = built_in(field_type)
    assert pattern is not None
    assert pattern_problem(pattern) is None
    assert compile_pattern(pattern).groupindex["value"] == 1


@pytest.mark.parametrize("length", [26, 60, 10_000])
def test_a_catastrophic_backtracking_pattern_runs_in_linear_time(length: int) -> None:
    """On Python's `re` this pattern and 26 a's and a `!` took 6.8 s, and each further a doubles
    it: 60 would not finish in this test's lifetime. RE2 answers at once."""
    assert search("(a+)+$", "a" * length + "!") is None
    assert search("(a+)+$", "a" * length) is not None
    found, errors = extract_with_patterns(
        [pattern_rule("shout", "(a+)+$")], "a" * length + "!", message_id=None
    )
    assert (found, errors) == ({}, [])


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (
            r"(a)\1",
            "does not compile: backreferences are not supported (patterns run on RE2, in linear time)",
        ),
        (r"(?P<x>a)(?P=x)", "does not compile: backreferences are not supported"),
        (r"foo(?=bar)", "does not compile: lookahead are not supported"),
        (r"foo(?!bar)", "does not compile: lookahead are not supported"),
        (r"(?<=\$)\d+", "does not compile: lookbehind are not supported"),
        (r"(?<!\w)\d+", "does not compile: lookbehind are not supported"),
        (r"(?>a+)", "does not compile: atomic groups are not supported"),
        ("(unclosed", "does not compile: missing ): (unclosed (RE2 syntax)"),
        ("a{1001}", "does not compile: invalid repetition size: {1001} (RE2 syntax)"),
        (
            "a" * (MAX_PATTERN_CHARS + 1),
            f"is {MAX_PATTERN_CHARS + 1} characters long; the maximum is {MAX_PATTERN_CHARS}",
        ),
    ],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_problem(pattern: str, problem: str) -> None:
    assert pattern_problem(pattern) is not None
    assert problem in (pattern_problem(pattern) or "")
    with pytest.raises(PatternError):
        compile_pattern(pattern)


def test_a_pattern_whose_program_is_too_large_is_refused() -> None:
    problem = pattern_problem(r"((((\w{1,100}){1,100}){1,100}){1,100})")
    assert problem is not None
    assert "does not compile" in problem


def test_a_pattern_searches_only_the_first_max_match_chars() -> None:
    text = "x" * MAX_MATCH_CHARS + " code ABC-123"
    assert search(r"[A-Z]{3}-\d{3}", text) is None
    assert search(r"[A-Z]{3}-\d{3}", text[-20:]) is not None


def test_a_validator_refuses_a_value_longer_than_max_match_chars() -> None:
    assert fullmatch(r"x+", "x" * MAX_MATCH_CHARS)
    assert not fullmatch(r"x+", "x" * (MAX_MATCH_CHARS + 1))


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Mail me at guest@Example.com, thanks", "guest@Example.com"),
        ("guest@example.com", "guest@example.com"),
        ("(guest@example.com)", "guest@example.com"),
        ("not.an.address@example", None),
        ("a-b@c.de-x", None),
        ("éguest@example.com", None),  # inside a word of another script: as Python's \w said
        ("guest@example.comé", None),
    ],
)
def test_the_built_in_email_pattern_keeps_its_boundaries(message: str, expected: str | None) -> None:
    assert search_built_in(FieldType.EMAIL, message) == expected


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("call +44 20 7946 0958 after six", "+44 20 7946 0958"),
        ("my number is (555) 123-4567.", "(555) 123-4567"),
        ("we arrive 2026-11-25", None),
        ("on 25.11.2026", None),
        ("on 25.11.2026, call 555 123 4567", "555 123 4567"),
        ("order 12345", None),
        ("id x5551234567", None),
        ("5551234567x", None),
        ("call 030\u00a01234567", "030\u00a01234567"),
    ],
)
def test_the_built_in_phone_pattern_skips_dates_and_words(message: str, expected: str | None) -> None:
    assert search_built_in(FieldType.PHONE, message) == expected


def test_built_in_values_are_normalised_as_before() -> None:
    rules = [
        pattern_rule("phone", field_type=FieldType.PHONE),
        pattern_rule("email", field_type=FieldType.EMAIL),
    ]
    found, errors = extract_with_patterns(
        rules, "on 25.11.2026 ring +1 (555) 123-4567 or A@B.CO", message_id="m"
    )
    assert errors == []
    assert found == {
        "phone": ExtractedField("+15551234567", "pattern:r-phone", "m"),
        "email": ExtractedField("A@b.co", "pattern:r-email", "m"),
    }
