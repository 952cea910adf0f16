"""The LLM provider interface.

A provider turns a list of chat messages into a stream of text pieces.

Guarantees every implementation gives:

- `stream()` returns once the request is open; errors before the first piece raise `LLMError`.
  Providers retry and fall back on their own before that point, never after it.
- Iterating yields text pieces in order; `usage` is set once the stream has ended normally, when
  the provider reports it.
- `aclose()` (or cancelling the task that iterates) stops the generation at the provider: the
  underlying request is closed so that no more tokens are produced or billed. It is safe to call
  more than once and after the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole (non-streamed) answer: for stage selection and data extraction."""

    text: str
    usage: Usage | None
    model: str


class LLMStream(Protocol):
    usage: Usage | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class LLMProvider(Protocol):
    name: str

    async def stream(self, messages: Sequence[ChatMessage], *, business_id: str | None = None) -> LLMStream:
        """Open a streamed answer; `business_id` selects the per-business limits."""

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        json_schema: Mapping[str, Any] | None = None,
        business_id: str | None = None,
    ) -> Completion:
        """A whole answer; with `json_schema`, structured output that follows it."""

    async def close(self) -> None: ...
