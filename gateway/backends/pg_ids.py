"""Ids in PostgreSQL: our ids are UUIDs in text; anything else names nothing."""

from __future__ import annotations

import uuid

from core.errors import NotFound


def uuid_or_not_found(value: str) -> uuid.UUID:
    """Our ids are UUIDs in text; anything else names nothing here."""
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise NotFound(f"no such id: {value!r}") from None
