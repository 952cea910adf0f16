"""MemoryStore: the embedded default Store, in this process's memory.

A real implementation of the Store contract (see core.store), not a mock: the same idempotency,
tenancy and ordering rules as the PostgreSQL store. Every method does its work without awaiting
in between, which makes each one atomic on the event loop. Nothing survives a restart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from core.errors import Conflict, NotFound
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
    parse_audit_cursor,
)
from core.store import check_mode_holder
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
    new_id,
)


@dataclasses.dataclass(slots=True)
class _ConversationRows:
    conversation: Conversation
    updated_at: datetime
    messages: list[Message] = dataclasses.field(default_factory=list)
    by_client_msg_id: dict[str, int] = dataclasses.field(default_factory=dict)
    by_response_id: dict[str, int] = dataclasses.field(default_factory=dict)
    seqs: set[int] = dataclasses.field(default_factory=set)


class MemoryStore:
    def __init__(self) -> None:
        self._businesses: dict[BusinessId, Business] = {}
        self._by_public_id: dict[str, BusinessId] = {}
        self._end_users: dict[EndUserId, tuple[BusinessId, str | None]] = {}
        self._conversations: dict[ConversationId, _ConversationRows] = {}
        self._message_index: dict[MessageId, tuple[ConversationId, int]] = {}
        self._api_keys: dict[str, BusinessId] = {}
        self._previous_keys: dict[BusinessId, tuple[str, datetime]] = {}
        self._external_users: dict[tuple[BusinessId, str], EndUserId] = {}
        self._settings: dict[str, str] = {}
        self._flows: dict[BusinessId, Flow] = {}
        self._audit: dict[BusinessId, list[AuditRecord]] = {}
        self._agents: dict[AgentId, Agent] = {}
        self._last_stamp = _now()

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    async def ensure_business(self, business: Business) -> Business:
        existing = self._by_public_id.get(business.public_id)
        if existing is not None:
            return self._businesses[existing]
        if business.business_id in self._businesses:
            raise Conflict(f"business id {business.business_id} already exists")
        self._businesses[business.business_id] = business
        self._by_public_id[business.public_id] = business.business_id
        return business

    async def get_business(self, business_id: BusinessId) -> Business:
        try:
            return self._businesses[business_id]
        except KeyError:
            raise NotFound("business not found") from None

    async def get_business_by_public_id(self, public_id: str) -> Business:
        business_id = self._by_public_id.get(public_id)
        if business_id is None:
            raise NotFound(f"no business with public id {public_id!r}")
        return self._businesses[business_id]

    async def create_end_user(self, business_id: BusinessId, external_id: str | None) -> EndUserId:
        await self.get_business(business_id)
        end_user_id = EndUserId(new_id())
        self._end_users[end_user_id] = (business_id, external_id)
        return end_user_id

    async def ensure_end_user(self, business_id: BusinessId, external_id: str) -> EndUserId:
        await self.get_business(business_id)
        key = (business_id, external_id)
        end_user_id = self._external_users.get(key)
        if end_user_id is None:
            end_user_id = self._external_users[key] = EndUserId(new_id())
            self._end_users[end_user_id] = key
        return end_user_id

    async def update_business(
        self,
        business_id: BusinessId,
        *,
        allowed_origins: tuple[str, ...] | None = None,
        require_origin: bool | None = None,
        audit: AuditEntry,
    ) -> Business:
        business = await self.get_business(business_id)
        if allowed_origins is not None:
            business = dataclasses.replace(business, allowed_origins=allowed_origins)
        if require_origin is not None:
            business = dataclasses.replace(business, require_origin=require_origin)
        self._businesses[business_id] = business
        await self.add_audit(business_id, audit)
        return business

    async def set_identity_secret(
        self, business_id: BusinessId, secret: str | None, *, audit: AuditEntry
    ) -> Business:
        business = dataclasses.replace(await self.get_business(business_id), identity_secret=secret)
        self._businesses[business_id] = business
        await self.add_audit(business_id, audit)
        return business

    async def create_conversation(
        self, business_id: BusinessId, end_user_id: EndUserId, stage: StageName
    ) -> Conversation:
        owner = self._end_users.get(end_user_id)
        if owner is None or owner[0] != business_id:
            raise NotFound("end user not found")
        conversation = Conversation(
            conversation_id=ConversationId(new_id()),
            business_id=business_id,
            end_user_id=end_user_id,
            mode=Mode.AI,
            stage=stage,
            created_at=_now(),
        )
        self._conversations[conversation.conversation_id] = _ConversationRows(
            conversation, updated_at=self._stamp()
        )
        return conversation

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        return self._rows(business_id, conversation_id).conversation

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
        rows = self._rows(business_id, conversation_id)
        index = rows.by_client_msg_id.get(client_msg_id)
        if index is not None:
            return rows.messages[index], False
        message = Message(
            message_id=MessageId(new_id()),
            conversation_id=conversation_id,
            role=role,
            text=text,
            created_at=_now(),
            client_msg_id=client_msg_id,
            author_id=author.agent_id if author else None,
            author_name=author.name if author else None,
        )
        rows.by_client_msg_id[client_msg_id] = self._append(rows, message)
        return message, True

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
        rows = self._rows(business_id, conversation_id)
        index = rows.by_response_id.get(response_id)
        if index is not None:
            return rows.messages[index]
        message = Message(
            message_id=MessageId(response_id),  # an answer's message id is its response id
            conversation_id=conversation_id,
            role=Role.ASSISTANT,
            text=text,
            created_at=_now(),
            status=status,
            response_id=response_id,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )
        rows.by_response_id[response_id] = self._append(rows, message)
        return message

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
        # Checked first, so that a conflict leaves nothing behind; then no await in between.
        rows = self._rows(business_id, conversation_id)
        index = rows.by_response_id.get(response_id)
        have = rows.messages[index].seq if index is not None else None
        if seq is not None and have is not None and have != seq:
            raise Conflict(f"message already has seq {have}")
        if seq is not None and have is None and seq in rows.seqs:
            raise Conflict(f"seq {seq} is already taken in this conversation")
        message = await self.add_assistant_message(
            business_id, conversation_id, response_id, text, status, usage=usage
        )
        if seq is not None:
            await self.set_message_seq(business_id, conversation_id, message.message_id, seq)
        if rows.conversation.active_response_id == response_id:
            rows.conversation = dataclasses.replace(rows.conversation, active_response_id=None)
        return rows.messages[self._message_index[message.message_id][1]], rows.conversation

    async def set_message_seq(
        self, business_id: BusinessId, conversation_id: ConversationId, message_id: MessageId, seq: int
    ) -> Conversation:
        rows = self._rows(business_id, conversation_id)
        where = self._message_index.get(message_id)
        if where is None or where[0] != conversation_id:
            raise NotFound("message not found")
        message = rows.messages[where[1]]
        if message.seq is not None and message.seq != seq:
            raise Conflict(f"message already has seq {message.seq}")
        if message.seq is None and seq in rows.seqs:
            raise Conflict(f"seq {seq} is already taken in this conversation")
        rows.messages[where[1]] = dataclasses.replace(message, seq=seq)
        rows.seqs.add(seq)
        if seq > rows.conversation.last_seq:
            rows.conversation = dataclasses.replace(rows.conversation, last_seq=seq)
        rows.updated_at = self._stamp()
        return rows.conversation

    async def set_active_response(
        self, business_id: BusinessId, conversation_id: ConversationId, response_id: ResponseId | None
    ) -> Conversation:
        rows = self._rows(business_id, conversation_id)
        rows.conversation = dataclasses.replace(rows.conversation, active_response_id=response_id)
        rows.updated_at = self._stamp()
        return rows.conversation

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        rows = self._rows(business_id, conversation_id)
        rows.conversation = dataclasses.replace(rows.conversation, epoch=epoch)
        rows.updated_at = self._stamp()
        return rows.conversation

    async def list_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, after_seq: int, limit: int
    ) -> list[Message]:
        rows = self._rows(business_id, conversation_id)
        listed = sorted(
            (m for m in rows.messages if m.seq is not None and m.seq > after_seq), key=lambda m: m.seq or 0
        )
        return listed[: max(limit, 0)]

    async def recent_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, limit: int
    ) -> list[Message]:
        rows = self._rows(business_id, conversation_id)
        return rows.messages[-limit:] if limit > 0 else []

    async def record_turn(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        stage: StageName,
        data: Mapping[str, Any],
        answering: ResponseId | None = None,
    ) -> Conversation:
        rows = self._rows(business_id, conversation_id)
        current = rows.conversation
        in_stage = current.turns_in_stage + 1 if stage == current.stage else 1
        active = current.active_response_id
        # An answer stored already (ended before its turn was recorded) is not recorded as active.
        if answering is not None and answering not in rows.by_response_id:
            active = answering
        rows.conversation = dataclasses.replace(
            current,
            stage=stage,
            data=dict(data),
            turns=current.turns + 1,
            turns_in_stage=in_stage,
            active_response_id=active,
        )
        rows.updated_at = self._stamp()
        return rows.conversation

    async def set_api_key(self, business_id: BusinessId, key_hash: str) -> None:
        business = await self.get_business(business_id)
        if self._api_keys.get(key_hash, business_id) != business_id or self._key_taken(key_hash, business_id):
            raise Conflict("that API key belongs to another business")
        for old in [h for h, b in self._api_keys.items() if b == business_id]:
            del self._api_keys[old]
        self._api_keys[key_hash] = business_id
        self._previous_keys.pop(business_id, None)
        self._businesses[business_id] = dataclasses.replace(business, previous_key_until=None)

    async def rotate_api_key(
        self, business_id: BusinessId, key_hash: str, *, previous_until: datetime, audit: AuditEntry
    ) -> Business:
        business = await self.get_business(business_id)
        current = next((h for h, b in self._api_keys.items() if b == business_id), None)
        if current == key_hash:  # a retry: already done
            return business
        if key_hash in self._api_keys or self._key_taken(key_hash, None):
            raise Conflict("that API key is already in use")
        if current is not None:
            del self._api_keys[current]
            self._previous_keys[business_id] = (current, previous_until)
            business = dataclasses.replace(business, previous_key_until=previous_until)
        self._api_keys[key_hash] = business_id
        self._businesses[business_id] = business
        await self.add_audit(business_id, audit)
        return business

    async def revoke_previous_api_key(self, business_id: BusinessId, *, audit: AuditEntry) -> bool:
        business = await self.get_business(business_id)
        previous = self._previous_keys.pop(business_id, None)
        self._businesses[business_id] = dataclasses.replace(business, previous_key_until=None)
        if previous is None or previous[1] <= _now():
            return False
        await self.add_audit(business_id, audit)
        return True

    def _key_taken(self, key_hash: str, business_id: BusinessId | None) -> bool:
        """Whether another business's replaced key, still in its overlap, hashes to `key_hash`."""
        now = _now()
        return any(
            h == key_hash and until > now and b != business_id
            for b, (h, until) in self._previous_keys.items()
        )

    async def get_business_by_api_key(self, key_hash: str) -> Business:
        business_id = self._api_keys.get(key_hash)
        if business_id is None:
            now = _now()
            business_id = next(
                (b for b, (h, until) in self._previous_keys.items() if h == key_hash and until > now), None
            )
        if business_id is None:
            raise NotFound("no business has that API key")
        return self._businesses[business_id]

    async def claim_setting(self, name: str, proposed: str, *, replace: bool = False) -> str:
        if replace:
            self._settings[name] = proposed
        return self._settings.setdefault(name, proposed)

    async def get_flow(self, business_id: BusinessId) -> Flow:
        await self.get_business(business_id)
        return self._flows.get(business_id) or Flow(business_id=business_id)

    async def save_flow(
        self, business_id: BusinessId, flow: Flow, *, expected_version: int, audit: AuditEntry
    ) -> Flow:
        current = await self.get_flow(business_id)
        if current.version != expected_version:
            raise Conflict(f"the flow changed meanwhile (version {current.version}, not {expected_version})")
        if flow.owners() - {business_id}:
            raise Conflict("a flow record names another business")
        saved = dataclasses.replace(flow, business_id=business_id, version=current.version + 1)
        self._flows[business_id] = saved
        await self.add_audit(business_id, audit)
        return saved

    async def add_audit(self, business_id: BusinessId, entry: AuditEntry) -> None:
        await self.get_business(business_id)
        record = AuditRecord(log_id=new_id(), business_id=business_id, entry=entry, created_at=self._stamp())
        self._audit.setdefault(business_id, []).append(record)

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
        await self.get_business(business_id)
        after = parse_audit_cursor(before) if before is not None else None

        def keep(r: AuditRecord) -> bool:
            return (
                (conversation_id is None or r.conversation_id == conversation_id)
                and (actor_id is None or r.actor_id == actor_id)
                and (action_type is None or r.entry.action_type == action_type)
                and (since is None or r.created_at >= since)
                and (until is None or r.created_at < until)
                and (after is None or (r.created_at, r.log_id) < after)
            )

        newest_first = sorted(self._audit.get(business_id, []), key=lambda r: (r.created_at, r.log_id))[::-1]
        return [r for r in newest_first if keep(r)][: max(limit, 0)]

    # -- agents ---------------------------------------------------------------------------------

    async def create_agent(self, business_id: BusinessId, name: str) -> Agent:
        await self.get_business(business_id)
        agent = Agent(AgentId(new_id()), business_id, name, disabled=False, created_at=self._stamp())
        self._agents[agent.agent_id] = agent
        return agent

    async def get_agent(self, business_id: BusinessId, agent_id: AgentId) -> Agent:
        agent = self._agents.get(agent_id)
        if agent is None or agent.business_id != business_id:
            raise NotFound("agent not found")
        return agent

    async def list_agents(self, business_id: BusinessId) -> list[Agent]:
        return [a for a in self._agents.values() if a.business_id == business_id]  # insertion order

    async def set_agent_disabled(self, business_id: BusinessId, agent_id: AgentId, disabled: bool) -> Agent:
        agent = dataclasses.replace(await self.get_agent(business_id, agent_id), disabled=disabled)
        self._agents[agent_id] = agent
        return agent

    async def set_mode(
        self, business_id: BusinessId, conversation_id: ConversationId, mode: Mode, agent_id: AgentId | None
    ) -> Conversation:
        check_mode_holder(mode, agent_id)
        rows = self._rows(business_id, conversation_id)
        if agent_id is not None:
            await self.get_agent(business_id, agent_id)
        rows.conversation = dataclasses.replace(rows.conversation, mode=mode, agent_id=agent_id)
        rows.updated_at = self._stamp()
        return rows.conversation

    async def count_active_conversations(self, *, active_within_s: int) -> dict[Mode, int]:
        since = _now() - timedelta(seconds=max(active_within_s, 0))
        counts = dict.fromkeys(Mode, 0)
        for rows in self._conversations.values():
            if rows.updated_at >= since:
                counts[rows.conversation.mode] += 1
        return counts

    async def list_open_conversations(
        self, business_id: BusinessId, *, active_within_s: int, limit: int
    ) -> list[ConversationSummary]:
        since = _now() - timedelta(seconds=max(active_within_s, 0))
        active = [
            rows
            for rows in self._conversations.values()
            if rows.conversation.business_id == business_id and rows.updated_at >= since
        ]
        active.sort(key=lambda rows: (rows.updated_at, rows.conversation.conversation_id), reverse=True)
        return [_summary(rows) for rows in active[: max(limit, 0)]]

    def _stamp(self) -> datetime:
        """Now, later than any earlier stamp: the clock ticks in microseconds, and activity and
        the audit log are ordered by these times."""
        self._last_stamp = max(_now(), self._last_stamp + timedelta(microseconds=1))
        return self._last_stamp

    def _rows(self, business_id: BusinessId, conversation_id: ConversationId) -> _ConversationRows:
        rows = self._conversations.get(conversation_id)
        if rows is None or rows.conversation.business_id != business_id:
            raise NotFound("conversation not found")
        return rows

    def _append(self, rows: _ConversationRows, message: Message) -> int:
        rows.messages.append(message)
        index = len(rows.messages) - 1
        self._message_index[message.message_id] = (message.conversation_id, index)
        return index


def _now() -> datetime:
    return datetime.now(UTC)


def _summary(rows: _ConversationRows) -> ConversationSummary:
    conversation = rows.conversation
    sequenced = [m for m in rows.messages if m.seq is not None]
    last = max(sequenced, key=lambda m: m.seq or 0) if sequenced else None
    return ConversationSummary(
        conversation_id=conversation.conversation_id,
        mode=conversation.mode,
        stage=conversation.stage,
        agent_id=conversation.agent_id,
        active_response_id=conversation.active_response_id,
        last_message_role=last.role if last else None,
        last_message_text=last.text if last else None,
        last_message_at=last.created_at if last else None,
        updated_at=rows.updated_at,
    )
