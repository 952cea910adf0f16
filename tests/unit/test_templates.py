"""The template sandbox: variables in, no attribute access, no code, missing variables named."""

from __future__ import annotations

import pytest

from core.errors import TemplateError
from core.templates import render


def test_variables_and_filters_render() -> None:
    assert render("Hi {{ name | upper }}{% if vip %}!{% endif %}", {"name": "ann", "vip": True}) == "Hi ANN!"


def test_a_missing_variable_is_an_error_naming_it() -> None:
    with pytest.raises(TemplateError, match="'business_name' is undefined"):
        render("{{ business_name }}", {})


@pytest.mark.parametrize(
    "source",
    [
        "{{ message.__class__ }}",
        "{{ message.upper() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ message | attr('__class__') }}",
    ],
)
def test_attribute_access_is_refused(source: str) -> None:
    with pytest.raises(TemplateError):
        render(source, {"message": "x"})


def test_syntax_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="syntax error on line 1"):
        render("{{ unclosed", {})
