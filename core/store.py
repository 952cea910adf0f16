"""The Store interface: the durable source of truth.

Guarantees every implementation gives (the contract suite in tests/contract checks them):

- Every method takes the caller's `business_id` (from its credentials, never from a request body)
  and only ever sees that business's rows: a conversation of another business is `NotFound`.
- `add_user_message` is idempotent on (conversation, client_msg_id): the first call inserts, every
  later call with the same key returns the same row and `created=False`, also under concurrency.
- When a method returns, its write is durable (committed); an `ack` may be sent on it.
- Messages are listed in seq order; rows whose seq is not yet written are not listed.
- A conversation's `updated_at` (its last activity, which `list_open_conversations` orders by)
  moves with every write of its state: a message's seq, the active answer, the mode, a turn (the
  stage), the epoch.
- Failures are `core.errors` exceptions; no driver type escapes.
- A write of conversation state returns the conversation as that write left it (for caches:
  no read after the write).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from core.errors import InvalidInput
from core.flow_models import Flow
from core.llm import Usage
from core.models import (
    Agent,
    AuditEntry,
    AuditRecord,
    Business,
    Conversation,
    ConversationSummary,
    Message,
)
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    EndUserId,
    MessageId,
    Mode,
    ResponseId,
    Role,
    StageName,
)


class Store(Protocol):
    async def connect(self) -> None:
        """Open connections. Call once, from the application's lifespan."""

    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    async def ping(self) -> None:
        """Return when the store answers; raise `Unavailable` otherwise."""

    async def ensure_business(self, business: Business) -> Business:
        """Create the business if its public id is new; return the stored one either way."""

    async def get_business(self, business_id: BusinessId) -> Business:
        """The business, or `NotFound`."""

    async def get_business_by_public_id(self, public_id: str) -> Business:
        """The business with that public id, or `NotFound`."""

    async def create_end_user(self, business_id: BusinessId, external_id: str | None) -> EndUserId:
        """A new end user; `external_id` is the business's own id for a verified user, if any."""

    async def create_conversation(
        self, business_id: BusinessId, end_user_id: EndUserId, stage: StageName
    ) -> Conversation:
        """A new conversation in `ai` mode at `stage`."""

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        """The conversation, or `NotFound` (also when it belongs to another business)."""

    async def add_user_message(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        client_msg_id: str,
        text: str,
        *,
        role: Role = Role.USER,
        author: Agent | None = None,
    ) -> tuple[Message, bool]:
        """Store a message idempotently on `client_msg_id`; return the row and whether this call
        created it. `role` is `user` for what a user sent; the gateway's own notes (`system`)
        use keys of their own; an agent's message (`agent`) records its `author` (id and name)."""

    async def add_assistant_message(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        response_id: ResponseId,
        text: str,
        status: AnswerStatus,
        *,
        usage: Usage | None = None,
    ) -> Message:
        """Store a finished answer (with the model's token usage, when known); idempotent on
        `response_id` (returns the existing row). The message's id is the response id."""

    async def finish_answer(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        response_id: ResponseId,
        text: str,
        status: AnswerStatus,
        *,
        seq: int | None,
        usage: Usage | None = None,
    ) -> tuple[Message, Conversation]:
        """Everything an ended answer leaves in the store, in one atomic step: the answer as
        `add_assistant_message` stores it (idempotent on `response_id`), its seq as
        `set_message_seq` records it (when `seq` is not None), and the conversation's active
        answer cleared if it is still this one. Returns the message and the conversation."""

    async def set_message_seq(
        self, business_id: BusinessId, conversation_id: ConversationId, message_id: MessageId, seq: int
    ) -> Conversation:
        """Record the seq of the message's event once its publish returned. Written once (the same
        value again is accepted; another value is `Conflict`). Raises the conversation's
        `last_seq` to `seq` if it is lower."""

    async def set_active_response(
        self, business_id: BusinessId, conversation_id: ConversationId, response_id: ResponseId | None
    ) -> Conversation:
        """Record the answer being generated now (None when it ended)."""

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        """Record the epoch of the conversation's event log (when a log was opened anew)."""

    async def list_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, after_seq: int, limit: int
    ) -> list[Message]:
        """Messages with seq > after_seq, in seq order, at most `limit`."""

    async def record_turn(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        stage: StageName,
        data: Mapping[str, Any],
        answering: ResponseId | None = None,
    ) -> Conversation:
        """Count one handled user message: `turns` + 1; `turns_in_stage` + 1, or 1 when `stage`
        differs from the current one; then set the stage and the extracted data. With
        `answering`, record it as the answer being generated now in the same write (what
        `set_active_response` records), unless that answer is stored already (it ended before
        its turn was recorded); None leaves the recorded answer as it is."""

    async def ensure_end_user(self, business_id: BusinessId, external_id: str) -> EndUserId:
        """The end user the business knows as `external_id` (a verified identity), created on
        first use; the same id for every later call, also under concurrency."""

    async def update_business(
        self,
        business_id: BusinessId,
        *,
        allowed_origins: tuple[str, ...] | None = None,
        require_origin: bool | None = None,
        audit: AuditEntry,
    ) -> Business:
        """Change the business's settings given (None: unchanged) and record `audit`, in one
        step; return the business as stored (`NotFound` for an unknown business)."""

    async def set_identity_secret(
        self, business_id: BusinessId, secret: str | None, *, audit: AuditEntry
    ) -> Business:
        """Set (or with None remove) the key of the business's verified identity, and record
        `audit`, in one step; return the business as stored."""

    async def set_api_key(self, business_id: BusinessId, key_hash: str) -> None:
        """Set the business's admin API key (its SHA-256, hex; the key itself is never stored).
        Any previous key still in its overlap stops working."""

    async def rotate_api_key(
        self, business_id: BusinessId, key_hash: str, *, previous_until: datetime, audit: AuditEntry
    ) -> Business:
        """Make `key_hash` the business's admin key; the key it replaces keeps working until
        `previous_until` (a still older one stops at once). Records `audit` in the same step.
        Calling it again with the same `key_hash` changes nothing (a retry)."""

    async def revoke_previous_api_key(self, business_id: BusinessId, *, audit: AuditEntry) -> bool:
        """End the overlap of the replaced admin key now; whether one was still valid (the audit
        record is written only then)."""

    async def get_business_by_api_key(self, key_hash: str) -> Business:
        """The business whose admin API key hashes to `key_hash` (the current key, or the
        replaced one until the end of its overlap), or `NotFound`."""

    async def claim_setting(self, name: str, proposed: str, *, replace: bool = False) -> str:
        """The value of the setting `name` that every instance on this store shares: `proposed`
        when none is stored yet (or always, with `replace`), else the one stored. The first claim
        of a name decides, atomically; later ones get its value back."""

    async def get_flow(self, business_id: BusinessId) -> Flow:
        """The business's whole flow configuration, with its version."""

    async def save_flow(
        self, business_id: BusinessId, flow: Flow, *, expected_version: int, audit: AuditEntry
    ) -> Flow:
        """Replace the business's flow by `flow` (records keep their ids) if its version is still
        `expected_version` (else `Conflict`), and record `audit`, in one transaction; return the
        flow as stored, with the version + 1."""

    async def add_audit(self, business_id: BusinessId, entry: AuditEntry) -> None:
        """Record an action in the audit log."""

    async def list_audit(
        self,
        business_id: BusinessId,
        *,
        limit: int,
        conversation_id: ConversationId | None = None,
        actor_id: str | None = None,
        action_type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before: str | None = None,
    ) -> list[AuditRecord]:
        """The business's audit records, newest first (by `created_at`, then `log_id`), at most
        `limit`, keeping those that match every filter given: the conversation, the actor, the
        action type (exactly), `since <= created_at < until`. `before` is the `cursor` of the last
        record of a previous page: the listing goes on after it (`InvalidInput` when it is not a
        cursor). An id that names nothing (malformed included) matches nothing."""

    # -- agents ---------------------------------------------------------------------------------

    async def create_agent(self, business_id: BusinessId, name: str) -> Agent:
        """A new, enabled agent of the business (`NotFound` for an unknown business)."""

    async def get_agent(self, business_id: BusinessId, agent_id: AgentId) -> Agent:
        """The agent, or `NotFound` (also for another business's agent or a malformed id)."""

    async def list_agents(self, business_id: BusinessId) -> list[Agent]:
        """The business's agents, oldest first."""

    async def set_agent_disabled(self, business_id: BusinessId, agent_id: AgentId, disabled: bool) -> Agent:
        """Disable or enable the agent (idempotent); return it as stored. `NotFound` as `get_agent`."""

    async def set_mode(
        self, business_id: BusinessId, conversation_id: ConversationId, mode: Mode, agent_id: AgentId | None
    ) -> Conversation:
        """Record who answers: `human` with the agent holding the conversation (`NotFound` when it
        is not an agent of this business), or `ai` with `agent_id` None (`InvalidInput` otherwise).
        Return the conversation as stored. Whether the change is allowed (who may take over from
        whom) is the caller's to decide; this only records it."""

    async def count_active_conversations(self, *, active_within_s: int) -> dict[Mode, int]:
        """How many conversations, of all businesses, were active in the last `active_within_s`
        seconds, by mode. The one method that is not about one business: an operator's count for
        /metrics, which gives no business's data away."""

    async def list_open_conversations(
        self, business_id: BusinessId, *, active_within_s: int, limit: int
    ) -> list[ConversationSummary]:
        """The business's conversations active in the last `active_within_s` seconds (by
        `updated_at`), newest activity first, at most `limit`, each with its newest sequenced
        message (for an agent console's first view)."""

    async def recent_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, limit: int
    ) -> list[Message]:
        """The last `limit` messages in the order they were stored (for prompts)."""


def check_mode_holder(mode: Mode, agent_id: AgentId | None) -> None:
    """`set_mode`'s rule on its arguments: an agent holds a conversation in `human` mode, and only
    then (`InvalidInput` otherwise)."""
    if mode is Mode.HUMAN and agent_id is None:
        raise InvalidInput("human mode needs the agent who holds the conversation")
    if mode is Mode.AI and agent_id is not None:
        raise InvalidInput("in ai mode no agent holds the conversation: pass agent_id=None")
