"""Plain, immutable records passed between the core, the gateway and the backends."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import InvalidInput
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    EndUserId,
    EventType,
    MessageId,
    Mode,
    ResponseId,
    Role,
    StageName,
)


@dataclass(frozen=True, slots=True)
class Business:
    business_id: BusinessId
    public_id: str
    name: str
    info: str = ""
    allowed_origins: tuple[str, ...] = ()
    """Origins whose pages may use the business's chat (canonical `scheme://host[:port]`, or
    `self`: the gateway's own); empty means any origin (see gateway/origins.py)."""
    require_origin: bool = False
    """Refuse widget sessions and sockets that send no `Origin` (clients outside a browser)."""
    identity_secret: str | None = field(default=None, repr=False)
    """The key the business's server signs its users' ids with (HMAC-SHA256), for verified
    identity; None: verified identity is off. Kept as it is: verifying needs the key itself."""
    previous_key_until: datetime | None = None
    """When the admin key replaced by the latest rotation stops working (None: no such key)."""
    response_template: str = "{{ message }}"
    system_prompt: str = "You are a helpful assistant."
    entry_stage: str = "default"


@dataclass(frozen=True, slots=True)
class Agent:
    """A human agent of a business: watches conversations, takes over from the AI, hands back.

    A disabled agent keeps its record (the audit log names it) but may not act: tokens are not
    issued to it, and the ones it holds are refused where they are used."""

    agent_id: AgentId
    business_id: BusinessId
    name: str
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: ConversationId
    business_id: BusinessId
    end_user_id: EndUserId
    mode: Mode
    stage: StageName
    created_at: datetime
    data: Mapping[str, Any] = field(default_factory=dict)
    active_response_id: ResponseId | None = None
    """The answer being generated right now, if any."""
    last_seq: int = 0
    """The highest seq of the conversation's events the store has recorded on a message."""
    epoch: str | None = None
    """The epoch of the event log the conversation's seqs were last opened in."""
    turns: int = 0
    """User messages the pipeline has handled in this conversation."""
    turns_in_stage: int = 0
    """Of those, the ones since the conversation entered its current stage."""
    agent_id: AgentId | None = None
    """The agent holding the conversation while its mode is `human`; None in `ai` mode."""


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    """One line of an agent console's list of open conversations.

    `last_message_*` describe the newest message with a seq (None when there is none yet);
    `updated_at` is the conversation's last activity (a message, an answer, a mode or a stage)."""

    conversation_id: ConversationId
    mode: Mode
    stage: StageName
    agent_id: AgentId | None
    active_response_id: ResponseId | None
    last_message_role: Role | None
    last_message_text: str | None
    last_message_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Message:
    """A durable message of a conversation.

    `seq` is the conversation event sequence number of its `message` (or `ai_end`) event; it is
    None between the insert and the moment the publish returned.
    """

    message_id: MessageId
    conversation_id: ConversationId
    role: Role
    text: str
    created_at: datetime
    seq: int | None = None
    client_msg_id: str | None = None
    status: AnswerStatus | None = None
    response_id: ResponseId | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    """Token usage of an answer, when the model reported it."""
    author_id: AgentId | None = None
    author_name: str | None = None
    """For an agent's message (role `agent`): the agent and its name when it wrote."""


@dataclass(frozen=True, slots=True)
class Event:
    """One event on a conversation's channel.

    `seq` is assigned by the broker at publish and is None for ephemeral events (typing); `epoch`
    names the log the seq belongs to. `payload` holds the type-specific fields of the wire frame;
    `origin` names the session that caused an ephemeral event so that it is not echoed back.
    """

    conversation_id: ConversationId
    type: EventType
    seq: int | None
    payload: Mapping[str, Any]
    origin: str | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a conversation's event stream stands: its epoch and its latest seq (0 when empty)."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Replay:
    """The answer to `Broker.replay`: the position, and the events after the asked seq.

    `events` is None when the replay window no longer reaches the asked seq (or the epoch
    differs): the client must reset.
    """

    position: StreamPosition
    events: tuple[Event, ...] | None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """Who did what to a business's configuration or conversations."""

    actor_type: str  # "admin", "agent" or "system"
    action_type: str
    action_data: Mapping[str, Any]
    actor_id: str | None = None
    """The agent who acted; None for the business's admin key and for the system."""
    conversation_id: ConversationId | None = None
    """The conversation the action was about, if any (a takeover, a handback)."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    log_id: str
    business_id: BusinessId
    entry: AuditEntry
    created_at: datetime

    @property
    def actor_id(self) -> str | None:
        return self.entry.actor_id

    @property
    def conversation_id(self) -> ConversationId | None:
        return self.entry.conversation_id

    @property
    def cursor(self) -> str:
        """The position just after this record in a newest-first listing, for `list_audit(before=)`."""
        return f"{self.created_at.isoformat()}|{self.log_id}"


def parse_audit_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, log_id) an `AuditRecord.cursor` names; `InvalidInput` for anything else."""
    stamp, _, log_id = cursor.partition("|")
    try:
        created_at = datetime.fromisoformat(stamp)
        log_id = str(uuid.UUID(log_id))  # log ids are UUIDs
    except ValueError:
        created_at = None
    if created_at is None or created_at.tzinfo is None:
        raise InvalidInput("cursor is not one this API gave out (use next_cursor as it is)")
    return created_at, log_id
