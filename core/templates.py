"""Prompt templates, rendered in a sandbox.

Jinja2's immutable sandbox with attribute access refused altogether: templates can substitute
variables and use filters and control flow, but cannot reach into objects or run code. A variable
the template uses but the caller did not provide is an error naming it, never an empty string.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import TemplateError


class _NoAttributesEnvironment(ImmutableSandboxedEnvironment):
    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False


_ENV = _NoAttributesEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


@lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error on line {exc.lineno}: {exc.message}") from exc


def render(source: str, variables: Mapping[str, Any]) -> str:
    """Render `source` with `variables`; raise `TemplateError` naming what went wrong."""
    template = _compile(source)
    try:
        return template.render(dict(variables))
    except jinja2.UndefinedError as exc:
        raise TemplateError(f"template variable missing: {exc.message}") from exc
    except SecurityError as exc:
        raise TemplateError(f"template not allowed: {exc}") from exc
