"""The core's exception tree.

`CoreError` is the root. Its direct subclasses name what a caller can do about a failure; each
carries a stable `code` (the wire protocol's error code) so that the gateway never has to inspect
messages. Backends translate driver exceptions into these at their boundary (`raise Conflict(...)
from exc`), so no driver type ever leaks upward.
"""

from __future__ import annotations


class CoreError(Exception):
    """Root of every error raised on purpose by the core and its backends."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(CoreError):
    """The caller sent something malformed: fix the input, do not retry as is."""

    code = "bad_request"


class TooLarge(InvalidInput):
    """The input exceeds a configured size limit."""

    code = "too_large"


class NotFound(CoreError):
    """The named object does not exist for this business."""

    code = "not_found"


class Forbidden(CoreError):
    """The caller's credentials do not allow this action on this object."""

    code = "forbidden"


class Conflict(CoreError):
    """The action collides with the current state (a uniqueness rule, a concurrent change)."""

    code = "conflict"


class Unavailable(CoreError):
    """A dependency is down or overloaded; retry after `retry_after_ms`."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after_ms: int = 1000) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Overloaded(Unavailable):
    """This instance runs as many answers as it is allowed to (`max_active_answers`): the message
    was not taken; send it again after `retry_after_ms`."""


class MessageProcessingError(CoreError):
    """A step of the per-message pipeline failed (the message-handling guide's hierarchy)."""

    code = "internal"


class StageTransitionError(MessageProcessingError):
    """Stage selection failed or chose a stage that is not allowed."""


class TemplateError(MessageProcessingError):
    """A template could not be compiled or rendered (missing variable, sandbox violation)."""


class DataExtractionError(MessageProcessingError):
    """Data extraction failed; logged and counted, never fatal to the turn."""


class LLMError(MessageProcessingError):
    """The model provider failed to produce an answer."""
