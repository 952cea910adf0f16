"""PostgresStore: the Store on PostgreSQL, through an asyncpg pool.

Implements the Store contract (core.store). Connection management, after the message-handling
guide's ConnectionManager: a pool sized from settings; transient failures (a connection killed,
the server restarting, too many connections, serialisation failures) are retried with capped,
jittered backoff on a fresh connection, which is how a restarted PostgreSQL is reconnected without
restarting the gateway; when the retries run out the caller gets `Unavailable` with a retry hint.
Every statement is parameterised and filtered by the caller's business id. asyncpg types and
exceptions stop here: SQLSTATEs become the core's errors.

Retrying a write is safe because every write here is idempotent (keyed inserts, set-once
updates) or harmless when repeated (a new end user or conversation that nobody will reference).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import orjson

from core.errors import Conflict, CoreError, NotFound, Unavailable
from core.flow_models import (
    Flow,
)
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
from gateway.backends.pg_ids import uuid_or_not_found as _uuid
from gateway.backends.postgres_flow import insert_audit, read_flow, write_flow
from gateway.migrate import Migrator, SchemaOutOfDate, schema_version

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures after which the same statement may succeed on another connection or a moment later.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01: terminated (pg_terminate_backend, restart)
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.SerializationError,  # 40001
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.InterfaceError,  # "connection is closed" and similar client-side states
    # Releasing a connection the server killed mid-query can fail with "cannot switch to state";
    # the pool discards that connection, so another attempt runs on a fresh one.
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)

_MESSAGE_FIELDS = (
    "message_id",
    "conversation_id",
    "role",
    "text",
    "created_at",
    "seq",
    "client_msg_id",
    "status",
    "response_id",
    "prompt_tokens",
    "completion_tokens",
    "author_id",
    "author_name",
)
_CONVERSATION_FIELDS = (
    "conversation_id",
    "business_id",
    "end_user_id",
    "mode",
    "current_stage",
    "created_at",
    "extracted_data",
    "active_response_id",
    "last_seq",
    "epoch",
    "turns",
    "turns_in_stage",
    "agent_id",
)
_MESSAGE_COLUMNS = ", ".join(_MESSAGE_FIELDS)
_CONVERSATION_COLUMNS = ", ".join(_CONVERSATION_FIELDS)


def _columns(fields: tuple[str, ...], table: str, prefix: str = "") -> str:
    """`table.field AS prefixfield, ...`: for statements that join tables with common names."""
    return ", ".join(f"{table}.{f} AS {prefix}{f}" for f in fields)


# One statement records a message's seq and raises the conversation's last_seq (no transaction,
# so one round trip); no row when the message is not there or already has another seq.
_SET_MESSAGE_SEQ = (
    "WITH m AS (UPDATE messages SET seq = $4 WHERE message_id = $1 AND conversation_id = $2"
    " AND business_id = $3 AND (seq IS NULL OR seq = $4) RETURNING conversation_id)"
    " UPDATE conversations c SET last_seq = GREATEST(c.last_seq, $4), updated_at = now()"
    f" FROM m WHERE c.conversation_id = m.conversation_id RETURNING {_columns(_CONVERSATION_FIELDS, 'c')}"
)

# One statement stores an ended answer with its seq, raises last_seq and clears the active answer
# if it is this one; no row when the conversation is not there or the answer was stored before.
_FINISH_ANSWER = (
    "WITH m AS (INSERT INTO messages (message_id, business_id, conversation_id, role, text, status,"
    " response_id, prompt_tokens, completion_tokens, seq)"
    " SELECT $1, business_id, conversation_id, 'assistant', $4, $5, $1, $6, $7, $8 FROM conversations"
    " WHERE conversation_id = $3 AND business_id = $2"
    f" ON CONFLICT (conversation_id, response_id) DO NOTHING RETURNING {_MESSAGE_COLUMNS}),"
    " conv AS (UPDATE conversations c SET last_seq = GREATEST(c.last_seq, coalesce(m.seq, 0)),"
    " active_response_id = CASE WHEN c.active_response_id = $1 THEN NULL ELSE c.active_response_id END,"
    " updated_at = now() FROM m WHERE c.conversation_id = m.conversation_id"
    f" RETURNING {_columns(_CONVERSATION_FIELDS, 'c', 'c_')})"
    f" SELECT {_columns(_MESSAGE_FIELDS, 'm')}, conv.* FROM m, conv"
)
_AGENT_COLUMNS = "agent_id, business_id, name, disabled, created_at"
_AUDIT_COLUMNS = (
    "log_id, business_id, user_id, actor_type, action_type, action_data, conversation_id, created_at"
)


class PostgresStore:
    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        attempts: int = 4,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
    ) -> None:
        if pool_size < 1 or attempts < 1:
            raise ValueError("pool_size and attempts must be >= 1")
        self._dsn = dsn
        self._pool_size = pool_size
        self._attempts = attempts
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._pool: asyncpg.Pool | None = None
        self.pool_waits = 0
        """Queries that found every pooled connection busy and queued for one (for metrics)."""
        self.pool_wait_seconds = 0.0
        """The time they waited, in all."""

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the pool and check that the schema is migrated; fail with what to do if not."""
        self._pool = await self._retrying(
            lambda: asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._statement_timeout,
                init=_init_connection,
                reset=_keep_session,
            ),
            what="connect",
        )
        need = Migrator(self._dsn).latest
        have = await self._run(schema_version)
        if have < need:
            await self.close()
            raise SchemaOutOfDate(
                f"the database schema is at version {have}, this gateway needs {need}: run 'chatgw migrate up'"
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    def pool_wait_stats(self) -> tuple[int, float]:
        """(queries that waited for a pooled connection, seconds waited), for metrics."""
        return (self.pool_waits, self.pool_wait_seconds)

    def pool_stats(self) -> tuple[int, int]:
        """(connections open, connections idle), for metrics."""
        if self._pool is None:
            return (0, 0)
        return (self._pool.get_size(), self._pool.get_idle_size())

    # -- businesses and people ----------------------------------------------------------------

    async def ensure_business(self, business: Business) -> Business:
        settings: dict[str, Any] = {
            "response_template": business.response_template,
            "system_prompt": business.system_prompt,
            "entry_stage": business.entry_stage,
            "require_origin": business.require_origin,
            "identity_secret": business.identity_secret,
        }

        async def run(c: asyncpg.Connection) -> asyncpg.Record:
            await c.execute(
                "INSERT INTO businesses (business_id, public_id, name, info, allowed_origins, settings)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (public_id) DO NOTHING",
                _uuid(business.business_id),
                business.public_id,
                business.name,
                business.info,
                list(business.allowed_origins),
                settings,
            )
            return await c.fetchrow(_BUSINESS_SELECT + " WHERE public_id = $1", business.public_id)

        return _business(await self._run(run))

    async def get_business(self, business_id: BusinessId) -> Business:
        row = await self._run(
            lambda c: c.fetchrow(_BUSINESS_SELECT + " WHERE business_id = $1", _uuid(business_id))
        )
        if row is None:
            raise NotFound("business not found")
        return _business(row)

    async def get_business_by_public_id(self, public_id: str) -> Business:
        row = await self._run(lambda c: c.fetchrow(_BUSINESS_SELECT + " WHERE public_id = $1", public_id))
        if row is None:
            raise NotFound(f"no business with public id {public_id!r}")
        return _business(row)

    async def create_end_user(self, business_id: BusinessId, external_id: str | None) -> EndUserId:
        end_user_id = new_id()
        try:
            await self._run(
                lambda c: c.execute(
                    "INSERT INTO end_users (end_user_id, business_id, external_id) VALUES ($1, $2, $3)",
                    uuid.UUID(end_user_id),
                    _uuid(business_id),
                    external_id,
                )
            )
        except NotFound:
            raise NotFound("business not found") from None
        return EndUserId(end_user_id)

    # -- conversations ------------------------------------------------------------------------

    async def ensure_end_user(self, business_id: BusinessId, external_id: str) -> EndUserId:
        bid = _uuid(business_id)

        async def run(c: asyncpg.Connection) -> Any:
            # Insert-or-read in one statement: the unique (business_id, external_id) settles races.
            return await c.fetchval(
                "WITH new AS (INSERT INTO end_users (end_user_id, business_id, external_id)"
                " VALUES ($1, $2, $3) ON CONFLICT (business_id, external_id) DO NOTHING RETURNING end_user_id)"
                " SELECT end_user_id FROM new UNION ALL"
                " SELECT end_user_id FROM end_users WHERE business_id = $2 AND external_id = $3 LIMIT 1",
                uuid.UUID(new_id()),
                bid,
                external_id,
            )

        try:
            found = await self._run(run)
        except NotFound:
            raise NotFound("business not found") from None
        if found is None:
            raise NotFound("business not found")
        return EndUserId(str(found))

    async def update_business(
        self,
        business_id: BusinessId,
        *,
        allowed_origins: tuple[str, ...] | None = None,
        require_origin: bool | None = None,
        audit: AuditEntry,
    ) -> Business:
        changes: dict[str, Any] = {} if require_origin is None else {"require_origin": require_origin}
        origins = None if allowed_origins is None else list(allowed_origins)
        return await self._update_business(
            business_id,
            "allowed_origins = coalesce($2::text[], allowed_origins), settings = settings || $3::jsonb",
            [origins, changes],
            audit,
        )

    async def set_identity_secret(
        self, business_id: BusinessId, secret: str | None, *, audit: AuditEntry
    ) -> Business:
        return await self._update_business(
            business_id, "settings = settings || $2::jsonb", [{"identity_secret": secret}], audit
        )

    async def _update_business(
        self, business_id: BusinessId, assignments: str, args: list[Any], audit: AuditEntry
    ) -> Business:
        bid = _uuid(business_id)

        async def run(c: asyncpg.Connection) -> asyncpg.Record | None:
            async with c.transaction():
                row = await c.fetchrow(
                    f"UPDATE businesses SET {assignments} WHERE business_id = $1 RETURNING {_BUSINESS_COLUMNS}",
                    bid,
                    *args,
                )
                if row is not None:
                    await insert_audit(c, bid, audit)
                return row

        row = await self._run(run)
        if row is None:
            raise NotFound("business not found")
        return _business(row)

    async def create_conversation(
        self, business_id: BusinessId, end_user_id: EndUserId, stage: StageName
    ) -> Conversation:
        row = await self._run(
            lambda c: c.fetchrow(
                "INSERT INTO conversations (conversation_id, business_id, end_user_id, current_stage)"
                " SELECT $1, business_id, end_user_id, $4 FROM end_users"
                " WHERE end_user_id = $3 AND business_id = $2"
                f" RETURNING {_CONVERSATION_COLUMNS}",
                uuid.UUID(new_id()),
                _uuid(business_id),
                _uuid(end_user_id),
                stage,
            )
        )
        if row is None:
            raise NotFound("end user not found")
        return _conversation(row)

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        row = await self._run(
            lambda c: c.fetchrow(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE conversation_id = $1 AND business_id = $2",
                _uuid(conversation_id),
                _uuid(business_id),
            )
        )
        if row is None:
            raise NotFound("conversation not found")
        return _conversation(row)

    async def set_active_response(
        self, business_id: BusinessId, conversation_id: ConversationId, response_id: ResponseId | None
    ) -> Conversation:
        return await self._update_conversation(
            "active_response_id = $3",
            business_id,
            conversation_id,
            _uuid(response_id) if response_id else None,
        )

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        return await self._update_conversation("epoch = $3", business_id, conversation_id, epoch)

    async def _update_conversation(
        self, assignment: str, business_id: BusinessId, conversation_id: ConversationId, value: Any
    ) -> Conversation:
        row = await self._run(
            lambda c: c.fetchrow(
                f"UPDATE conversations SET {assignment}, updated_at = now()"
                f" WHERE conversation_id = $1 AND business_id = $2 RETURNING {_CONVERSATION_COLUMNS}",
                _uuid(conversation_id),
                _uuid(business_id),
                value,
            )
        )
        if row is None:
            raise NotFound("conversation not found")
        return _conversation(row)

    async def record_turn(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        stage: StageName,
        data: Mapping[str, Any],
        answering: ResponseId | None = None,
    ) -> Conversation:
        row = await self._run(
            lambda c: c.fetchrow(
                "UPDATE conversations SET turns = turns + 1,"
                " turns_in_stage = CASE WHEN current_stage = $3 THEN turns_in_stage + 1 ELSE 1 END,"
                " current_stage = $3, extracted_data = $4,"
                # The answer is recorded unless it is stored already (ended, by a stop elsewhere,
                # before its turn was recorded): a stored answer is never shown as streaming.
                " active_response_id = CASE WHEN $5::uuid IS NOT NULL AND NOT EXISTS (SELECT 1"
                " FROM messages m WHERE m.conversation_id = $1 AND m.response_id = $5)"
                " THEN $5 ELSE active_response_id END, updated_at = now()"
                f" WHERE conversation_id = $1 AND business_id = $2 RETURNING {_CONVERSATION_COLUMNS}",
                _uuid(conversation_id),
                _uuid(business_id),
                stage,
                dict(data),
                _uuid(answering) if answering else None,
            )
        )
        if row is None:
            raise NotFound("conversation not found")
        return _conversation(row)

    # -- admin: keys, flows, audit ------------------------------------------------------------

    async def set_api_key(self, business_id: BusinessId, key_hash: str) -> None:
        status = await self._run(
            lambda c: c.execute(
                "UPDATE businesses SET api_key_hash = $2, api_key_previous_hash = NULL,"
                " api_key_previous_until = NULL WHERE business_id = $1",
                _uuid(business_id),
                key_hash,
            )
        )
        if status == "UPDATE 0":
            raise NotFound("business not found")

    async def rotate_api_key(
        self, business_id: BusinessId, key_hash: str, *, previous_until: datetime, audit: AuditEntry
    ) -> Business:
        bid = _uuid(business_id)

        async def run(c: asyncpg.Connection) -> asyncpg.Record | None:
            async with c.transaction():
                row = await c.fetchrow(
                    "UPDATE businesses SET api_key_previous_hash = api_key_hash,"
                    " api_key_previous_until = CASE WHEN api_key_hash IS NULL THEN NULL ELSE $3::timestamptz END,"
                    " api_key_hash = $2 WHERE business_id = $1 AND api_key_hash IS DISTINCT FROM $2"
                    f" RETURNING {_BUSINESS_COLUMNS}",
                    bid,
                    key_hash,
                    previous_until,
                )
                if row is None:  # a retry of a rotation that is done, or no such business
                    return await c.fetchrow(_BUSINESS_SELECT + " WHERE business_id = $1", bid)
                await insert_audit(c, bid, audit)
                return row

        row = await self._run(run)
        if row is None:
            raise NotFound("business not found")
        return _business(row)

    async def revoke_previous_api_key(self, business_id: BusinessId, *, audit: AuditEntry) -> bool:
        bid = _uuid(business_id)

        async def run(c: asyncpg.Connection) -> bool:
            async with c.transaction():
                was_valid = await c.fetchval(
                    "UPDATE businesses b SET api_key_previous_hash = NULL, api_key_previous_until = NULL"
                    " FROM businesses old WHERE b.business_id = $1 AND old.business_id = b.business_id"
                    " RETURNING coalesce(old.api_key_previous_until > now(), false)",
                    bid,
                )
                if was_valid is None:
                    raise NotFound("business not found")
                if was_valid:
                    await insert_audit(c, bid, audit)
                return bool(was_valid)

        return await self._run(run)

    async def get_business_by_api_key(self, key_hash: str) -> Business:
        row = await self._run(
            lambda c: c.fetchrow(
                _BUSINESS_SELECT
                + " WHERE api_key_hash = $1 UNION ALL "
                + _BUSINESS_SELECT
                + " WHERE api_key_previous_hash = $1 AND api_key_previous_until > now() LIMIT 1",
                key_hash,
            )
        )
        if row is None:
            raise NotFound("no business has that API key")
        return _business(row)

    async def claim_setting(self, name: str, proposed: str, *, replace: bool = False) -> str:
        # One statement: a concurrent first claim waits on the key's row lock, then takes the
        # conflict branch and returns the value that won.
        value = await self._run(
            lambda c: c.fetchval(
                "INSERT INTO gateway_settings (name, value) VALUES ($1, $2)"
                " ON CONFLICT (name) DO UPDATE SET"
                " value = CASE WHEN $3 THEN EXCLUDED.value ELSE gateway_settings.value END,"
                " updated_at = CASE WHEN $3 THEN now() ELSE gateway_settings.updated_at END"
                " RETURNING value",
                name,
                proposed,
                replace,
            )
        )
        return str(value)

    async def get_flow(self, business_id: BusinessId) -> Flow:
        async def run(c: asyncpg.Connection) -> Flow | None:
            async with c.transaction(isolation="repeatable_read", readonly=True):
                return await read_flow(c, _uuid(business_id))

        flow = await self._run(run)
        if flow is None:
            raise NotFound("business not found")
        return flow

    async def save_flow(
        self, business_id: BusinessId, flow: Flow, *, expected_version: int, audit: AuditEntry
    ) -> Flow:
        bid = _uuid(business_id)
        if flow.owners() - {business_id}:
            raise Conflict("a flow record names another business")

        async def run(c: asyncpg.Connection) -> Flow | None:
            async with c.transaction():
                version = await c.fetchval(
                    "UPDATE businesses SET flow_version = flow_version + 1"
                    " WHERE business_id = $1 AND flow_version = $2 RETURNING flow_version",
                    bid,
                    expected_version,
                )
                if version is None:
                    return None
                await write_flow(c, bid, flow)
                await insert_audit(c, bid, audit)
                return await read_flow(c, bid)

        saved = await self._run(run)
        if saved is None:
            current = await self.get_flow(business_id)
            raise Conflict(f"the flow changed meanwhile (version {current.version}, not {expected_version})")
        return saved

    async def add_audit(self, business_id: BusinessId, entry: AuditEntry) -> None:
        await self._run(lambda c: insert_audit(c, _uuid(business_id), entry))

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
        query = audit_query(
            business_id,
            limit=limit,
            conversation_id=conversation_id,
            actor_id=actor_id,
            action_type=action_type,
            since=since,
            until=until,
            before=before,
        )
        if query is None:
            return []
        sql, args = query
        rows = await self._run(lambda c: c.fetch(sql, *args))
        return [_audit_record(r) for r in rows]

    # -- agents ---------------------------------------------------------------------------------

    async def create_agent(self, business_id: BusinessId, name: str) -> Agent:
        try:
            row = await self._run(
                lambda c: c.fetchrow(
                    f"INSERT INTO agents (agent_id, business_id, name) VALUES ($1, $2, $3) RETURNING {_AGENT_COLUMNS}",
                    uuid.UUID(new_id()),
                    _uuid(business_id),
                    name,
                )
            )
        except NotFound:
            raise NotFound("business not found") from None
        return _agent(row)

    async def get_agent(self, business_id: BusinessId, agent_id: AgentId) -> Agent:
        row = await self._run(
            lambda c: c.fetchrow(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = $1 AND business_id = $2",
                _uuid(agent_id),
                _uuid(business_id),
            )
        )
        if row is None:
            raise NotFound("agent not found")
        return _agent(row)

    async def list_agents(self, business_id: BusinessId) -> list[Agent]:
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE business_id = $1 ORDER BY created_at, agent_id",
                _uuid(business_id),
            )
        )
        return [_agent(r) for r in rows]

    async def set_agent_disabled(self, business_id: BusinessId, agent_id: AgentId, disabled: bool) -> Agent:
        row = await self._run(
            lambda c: c.fetchrow(
                f"UPDATE agents SET disabled = $3 WHERE agent_id = $1 AND business_id = $2 RETURNING {_AGENT_COLUMNS}",
                _uuid(agent_id),
                _uuid(business_id),
                disabled,
            )
        )
        if row is None:
            raise NotFound("agent not found")
        return _agent(row)

    # -- who answers, and the console's view ----------------------------------------------------

    async def set_mode(
        self, business_id: BusinessId, conversation_id: ConversationId, mode: Mode, agent_id: AgentId | None
    ) -> Conversation:
        check_mode_holder(mode, agent_id)
        cid, bid = _uuid(conversation_id), _uuid(business_id)
        aid = _uuid(agent_id) if agent_id is not None else None
        row = await self._run(
            lambda c: c.fetchrow(
                "UPDATE conversations SET mode = $3, agent_id = $4, updated_at = now()"
                " WHERE conversation_id = $1 AND business_id = $2 AND ($4::uuid IS NULL OR EXISTS"
                " (SELECT 1 FROM agents WHERE agent_id = $4 AND business_id = $2))"
                f" RETURNING {_CONVERSATION_COLUMNS}",
                cid,
                bid,
                mode.value,
                aid,
            )
        )
        if row is None:
            await self.get_conversation(business_id, conversation_id)  # NotFound for the conversation
            raise NotFound("agent not found")
        return _conversation(row)

    async def count_active_conversations(self, *, active_within_s: int) -> dict[Mode, int]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT mode, count(*) AS n FROM conversations WHERE updated_at >= now() - $1::interval GROUP BY mode",
                timedelta(seconds=max(active_within_s, 0)),
            )
        )
        counts = dict.fromkeys(Mode, 0)
        for row in rows:
            counts[Mode(row["mode"])] = int(row["n"])
        return counts

    async def list_open_conversations(
        self, business_id: BusinessId, *, active_within_s: int, limit: int
    ) -> list[ConversationSummary]:
        rows = await self._run(
            lambda c: c.fetch(
                OPEN_CONVERSATIONS_SQL,
                _uuid(business_id),
                timedelta(seconds=max(active_within_s, 0)),
                max(limit, 0),
            )
        )
        return [_summary(r) for r in rows]

    # -- messages -----------------------------------------------------------------------------

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
        values: dict[str, Any] = {"role": role.value, "text": text, "client_msg_id": client_msg_id}
        if author is not None:
            values |= {"author_id": _uuid(author.agent_id), "author_name": author.name}
        return await self._insert_once(
            business_id, conversation_id, key_column="client_msg_id", key=client_msg_id, values=values
        )

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
        message, _created = await self._insert_once(
            business_id,
            conversation_id,
            message_id=_uuid(response_id),  # an answer's message id is its response id
            key_column="response_id",
            key=_uuid(response_id),
            values={
                "role": Role.ASSISTANT.value,
                "text": text,
                "status": status.value,
                "response_id": _uuid(response_id),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            },
        )
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
        rid, cid, bid = _uuid(response_id), _uuid(conversation_id), _uuid(business_id)
        prompt_tokens = usage.prompt_tokens if usage else None
        completion_tokens = usage.completion_tokens if usage else None
        try:
            row = await self._run(
                lambda c: c.fetchrow(
                    _FINISH_ANSWER, rid, bid, cid, text, status.value, prompt_tokens, completion_tokens, seq
                )
            )
            if row is not None:
                return _message(row), _conversation(row, "c_")
            # Stored before (a retry), or no such conversation: the slow path, atomic too.
            stored = await self._run(lambda c: _finish_stored_answer(c, bid, cid, rid, seq))
        except Conflict as exc:
            if "_seq_key" not in exc.message:  # the unique (conversation_id, seq) constraint
                raise
            raise Conflict(f"seq {seq} is already taken in this conversation") from None
        if stored is None:
            raise NotFound("conversation not found")
        return stored

    async def _insert_once(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        key_column: str,
        key: Any,
        values: Mapping[str, Any],
        message_id: uuid.UUID | None = None,
    ) -> tuple[Message, bool]:
        """Insert a message unless one with the same key exists; return it and whether it is new.

        Two statements on purpose: under READ COMMITTED, the SELECT after an INSERT that lost a race
        (ON CONFLICT DO NOTHING) takes a new snapshot and sees the winner's committed row; one
        statement with a CTE would not."""
        columns = ["message_id", "business_id", "conversation_id", *values]
        params = [
            message_id or uuid.UUID(new_id()),
            _uuid(business_id),
            _uuid(conversation_id),
            *values.values(),
        ]
        placeholders = ", ".join(f"${i}" for i in range(4, len(columns) + 1))
        insert = (
            f"INSERT INTO messages ({', '.join(columns)})"
            f" SELECT $1, business_id, conversation_id, {placeholders} FROM conversations"
            " WHERE conversation_id = $3 AND business_id = $2"
            f" ON CONFLICT (conversation_id, {key_column}) DO NOTHING RETURNING {_MESSAGE_COLUMNS}"
        )
        select = (
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            f" WHERE conversation_id = $1 AND business_id = $2 AND {key_column} = $3"
        )

        async def run(c: asyncpg.Connection) -> tuple[asyncpg.Record | None, bool]:
            row = await c.fetchrow(insert, *params)
            if row is not None:
                return row, True
            return await c.fetchrow(select, _uuid(conversation_id), _uuid(business_id), key), False

        row, created = await self._run(run)
        if row is None:
            raise NotFound("conversation not found")
        return _message(row), created

    async def set_message_seq(
        self, business_id: BusinessId, conversation_id: ConversationId, message_id: MessageId, seq: int
    ) -> Conversation:
        try:
            row = await self._run(
                lambda c: c.fetchrow(
                    _SET_MESSAGE_SEQ, _uuid(message_id), _uuid(conversation_id), _uuid(business_id), seq
                )
            )
        except Conflict:
            raise Conflict(f"seq {seq} is already taken in this conversation") from None
        if row is None:
            raise await self._seq_refusal(business_id, conversation_id, message_id)
        return _conversation(row)

    async def _seq_refusal(
        self, business_id: BusinessId, conversation_id: ConversationId, message_id: MessageId
    ) -> CoreError:
        """Why a seq was not recorded: no such message, or it has another seq already."""
        existing = await self._run(
            lambda c: c.fetchval(
                "SELECT seq FROM messages WHERE message_id = $1 AND conversation_id = $2 AND business_id = $3",
                _uuid(message_id),
                _uuid(conversation_id),
                _uuid(business_id),
            )
        )
        if existing is None:
            return NotFound("message not found")
        return Conflict(f"message already has seq {existing}")

    async def list_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, after_seq: int, limit: int
    ) -> list[Message]:
        return await self._messages(
            business_id,
            conversation_id,
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 AND business_id = $2"
            " AND seq > $3 ORDER BY seq LIMIT $4",
            "m.seq",
            after_seq,
            max(limit, 0),
        )

    async def recent_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, limit: int
    ) -> list[Message]:
        return await self._messages(
            business_id,
            conversation_id,
            f"SELECT * FROM (SELECT id, {_MESSAGE_COLUMNS} FROM messages"
            " WHERE conversation_id = $1 AND business_id = $2 ORDER BY id DESC LIMIT $3) AS recent",
            "m.id",
            max(limit, 0),
        )

    async def _messages(
        self, business_id: BusinessId, conversation_id: ConversationId, query: str, order: str, *args: Any
    ) -> list[Message]:
        """Run `query` (messages of $1 and $2) with the conversation's existence check in the same
        statement, ordered by `order`: no row is NotFound; a row of nulls is a conversation without
        such messages."""
        rows = await self._run(
            lambda c: c.fetch(
                f"SELECT {_columns(_MESSAGE_FIELDS, 'm')} FROM conversations"
                f" LEFT JOIN LATERAL ({query}) AS m ON true"
                " WHERE conversations.conversation_id = $1 AND conversations.business_id = $2"
                f" ORDER BY {order}",
                _uuid(conversation_id),
                _uuid(business_id),
                *args,
            )
        )
        if not rows:
            raise NotFound("conversation not found")
        return [_message(r) for r in rows if r["message_id"] is not None]

    # -- connection management ----------------------------------------------------------------

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `work` on a pooled connection, retrying transient failures on a fresh one."""
        pool = self._pool
        if pool is None:
            raise Unavailable("the database is not connected")

        async def attempt() -> T:
            # A full pool queues the query (asyncpg's acquire waits, without a timeout) rather
            # than failing it; the waits are counted so that the pool can be sized (README).
            if pool.get_idle_size() or pool.get_size() < self._pool_size:
                async with pool.acquire() as conn:
                    return await work(conn)
            started = time.perf_counter()
            async with pool.acquire() as conn:
                self.pool_waits += 1
                self.pool_wait_seconds += time.perf_counter() - started
                return await work(conn)

        return await self._retrying(attempt, what="query")

    async def _retrying(self, operation: Callable[[], Awaitable[T]], *, what: str) -> T:
        delay = 0.05
        for attempt in range(1, self._attempts + 1):
            try:
                return await operation()
            except CoreError:
                raise
            except asyncpg.exceptions.UniqueViolationError as exc:
                raise Conflict(f"already exists ({exc.constraint_name})") from exc
            except asyncpg.exceptions.ForeignKeyViolationError as exc:
                raise NotFound(f"a referenced row does not exist ({exc.constraint_name})") from exc
            except _TRANSIENT as exc:
                if attempt == self._attempts:
                    log.warning("database %s failed %d times: %r", what, attempt, exc)
                    raise Unavailable("the database is unavailable", retry_after_ms=1000) from exc
                log.info("database %s failed (attempt %d), retrying: %r", what, attempt, exc)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 3, 1.0)
            except asyncpg.PostgresError as exc:
                log.error("database %s failed: %s (SQLSTATE %s)", what, exc, exc.sqlstate)
                raise CoreError(f"database error {exc.sqlstate}") from exc
        raise AssertionError("unreachable")  # pragma: no cover


OPEN_CONVERSATIONS_SQL = (
    "SELECT c.conversation_id, c.mode, c.current_stage, c.agent_id, c.active_response_id,"
    " c.updated_at, m.role, m.text, m.created_at AS message_at FROM conversations c"
    " LEFT JOIN LATERAL (SELECT role, text, created_at FROM messages"
    " WHERE conversation_id = c.conversation_id AND seq IS NOT NULL ORDER BY seq DESC LIMIT 1)"
    " AS m ON true"
    " WHERE c.business_id = $1 AND c.updated_at >= now() - $2::interval"
    " ORDER BY c.updated_at DESC, c.conversation_id DESC LIMIT $3"
)
"""`list_open_conversations`: ($1 business, $2 how recent, $3 limit). Served by the index
conversations_business_updated, and the newest message by messages' (conversation_id, seq)."""


def audit_query(
    business_id: BusinessId,
    *,
    limit: int,
    conversation_id: ConversationId | None = None,
    actor_id: str | None = None,
    action_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: str | None = None,
) -> tuple[str, list[Any]] | None:
    """`list_audit`'s statement and arguments; None when an id names nothing (nothing matches).
    Each filter has its index: audit_logs_business_{conversation,actor,action}, else
    idx_audit_logs_business."""
    cursor = _audit_cursor(before) if before is not None else None
    where = ["business_id = $1"]
    args: list[Any] = [_uuid(business_id)]

    def match(condition: str, value: Any) -> None:
        args.append(value)
        where.append(condition.replace("?", f"${len(args)}"))

    try:
        if conversation_id is not None:
            match("conversation_id = ?", _uuid(conversation_id))
        if actor_id is not None:
            match("user_id = ?", _uuid(actor_id))
    except NotFound:
        return None  # not an id of ours: it names nothing
    if action_type is not None:
        match("action_type = ?", action_type)
    if since is not None:
        match("created_at >= ?", since)
    if until is not None:
        match("created_at < ?", until)
    if cursor is not None:
        args += cursor
        at, log_id = f"${len(args) - 1}", f"${len(args)}"
        # The plain bound lets an index on created_at start the scan there.
        where.append(f"created_at <= {at} AND (created_at, log_id) < ({at}, {log_id})")
    args.append(max(limit, 0))
    sql = (
        f"SELECT {_AUDIT_COLUMNS} FROM audit_logs WHERE {' AND '.join(where)}"
        f" ORDER BY created_at DESC, log_id DESC LIMIT ${len(args)}"
    )
    return sql, args


_BUSINESS_COLUMNS = "business_id, public_id, name, info, allowed_origins, settings, api_key_previous_until"
_BUSINESS_SELECT = f"SELECT {_BUSINESS_COLUMNS} FROM businesses"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a pooled connection as it is. asyncpg's default reset sends "SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL" on every release: one more round
    trip per statement. This store takes no session advisory lock, opens no cursor, LISTENs to
    nothing and SETs nothing on pooled connections; an open transaction is still rolled back (the
    pool does that before calling this)."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )


def _business(row: asyncpg.Record) -> Business:
    settings = row["settings"] or {}
    defaults = Business(business_id=BusinessId(""), public_id="", name="")
    return Business(
        business_id=BusinessId(str(row["business_id"])),
        public_id=row["public_id"],
        name=row["name"],
        info=row["info"],
        allowed_origins=tuple(row["allowed_origins"]),
        response_template=settings.get("response_template", defaults.response_template),
        system_prompt=settings.get("system_prompt", defaults.system_prompt),
        entry_stage=settings.get("entry_stage", defaults.entry_stage),
        require_origin=bool(settings.get("require_origin", False)),
        identity_secret=settings.get("identity_secret"),
        previous_key_until=row["api_key_previous_until"],
    )


async def _finish_stored_answer(
    c: asyncpg.Connection, bid: uuid.UUID, cid: uuid.UUID, rid: uuid.UUID, seq: int | None
) -> tuple[Message, Conversation] | None:
    """`finish_answer` for an answer stored before: its seq and the active answer, in one
    transaction; None when the answer is not there either (no such conversation)."""
    async with c.transaction():
        row = await c.fetchrow(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages"
            " WHERE conversation_id = $1 AND business_id = $2 AND response_id = $3 FOR UPDATE",
            cid,
            bid,
            rid,
        )
        if row is None:
            return None
        if seq is not None and row["seq"] is None:
            row = await c.fetchrow(
                f"UPDATE messages SET seq = $2 WHERE message_id = $1 RETURNING {_MESSAGE_COLUMNS}",
                row["message_id"],
                seq,
            )
        elif seq is not None and row["seq"] != seq:
            raise Conflict(f"message already has seq {row['seq']}")
        conversation = await c.fetchrow(
            "UPDATE conversations SET last_seq = GREATEST(last_seq, coalesce($3, 0)),"
            " active_response_id = CASE WHEN active_response_id = $4 THEN NULL ELSE active_response_id END,"
            f" updated_at = now() WHERE conversation_id = $1 AND business_id = $2 RETURNING {_CONVERSATION_COLUMNS}",
            cid,
            bid,
            seq,
            rid,
        )
        return _message(row), _conversation(conversation)


def _conversation(row: asyncpg.Record, prefix: str = "") -> Conversation:
    def field(name: str) -> Any:
        return row[prefix + name]

    return Conversation(
        conversation_id=ConversationId(str(field("conversation_id"))),
        business_id=BusinessId(str(field("business_id"))),
        end_user_id=EndUserId(str(field("end_user_id"))),
        mode=Mode(field("mode")),
        stage=StageName(field("current_stage")),
        created_at=field("created_at"),
        data=field("extracted_data") or {},
        active_response_id=ResponseId(str(field("active_response_id")))
        if field("active_response_id")
        else None,
        last_seq=field("last_seq"),
        epoch=field("epoch"),
        turns=field("turns"),
        turns_in_stage=field("turns_in_stage"),
        agent_id=AgentId(str(field("agent_id"))) if field("agent_id") else None,
    )


def _agent(row: asyncpg.Record) -> Agent:
    return Agent(
        agent_id=AgentId(str(row["agent_id"])),
        business_id=BusinessId(str(row["business_id"])),
        name=row["name"],
        disabled=row["disabled"],
        created_at=row["created_at"],
    )


def _audit_cursor(before: str) -> tuple[datetime, uuid.UUID]:
    created_at, log_id = parse_audit_cursor(before)
    return created_at, uuid.UUID(log_id)


def _audit_record(row: asyncpg.Record) -> AuditRecord:
    return AuditRecord(
        log_id=str(row["log_id"]),
        business_id=BusinessId(str(row["business_id"])),
        entry=AuditEntry(
            actor_type=row["actor_type"],
            action_type=row["action_type"],
            action_data=row["action_data"],
            actor_id=str(row["user_id"]) if row["user_id"] else None,
            conversation_id=ConversationId(str(row["conversation_id"])) if row["conversation_id"] else None,
        ),
        created_at=row["created_at"],
    )


def _summary(row: asyncpg.Record) -> ConversationSummary:
    return ConversationSummary(
        conversation_id=ConversationId(str(row["conversation_id"])),
        mode=Mode(row["mode"]),
        stage=StageName(row["current_stage"]),
        agent_id=AgentId(str(row["agent_id"])) if row["agent_id"] else None,
        active_response_id=ResponseId(str(row["active_response_id"])) if row["active_response_id"] else None,
        last_message_role=Role(row["role"]) if row["role"] else None,
        last_message_text=row["text"],
        last_message_at=row["message_at"],
        updated_at=row["updated_at"],
    )


def _message(row: asyncpg.Record) -> Message:
    return Message(
        message_id=MessageId(str(row["message_id"])),
        conversation_id=ConversationId(str(row["conversation_id"])),
        role=Role(row["role"]),
        text=row["text"],
        created_at=row["created_at"],
        seq=row["seq"],
        client_msg_id=row["client_msg_id"],
        status=AnswerStatus(row["status"]) if row["status"] else None,
        response_id=ResponseId(str(row["response_id"])) if row["response_id"] else None,
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        author_id=AgentId(str(row["author_id"])) if row["author_id"] else None,
        author_name=row["author_name"],
    )
