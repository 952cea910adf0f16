"""The LLM provider interface.

A provider turns a list of chat messages into a stream of text pieces.

Guarantees every implementation gives:

- `stream()` returns once the request is open; errors before the first piece raise `LLMError`.
- Iterating yields text pieces in order; `usage` is set once the stream has ended normally, when
  the provider reports it.
- `aclose()` (or cancelling the task that iterates) stops the generation at the provider: the
  underlying request is closed so that no more tokens are produced or billed. It is safe to call
  more than once and after the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


class LLMStream(Protocol):
    usage: Usage | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    async def aclose(self) -> None: ...


class LLMProvider(Protocol):
    name: str

    async def stream(self, messages: Sequence[ChatMessage]) -> LLMStream: ...

    async def close(self) -> None: ...
