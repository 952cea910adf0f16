"""The template sandbox: variables in, no attribute access, no code, missing variables named."""

from __future__ import annotations

import sys

import pytest

from core.errors import TemplateError
from core.templates import MAX_TEMPLATE_CHARS, render, template_problems


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


# --- limits ------------------------------------------------------------------------------------

VARIABLES = {"message": "hi", "history": [{"role": "user", "text": "a"}, {"role": "assistant", "text": "b"}]}


def test_ordinary_templates_still_render() -> None:
    source = (
        "{% for m in history %}{{ m.role }}: {{ m.text }}\n{% endfor %}"
        "{{ message | upper | center(8) }}|{{ '%-4s' | format(message) }}|{{ (history | length) * 2 }}"
        "|{{ range(3) | join(',') }}|{{ message ~ '!' }}|{{ 2 ** 10 }}|{{ [1, 2] + [3] }}"
    )
    assert render(source, VARIABLES) == "user: a\nassistant: b\n   HI   |hi  |4|0,1,2|hi!|1024|[1, 2, 3]"


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        # The cases: a huge range (an OverflowError out of Jinja's own sandbox), nested
        # ranges that cost 1.5 s a message, a 50 MB output.
        ("{% for i in range(10**9) %}x{% endfor %}", "range() of 1000000000 numbers; the maximum is 1000"),
        (
            "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
            "(the limit)",  # the steps, or on a loaded machine the time: whichever runs out first
        ),
        ("{{ 'x' * 50000000 }}", "repeating a value 50000000 times; the result would be over 1000000"),
        ("{% for i in range(1000) %}{{ 'x' * 2000 }}{% endfor %}", "output over 1000000 characters"),
        # Other ways to build something huge in one step, refused before it is built.
        ("{{ 2 ** 100000 }}", "a number over 4096 bits"),
        ("{{ '%0999999999d' % 1 }}", "a % format width or precision over 1000"),
        ("{{ '%*d' | format(10**9, 1) }}", "a % format width or precision over 1000"),
        ("{{ message | center(10**9) }}", "center() width 1000000000; the maximum is 1000"),
        ("{{ message | indent(10**9) }}", "indent() width 1000000000"),
        ("{{ [1] | batch(10**8, 'x') | list }}", "batch() count 100000000"),
        ("{{ [1, 2] | slice(10**8) | list }}", "slice() count 100000000"),
        ("{{ [1, 2] | tojson(indent=10**8) }}", "tojson() indent 100000000; the maximum is 16"),
        ("{{ range(1000) | join('x' * 10000) }}", "join() would make"),
        ("{{ ('x' * 1000) | replace('', 'y' * 1000) }}", "replace() would make"),
        ("{{ ('x' * 100000) | wordwrap(1, wrapstring='y' * 10) }}", "wordwrap() would make"),
        # Doubling with ~ and with macros: stopped when a value gets too big, or by the steps.
        (
            "{% set a = 'x' * 10000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}"
            "{% set e = d ~ d %}{% set f = e ~ e %}{% set g = f ~ f %}{% set h = g ~ g %}"
            "{% set i = h ~ h %}{{ i | length }}",
            "a value built or printed of 1280000",
        ),
        # A list of many references to one big string prints as all of them: counted before str().
        ("{{ [message * 400000] * 3 }}", "repeating a value 3 times; the result would be over 1000000"),
        (
            "{% set a = message * 400000 %}{{ [a, a, a] }}",
            "a value built or printed of 1600004 items or characters; the maximum is 1000000",
        ),
        ("{% set a = message * 400000 %}{{ {'x': a, 'y': a, 'z': a} }}", "a value built or printed"),
        ("{% set a = message * 400000 %}{% set l = [a, a] %}{{ l | string }}", "a value built or printed"),
        ("{% set a = [message * 300000] %}{% set b = a + a %}{{ b | length }}", "the maximum is 1000000"),
        (  # 2**40 calls: whichever of the steps or the time runs out first stops it
            "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
            "(the limit)",
        ),
        (  # output gathered in a block or a macro, not streamed: counted before it is joined
            "{% set x %}{% for i in range(1000) %}{{ 'y' * 2000 }}{% endfor %}{% endset %}{{ x | length }}",
            "a block of 2000000 characters; the maximum is 1000000",
        ),
        (
            "{% macro m() %}{% for i in range(1000) %}{{ 'y' * 2000 }}{% endfor %}{% endmacro %}{{ m() | length }}",
            "a block of 2000000 characters",
        ),
        ("{% for c in message * 400 %}{% for d in message * 400 %}{% endfor %}{% endfor %}", "(the limit)"),
        # Failures of the template's own making are template errors, not crashes.
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
        ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
        ("{% set ns = namespace(x='ab') %}{% set ns.x = ns.x ~ ns.x %}{{ ns.x }}", "not allowed"),
    ],
)
def test_a_template_over_a_limit_fails_naming_it(source: str, problem: str) -> None:
    with pytest.raises(TemplateError) as raised:
        render(source, VARIABLES)
    assert problem in raised.value.message


def test_unpacking_and_literals_still_work() -> None:
    source = (
        "{% set a, b = 1, 2 %}{{ a + b }}|{% for k, v in {'x': 1} | items %}{{ k }}={{ v }}{% endfor %}"
        "|{% for x, y in [(1, 2), (3, 4)] %}{{ x * y }},{% endfor %}|{{ ('p', 'q') | join }}"
    )
    assert render(source, {}) == "3|x=1|2,12,|pq"


def test_the_steps_are_per_render() -> None:
    source = "{% for i in range(1000) %}{% for j in range(50) %}{% endfor %}{% endfor %}done"
    assert [render(source, {}) for _ in range(3)] == ["done"] * 3


@pytest.mark.parametrize(
    ("source", "problems"),
    [
        ("{{ message }}{% for i in range(5) %}{{ i }}{% endfor %}", []),
        ("{% for i in range(n * 10**9) %}{% endfor %}", []),  # not known until it renders
        (
            "line one\n{% for i in range(10**9) %}x{% endfor %}",
            ["line 2: range() of 1000000000 numbers; the maximum is 1000"],
        ),
        ("{{ range(1, 5000, 2) | list }}", ["line 1: range() of 2500 numbers; the maximum is 1000"]),
        (  # Jinja's ** groups to the left: (10**10)**10
            "{{ range(10**10**10) }}",
            [f"line 1: range() of more than {sys.maxsize} numbers; the maximum is 1000"],
        ),
        ("{{ range(2**5000) }}", []),  # too large to work out when saved: refused at render time
        (
            "{{ oops",
            ["syntax error on line 1: unexpected end of template, expected 'end of print statement'."],
        ),
        (
            "x" * (MAX_TEMPLATE_CHARS + 1),
            [f"is {MAX_TEMPLATE_CHARS + 1} characters long; the maximum is 20000"],
        ),
        (  # a chain parsed in a loop, but compiled (and walked) recursively
            "{{ " + " + ".join(["1"] * 4000) + " }}",
            ["nests too deeply to compile: fewer tags or brackets inside one another"],
        ),
        (
            "{% if 1 %}" * 600 + "{% endif %}" * 600,
            ["nests too deeply to compile: fewer tags or brackets inside one another"],
        ),
    ],
)
def test_what_is_known_before_rendering_is_reported_when_saved(source: str, problems: list[str]) -> None:
    assert template_problems(source) == problems


def test_a_range_too_large_to_work_out_fails_at_render_time() -> None:
    with pytest.raises(TemplateError, match="a number over 4096 bits"):
        render("{{ range(2**5000) }}", {})


def test_a_template_that_cannot_be_compiled_fails_its_render_too() -> None:
    with pytest.raises(TemplateError, match="nests too deeply to compile"):
        render("{{ " + " + ".join(["1"] * 4000) + " }}", {})
    with pytest.raises(TemplateError, match="characters long; the maximum is 20000"):
        render("x" * (MAX_TEMPLATE_CHARS + 1), {})
