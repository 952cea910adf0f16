"""ScriptedLLM: the offline default model. Deterministic, paced, cancellable.

It answers every prompt with text derived only from the last user message, so tests can predict
it, at `tokens_per_second` pieces a second (0 means as fast as possible), `tokens` pieces long.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from core.llm import ChatMessage, Completion, Usage

_FILLER = [
    "this",
    "gateway",
    "streams",
    "every",
    "token",
    "live",
    "so",
    "nobody",
    "waits",
    "for",
    "the",
    "whole",
    "answer",
    "while",
    "a",
    "human",
    "agent",
    "can",
    "step",
    "in",
    "at",
    "any",
    "moment",
    "and",
    "take",
    "the",
    "conversation",
    "over",
    "from",
    "the",
    "assistant",
]


def scripted_reply(messages: Sequence[ChatMessage], tokens: int) -> list[str]:
    """The pieces ScriptedLLM yields for `messages`: "You said: <text>." then filler words."""
    last = next((m.content for m in reversed(messages) if m.role == "user"), "")
    quoted = " ".join(last.split())[:80]
    words = ["You", "said:", f"{quoted}."] if quoted else ["Hello."]
    start = int.from_bytes(hashlib.sha256(last.encode()).digest()[:4], "big")
    while len(words) < tokens:
        words.append(_FILLER[(start + len(words)) % len(_FILLER)])
    words = words[: max(tokens, 1)]
    return [w + " " for w in words[:-1]] + [words[-1]]


class _ScriptedStream:
    def __init__(self, pieces: list[str], delay: float, prompt_tokens: int) -> None:
        self._pieces = pieces
        self._delay = delay
        self._prompt_tokens = prompt_tokens
        self._closed = False
        self.usage: Usage | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        for piece in self._pieces:
            if self._delay:
                await asyncio.sleep(self._delay)
            else:
                await asyncio.sleep(0)  # stay cancellable even at full speed
            if self._closed:
                return
            yield piece
        self.usage = Usage(self._prompt_tokens, len(self._pieces))

    async def aclose(self) -> None:
        self._closed = True


class ScriptedLLM:
    """An offline model with real streaming semantics (see module docstring)."""

    name = "scripted"

    def __init__(self, *, tokens_per_second: float = 20.0, tokens: int = 40) -> None:
        if tokens_per_second < 0:
            raise ValueError("tokens_per_second must be >= 0")
        if tokens < 1:
            raise ValueError("tokens must be >= 1")
        self.tokens_per_second = tokens_per_second
        self.tokens = tokens

    async def stream(
        self, messages: Sequence[ChatMessage], *, business_id: str | None = None
    ) -> _ScriptedStream:
        delay = 1.0 / self.tokens_per_second if self.tokens_per_second else 0.0
        prompt_tokens = sum(len(m.content.split()) for m in messages)
        return _ScriptedStream(scripted_reply(messages, self.tokens), delay, prompt_tokens)

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        json_schema: Mapping[str, Any] | None = None,
        business_id: str | None = None,
    ) -> Completion:
        """Deterministic whole answers. With a JSON schema: an object with every property null
        (the scripted model extracts nothing; pattern rules do the demo's extraction). Without:
        for a prompt ending in a line "Options: a, b, c" (stage selection), the first option the
        text before that line names, else the first option; otherwise the scripted reply."""
        prompt_tokens = sum(len(m.content.split()) for m in messages)
        if json_schema is not None:
            properties = json_schema.get("properties", {})
            text = json.dumps({name: None for name in properties})
        else:
            text = _first_option(messages) or "".join(scripted_reply(messages, self.tokens))
        return Completion(text, Usage(prompt_tokens, len(text.split())), self.name)

    async def close(self) -> None:
        pass


def _first_option(messages: Sequence[ChatMessage]) -> str | None:
    for message in reversed(messages):
        lines = message.content.splitlines()
        for index, line in enumerate(lines):
            if line.strip().lower().startswith("options:"):
                options = [o.strip() for o in line.split(":", 1)[1].split(",") if o.strip()]
                before = "\n".join(lines[:index]).lower()
                named = [o for o in options if re.search(rf"\b{re.escape(o.lower())}\b", before)]
                choices = named or options
                return choices[0] if choices else None
    return None
