"""What the core reports for observability; the gateway turns it into Prometheus metrics."""

from __future__ import annotations

from typing import Protocol

from core.types import AnswerStatus


class Observer(Protocol):
    def message_processed(self, outcome: str) -> None:
        """A user message was handled: "answered", "stored" (no answer due), "duplicate", or
        "refused_overloaded" (not stored: the instance answers as many conversations as it may)."""

    def first_token(self, seconds: float) -> None:
        """Time from a user message being stored to the model's first text piece."""

    def answer_ended(self, status: AnswerStatus) -> None: ...

    def pieces(self, count: int) -> None:
        """Text pieces received from the model for one answer."""

    def error(self, code: str) -> None:
        """A failure worth counting, by error code or error class name."""

    def step_seconds(self, step: str, seconds: float) -> None:
        """Time one pipeline step took for one message."""

    def flow_cache(self, hit: bool) -> None:
        """A flow (with its templates) was looked up in the in-process cache."""


class NullObserver:
    """Observes nothing (for tests and tools that run the core without metrics)."""

    def message_processed(self, outcome: str) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def answer_ended(self, status: AnswerStatus) -> None:
        pass

    def pieces(self, count: int) -> None:
        pass

    def error(self, code: str) -> None:
        pass

    def step_seconds(self, step: str, seconds: float) -> None:
        pass

    def flow_cache(self, hit: bool) -> None:
        pass
