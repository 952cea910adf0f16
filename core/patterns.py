"""Regular expressions written by business admins (extraction patterns and validators), run on RE2.

RE2 matches in time linear in the input, whatever the pattern: `(a+)+$` cannot backtrack
exponentially on `aaaa...a!`, as it does on Python's `re`, because RE2 does not backtrack at all.
The price is the features that need backtracking: backreferences (`\\1`, `(?P=name)`) and
lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`) do not compile, and are refused when a flow is saved.
RE2's `\\w`, `\\d`, `\\s` and `\\b` are ASCII-only; `\\p{L}` and its kin match any script.

Limits: a pattern is at most `MAX_PATTERN_CHARS` long and its compiled form at most
`MAX_PATTERN_MEMORY` bytes; a pattern searches at most the first `MAX_MATCH_CHARS` characters of a
message, and a validator refuses a longer value.

The built-in email and phone patterns are written for RE2 too: what Python's lookarounds did
there is done by a consumed boundary character and, for phones, a date check in code.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import re2

from core.flow_models import FieldType

MAX_PATTERN_CHARS = 2000
MAX_PATTERN_MEMORY = 8 << 20
"""RE2's own default: a pattern whose program would need more does not compile."""
MAX_MATCH_CHARS = 20_000

# Local part and domain of a common address (no quoted local parts, no IP-literal domains).
EMAIL_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
EMAIL_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
# A letter, digit or underscore of any script: Python's `\w`, which RE2's ASCII `\w` is not.
_WORD = r"\p{L}\p{N}_"
_BUILT_IN: dict[FieldType, str] = {
    # Not inside a longer word or address: after the start or a character that cannot be in one,
    # and before the end or a character that cannot continue the domain.
    FieldType.EMAIL: rf"(?:^|[^{_WORD}.+-])(?P<value>{EMAIL_LOCAL}@{EMAIL_DOMAIN})(?:$|[^{_WORD}-])",
    # 7 to 15 digits, optionally after a +, with spaces, dots, dashes or brackets between them
    # (not after a letter, digit or +; not before a letter or digit). Date-shaped candidates
    # (2026-11-25, 25.11.2026) are skipped by `search_built_in`.
    FieldType.PHONE: (
        rf"(?:^|[^{_WORD}+])(?P<value>\+?\(?\d(?:[\s\pZ().-]{{0,2}}\d){{6,14}})(?:$|[^{_WORD}])"
    ),
}
# Trusted, fixed and anchored at one position: Python's `re` is safe here.
_DATE_SHAPED = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b")


class PatternError(ValueError):
    """A pattern RE2 cannot take; the message says why, for the admin."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is reported to the admin, not logged by RE2
    options.max_mem = MAX_PATTERN_MEMORY
    return options


_OPTIONS = _options()
_HINTS = (
    ("invalid escape sequence: \\1", "backreferences"),
    ("invalid escape sequence: \\2", "backreferences"),
    ("(?P=", "backreferences"),
    ("(?=", "lookahead"),
    ("(?!", "lookahead"),
    ("(?<=", "lookbehind"),
    ("(?<!", "lookbehind"),
    ("(?>", "atomic groups"),
)


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> Any:
    """The RE2 program of `pattern` (cached); raise `PatternError` naming the problem."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"is {len(pattern)} characters long; the maximum is {MAX_PATTERN_CHARS}")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else b""
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        hint = next((name for mark, name in _HINTS if mark in text or mark in pattern), None)
        if hint is not None:
            problem = f"{hint} are not supported (patterns run on RE2, in linear time)"
            raise PatternError(f"does not compile: {problem}: {text}") from None
        if "pattern too large" in text:
            text = f"{text} (the compiled pattern would need over {MAX_PATTERN_MEMORY} bytes)"
        raise PatternError(f"does not compile: {text} (RE2 syntax)") from None


def pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be used (None: it can), for the checks made when a flow is saved."""
    try:
        compile_pattern(pattern)
    except PatternError as exc:
        return str(exc)
    return None


def built_in(field_type: FieldType) -> str | None:
    """The built-in RE2 pattern of a field type (EMAIL and PHONE only)."""
    return _BUILT_IN.get(field_type)


def search(pattern: str, text: str) -> Any:
    """The first match of `pattern` in `text` (up to `MAX_MATCH_CHARS`), or None."""
    return compile_pattern(pattern).search(text[:MAX_MATCH_CHARS])


def search_built_in(field_type: FieldType, text: str) -> str | None:
    """The first value the built-in pattern finds in `text`, or None."""
    pattern = _BUILT_IN[field_type]
    program = compile_pattern(pattern)
    text = text[:MAX_MATCH_CHARS]
    group = program.groupindex["value"]
    pos = 0
    while (match := program.search(text, pos)) is not None:
        start = match.start(group)
        if field_type is not FieldType.PHONE or not _DATE_SHAPED.match(text, start):
            value: str = match.group(group)
            return value
        pos = start  # the next candidate starts after this one's first character
    return None


def fullmatch(pattern: str, value: str) -> bool:
    """Whether `value` matches `pattern` in full; a value over `MAX_MATCH_CHARS` does not."""
    if len(value) > MAX_MATCH_CHARS:
        return False
    return compile_pattern(pattern).fullmatch(value) is not None
