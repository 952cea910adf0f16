"""Identifiers and the small closed vocabularies of the core."""

from __future__ import annotations

import enum
import uuid
from typing import NewType

AgentId = NewType("AgentId", str)
BusinessId = NewType("BusinessId", str)
ConversationId = NewType("ConversationId", str)
EndUserId = NewType("EndUserId", str)
MessageId = NewType("MessageId", str)
ResponseId = NewType("ResponseId", str)
StageName = NewType("StageName", str)


def new_id() -> str:
    """A fresh random identifier (UUID4, canonical text form)."""
    return str(uuid.uuid4())


class Mode(enum.StrEnum):
    """Who answers the user: the model or a human agent."""

    AI = "ai"
    HUMAN = "human"


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"
    AGENT = "agent"
    SYSTEM = "system"


class AnswerStatus(enum.StrEnum):
    """How an assistant answer ended (the `status` of `ai_end`)."""

    COMPLETE = "complete"
    STOPPED = "stopped"
    TAKEN_OVER = "taken_over"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class EventType(enum.StrEnum):
    """Types of the events published on a conversation's channel."""

    MESSAGE = "message"
    AI_START = "ai_start"
    DELTA = "delta"
    AI_END = "ai_end"
    MODE = "mode"
    STAGE = "stage"
    TYPING = "typing"  # ephemeral: no seq, never replayed
    # Business feed only, ephemeral: a conversation was created; its end user came or went.
    CONVERSATION = "conversation"
    PRESENCE = "presence"
