"""The conversation-state cache (the message-handling guide's RedisStateManager).

`RedisStateCache` keeps copies of `Conversation` records in Redis with a TTL; `CachedStore` puts it
in front of any Store: reads go through it, writes go to the Store and then refresh it with the
state the write returned (no read after a write). The Store
stays the source of truth and Redis never holds the only copy of anything, so losing Redis (or
flushing it) costs latency, never data. Redis types and exceptions stop in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, TypeVar

import orjson
import redis.asyncio
from redis.exceptions import RedisError

from core.errors import Conflict, CoreError, Forbidden, InvalidInput, NotFound, Unavailable
from core.flow_models import Flow
from core.keyed_lock import KeyedLock
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
from core.store import Store
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
from gateway.backends.redis_client import DEFAULT_POOL_SIZE, auto_pipelined, close_quietly, describe

log = logging.getLogger(__name__)

T = TypeVar("T")
W = TypeVar("W")

DEFAULT_TTL: Final = 3600
_FORMAT: Final = 3  # stored in every value: a value of another format is a miss, not a wrong state
_REDIS_FAILURES: Final = (RedisError, OSError, TimeoutError)
# Store errors after which the write certainly did not happen (the contract's definite failures).
_NOT_WRITTEN: Final = (NotFound, Forbidden, Conflict, InvalidInput)


class RedisStateCache:
    """Copies of conversation state in Redis, one key a conversation, each with a TTL.

    Guarantees:

    - `get` returns a `Conversation` equal to the one last `put` for that id, or None (never
      stored, expired, dropped, or unreadable: a value that does not parse is dropped and is a
      miss). `put` refuses (`InvalidInput`) a conversation it could not read back equal.
    - Every stored value expires after `ttl` seconds; nothing here is the only copy of anything.
    - Redis failures (errors, refused connections, timeouts) are `Unavailable`; no redis type leaks.
      Operations fail fast: short socket timeouts and a single reconnect attempt.
    - Commands go through a bounded, blocking pool of `pool_size` connections, and those issued in
      one event-loop tick (by many conversations) are one pipeline: one round trip.

    Key: ``{prefix}conv:{conversation_id}:state``; the value is JSON (orjson).
    """

    def __init__(
        self, url: str, *, prefix: str, ttl: int = DEFAULT_TTL, pool_size: int = DEFAULT_POOL_SIZE
    ) -> None:
        if not url:
            raise ValueError("the state cache needs a Redis URL")
        if ttl < 1:
            raise ValueError("the state cache TTL must be >= 1 second")
        if pool_size < 1:
            raise ValueError("the state cache pool size must be >= 1")
        self._url = url
        self._pool_size = pool_size
        self._prefix = prefix
        self._ttl = ttl
        self._client: redis.asyncio.Redis | None = None

    @property
    def ttl(self) -> int:
        return self._ttl

    def key(self, conversation_id: ConversationId) -> str:
        return f"{self._prefix}conv:{conversation_id}:state"

    async def connect(self) -> None:
        """Create the client. Does not contact Redis: a cache that is down must not stop a start."""
        if self._client is None:
            # One resend (every command here is safe to run twice), not more: a cache that does
            # not answer at once is bypassed, not waited for.
            self._client = auto_pipelined(
                self._url, pool_size=self._pool_size, timeout=2, resend_after_timeout=True
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        await close_quietly(client)

    async def ping(self) -> None:
        await self._call(lambda client: client.ping())

    async def get(self, conversation_id: ConversationId) -> Conversation | None:
        key = self.key(conversation_id)
        raw = await self._call(lambda client: client.get(key))
        if raw is None:
            return None
        try:
            return _decode(raw)
        except ValueError:
            log.warning(
                "unreadable conversation state dropped from the cache",
                extra={"conversation_id": conversation_id},
            )
            await self.drop(conversation_id)
            return None

    async def put(self, conversation: Conversation, *, only_if_absent: bool = False) -> None:
        """Store the state for `ttl` seconds. `only_if_absent` leaves a value already there in place
        (a read that fills a miss must not overwrite the fresher state a write put meanwhile)."""
        raw = _encode(conversation)
        key = self.key(conversation.conversation_id)
        await self._call(lambda client: client.set(key, raw, ex=self._ttl, nx=only_if_absent))

    async def drop(self, conversation_id: ConversationId) -> None:
        key = self.key(conversation_id)
        await self._call(lambda client: client.unlink(key))

    async def drop_all(self) -> int:
        """Delete every conversation state under this prefix; return how many keys went. Scans the
        keyspace: for the rare case where the caller cannot tell which conversation changed."""
        pattern = f"{_glob_escape(self._prefix)}conv:*:state"

        async def scan_and_unlink(client: redis.asyncio.Redis) -> int:
            dropped = 0
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    dropped += await client.unlink(*batch)
                    batch.clear()
            if batch:
                dropped += await client.unlink(*batch)
            return dropped

        return await self._call(scan_and_unlink)

    async def _call(self, operation: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise Unavailable("the state cache is not connected")
        try:
            return await operation(client)
        except _REDIS_FAILURES as exc:
            raise Unavailable(f"the state cache failed: {describe(exc)}") from exc


@dataclass(slots=True)
class _Writes:
    """This process's state writes of one conversation: how many run now, and the newest one's
    number (numbers grow with the start of each write)."""

    running: int = 0
    latest: int = 0


def _state_of(result: object) -> Conversation | None:
    """The conversation state a write returned, if it returned one."""
    return result if isinstance(result, Conversation) else None


class CachedStore:
    """A Store whose conversation state is read through and written through a `RedisStateCache`.

    It keeps the whole Store contract (core.store): `inner` does every write and enforces it; only
    `get_conversation` may be answered from the cache. Guarantees on top:

    - Source of truth: the cache only ever receives a state `inner` returned. After a successful
      state write (`create_conversation`, `set_active_response`, `set_epoch`, `set_message_seq`,
      `record_turn`, `finish_answer`, `set_mode`), the state that write returned is stored, so the next read
      here returns the write, at no extra read of `inner`. When other writes of the conversation
      overlapped it in this process (their order in `inner` is unknown here), the state is re-read
      from `inner` instead, under the lock, so a refresh never stores an older state than one
      stored before it in this process.
    - Tenancy holds with a warm cache: a cached state is returned only to its own business; any
      other business's read goes to `inner`, which answers `NotFound` as it always does.
    - The cache is never a point of failure: when Redis fails, calls are served by `inner` alone,
      one warning is logged per outage ("state cache recovered" when it works again), and Redis is
      not tried again for `retry_after` seconds, so an outage costs no timeouts per request.
    - No stale state is trusted after a write from this process. When a write's new state cannot
      be stored and the old one cannot be deleted either (Redis down), or a write ends in a way that
      leaves its outcome unknown (`Unavailable`, a timeout, a cancellation), the whole cache is
      distrusted: reads bypass it and fill nothing, until a flush of the prefix has succeeded
      (tried again on reads once Redis answers). Outages are rare; a flush after one is cheap.
    - Ordering in this process: refreshes and miss-fills of one conversation run under a lock, a
      write's own result is stored only if no other write of the conversation started since it
      did or ran when it started, and a miss-fill never overwrites a value already there (a
      write's refresh may have put it).

    Limits: the distrust and the locks are per process. Two processes writing the same
    conversation at once may leave the older of their two refreshes in Redis until the next write
    or the TTL; a process that could not reach Redis during a write protects only its own reads.
    """

    def __init__(self, inner: Store, cache: RedisStateCache, *, retry_after: float = 5.0) -> None:
        self._inner = inner
        self._cache = cache
        self._retry_after = retry_after
        self._cache_down = False
        self._retry_at = 0.0
        # Times the cache may have been left stale, and how many of those a flush has covered.
        self._stale_marks = 0
        self._flushed_marks = 0
        self._flushing: asyncio.Future[None] | None = None  # the flush in progress, shared
        self._locks: KeyedLock[ConversationId] = KeyedLock()
        self._writes: dict[ConversationId, _Writes] = {}
        self._write_numbers = itertools.count(1)

    @property
    def cache(self) -> RedisStateCache:
        return self._cache

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        await self._inner.connect()
        await self._cache.connect()

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._cache.close()

    async def ping(self) -> None:
        """Ping the store (the source of truth); see `cache_ping` for the cache."""
        await self._inner.ping()

    async def cache_ping(self) -> None:
        """Return when Redis answers; raise `Unavailable` otherwise (a readiness detail: the
        store works without it)."""
        await self._cache.ping()

    # -- delegated unchanged --------------------------------------------------------------------

    async def ensure_business(self, business: Business) -> Business:
        return await self._inner.ensure_business(business)

    async def get_business(self, business_id: BusinessId) -> Business:
        return await self._inner.get_business(business_id)

    async def get_business_by_public_id(self, public_id: str) -> Business:
        return await self._inner.get_business_by_public_id(public_id)

    async def create_end_user(self, business_id: BusinessId, external_id: str | None) -> EndUserId:
        return await self._inner.create_end_user(business_id, external_id)

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
        return await self._inner.add_user_message(
            business_id, conversation_id, client_msg_id, text, role=role, author=author
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
        return await self._inner.add_assistant_message(
            business_id, conversation_id, response_id, text, status, usage=usage
        )

    async def list_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, after_seq: int, limit: int
    ) -> list[Message]:
        return await self._inner.list_messages(business_id, conversation_id, after_seq=after_seq, limit=limit)

    async def recent_messages(
        self, business_id: BusinessId, conversation_id: ConversationId, *, limit: int
    ) -> list[Message]:
        return await self._inner.recent_messages(business_id, conversation_id, limit=limit)

    async def ensure_end_user(self, business_id: BusinessId, external_id: str) -> EndUserId:
        return await self._inner.ensure_end_user(business_id, external_id)

    async def update_business(
        self,
        business_id: BusinessId,
        *,
        allowed_origins: tuple[str, ...] | None = None,
        require_origin: bool | None = None,
        audit: AuditEntry,
    ) -> Business:
        return await self._inner.update_business(
            business_id, allowed_origins=allowed_origins, require_origin=require_origin, audit=audit
        )

    async def set_identity_secret(
        self, business_id: BusinessId, secret: str | None, *, audit: AuditEntry
    ) -> Business:
        return await self._inner.set_identity_secret(business_id, secret, audit=audit)

    async def set_api_key(self, business_id: BusinessId, key_hash: str) -> None:
        await self._inner.set_api_key(business_id, key_hash)

    async def rotate_api_key(
        self, business_id: BusinessId, key_hash: str, *, previous_until: datetime, audit: AuditEntry
    ) -> Business:
        return await self._inner.rotate_api_key(
            business_id, key_hash, previous_until=previous_until, audit=audit
        )

    async def revoke_previous_api_key(self, business_id: BusinessId, *, audit: AuditEntry) -> bool:
        return await self._inner.revoke_previous_api_key(business_id, audit=audit)

    async def get_business_by_api_key(self, key_hash: str) -> Business:
        return await self._inner.get_business_by_api_key(key_hash)

    async def claim_setting(self, name: str, proposed: str, *, replace: bool = False) -> str:
        return await self._inner.claim_setting(name, proposed, replace=replace)

    async def get_flow(self, business_id: BusinessId) -> Flow:
        return await self._inner.get_flow(business_id)

    async def save_flow(
        self, business_id: BusinessId, flow: Flow, *, expected_version: int, audit: AuditEntry
    ) -> Flow:
        return await self._inner.save_flow(business_id, flow, expected_version=expected_version, audit=audit)

    async def add_audit(self, business_id: BusinessId, entry: AuditEntry) -> None:
        await self._inner.add_audit(business_id, entry)

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
        return await self._inner.list_audit(
            business_id,
            limit=limit,
            conversation_id=conversation_id,
            actor_id=actor_id,
            action_type=action_type,
            since=since,
            until=until,
            before=before,
        )

    async def create_agent(self, business_id: BusinessId, name: str) -> Agent:
        return await self._inner.create_agent(business_id, name)

    async def get_agent(self, business_id: BusinessId, agent_id: AgentId) -> Agent:
        return await self._inner.get_agent(business_id, agent_id)

    async def list_agents(self, business_id: BusinessId) -> list[Agent]:
        return await self._inner.list_agents(business_id)

    async def set_agent_disabled(self, business_id: BusinessId, agent_id: AgentId, disabled: bool) -> Agent:
        return await self._inner.set_agent_disabled(business_id, agent_id, disabled)

    async def count_active_conversations(self, *, active_within_s: int) -> dict[Mode, int]:
        return await self._inner.count_active_conversations(active_within_s=active_within_s)

    async def list_open_conversations(
        self, business_id: BusinessId, *, active_within_s: int, limit: int
    ) -> list[ConversationSummary]:
        # A listing across conversations: the store answers it (the cache holds single states).
        return await self._inner.list_open_conversations(
            business_id, active_within_s=active_within_s, limit=limit
        )

    # -- conversation state ---------------------------------------------------------------------

    async def record_turn(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        *,
        stage: StageName,
        data: Mapping[str, Any],
        answering: ResponseId | None = None,
    ) -> Conversation:
        return await self._write(
            business_id,
            conversation_id,
            lambda: self._inner.record_turn(
                business_id, conversation_id, stage=stage, data=data, answering=answering
            ),
        )

    async def set_mode(
        self, business_id: BusinessId, conversation_id: ConversationId, mode: Mode, agent_id: AgentId | None
    ) -> Conversation:
        recorded: list[Conversation] = []

        async def write() -> None:
            recorded.append(await self._inner.set_mode(business_id, conversation_id, mode, agent_id))

        await self._write(business_id, conversation_id, write)
        return recorded[0]

    async def get_conversation(
        self, business_id: BusinessId, conversation_id: ConversationId
    ) -> Conversation:
        if not self._trusted:
            await self._flush()
        if self._trusted:
            try:
                cached = await self._cache_call(lambda: self._cache.get(conversation_id))
            except Unavailable:
                cached = None
            if cached is not None:
                if cached.business_id == business_id:
                    return cached
                # Another business: answer exactly as the store does (NotFound), from the store.
                return await self._inner.get_conversation(business_id, conversation_id)
        return await self._load(business_id, conversation_id)

    async def create_conversation(
        self, business_id: BusinessId, end_user_id: EndUserId, stage: StageName
    ) -> Conversation:
        conversation = await self._inner.create_conversation(business_id, end_user_id, stage)
        # The id is new: nobody else can have written the conversation yet, so the returned
        # state is the stored one and needs no re-read.
        await self._refresh(business_id, conversation.conversation_id, conversation)
        return conversation

    async def set_active_response(
        self, business_id: BusinessId, conversation_id: ConversationId, response_id: ResponseId | None
    ) -> Conversation:
        return await self._write(
            business_id,
            conversation_id,
            lambda: self._inner.set_active_response(business_id, conversation_id, response_id),
        )

    async def set_epoch(
        self, business_id: BusinessId, conversation_id: ConversationId, epoch: str
    ) -> Conversation:
        return await self._write(
            business_id, conversation_id, lambda: self._inner.set_epoch(business_id, conversation_id, epoch)
        )

    async def set_message_seq(
        self, business_id: BusinessId, conversation_id: ConversationId, message_id: MessageId, seq: int
    ) -> Conversation:
        # It may raise the conversation's last_seq: a state write like the others.
        return await self._write(
            business_id,
            conversation_id,
            lambda: self._inner.set_message_seq(business_id, conversation_id, message_id, seq),
        )

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
        return await self._write(
            business_id,
            conversation_id,
            lambda: self._inner.finish_answer(
                business_id, conversation_id, response_id, text, status, seq=seq, usage=usage
            ),
            state=lambda finished: finished[1],
        )

    # -- internals ------------------------------------------------------------------------------

    @property
    def _trusted(self) -> bool:
        return self._stale_marks == self._flushed_marks

    def _mark_stale(self) -> None:
        if self._trusted:
            log.warning("the state cache may hold stale state: distrusting it until it is flushed")
        self._stale_marks += 1

    async def _write(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        write: Callable[[], Awaitable[W]],
        *,
        state: Callable[[W], Conversation | None] = _state_of,
    ) -> W:
        """Run a state write of `inner`, then refresh the cache with the state it returned (or, if
        other writes of the conversation overlapped it in this process, with a re-read)."""
        writes = self._writes.setdefault(conversation_id, _Writes())
        mine = next(self._write_numbers)
        alone = writes.running == 0
        writes.running += 1
        writes.latest = mine
        try:
            try:
                result = await write()
            except _NOT_WRITTEN:
                raise
            except BaseException:
                self._mark_stale()  # it may have been written all the same
                raise
            finally:
                writes.running -= 1
            # What the write returned is the newest state this process knows of if no other write
            # of the conversation ran from this one's start until its refresh (checked under the
            # conversation's lock, which orders refreshes).
            await self._refresh(
                business_id, conversation_id, state(result), fresh=lambda: alone and writes.latest == mine
            )
            return result
        finally:
            if writes.running == 0 and writes.latest == mine and self._writes.get(conversation_id) is writes:
                del self._writes[conversation_id]

    async def _refresh(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        conversation: Conversation | None = None,
        *,
        fresh: Callable[[], bool] = lambda: True,
    ) -> None:
        """After a write: make the cached state `conversation` when it is `fresh`, else the one
        `inner` holds now; or delete it."""
        try:
            async with self._locks.hold(conversation_id):
                if conversation is None or not fresh():
                    try:
                        conversation = await self._inner.get_conversation(business_id, conversation_id)
                    except CoreError as exc:
                        # The write is durable; only its result cannot be read now. Not the
                        # caller's failure: invalidate instead of raising.
                        log.warning(
                            "state re-read after a write failed: %s",
                            exc.message,
                            extra={"conversation_id": conversation_id},
                        )
                        await self._invalidate(conversation_id)
                        return
                state = conversation
                try:
                    await self._cache_call(lambda: self._cache.put(state))
                except (Unavailable, InvalidInput):
                    await self._invalidate(conversation_id)
        except BaseException:
            self._mark_stale()  # cancelled or broken half-way: the key may hold the old state
            raise

    async def _load(self, business_id: BusinessId, conversation_id: ConversationId) -> Conversation:
        """A read the cache could not answer: from `inner`, then fill the cache if it may be."""
        async with self._locks.hold(conversation_id):
            marks = self._stale_marks
            conversation = await self._inner.get_conversation(business_id, conversation_id)
            if self._trusted and marks == self._stale_marks:
                # A value there now can only come from a write's refresh: fresher, keep it.
                with contextlib.suppress(Unavailable, InvalidInput):
                    await self._cache_call(lambda: self._cache.put(conversation, only_if_absent=True))
            return conversation

    async def _invalidate(self, conversation_id: ConversationId) -> None:
        try:
            await self._cache_call(lambda: self._cache.drop(conversation_id))
        except Unavailable:
            self._mark_stale()

    async def _flush(self) -> None:
        """Drop every cached state; trust the cache again if nothing went stale meanwhile.

        One flush at a time: every read that finds the cache distrusted waits for the flush in
        progress instead of starting its own (under load, hundreds of reads a second each ran a
        scan and delete of every key)."""
        if self._flushing is None:
            flushing = asyncio.ensure_future(self._flush_once())
            self._flushing = flushing
            flushing.add_done_callback(self._flushed)
        await asyncio.shield(self._flushing)

    def _flushed(self, future: asyncio.Future[None]) -> None:
        if self._flushing is future:
            self._flushing = None
        if not future.cancelled():
            future.exception()  # retrieved: a failure is the waiting reads' to see

    async def _flush_once(self) -> None:
        marks = self._stale_marks
        try:
            dropped = await self._cache_call(self._cache.drop_all)
        except Unavailable:
            return
        log.warning("state cache flushed (%d conversations); trusting it again", dropped)
        self._flushed_marks = marks

    def _cache_paused(self) -> bool:
        return self._cache_down and time.monotonic() < self._retry_at

    async def _cache_call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """One cache operation, with the outage bookkeeping; `Unavailable` when it cannot be done."""
        if self._cache_paused():
            raise Unavailable("the state cache is paused after a failure")
        if self._cache_down:
            self._retry_at = time.monotonic() + self._retry_after  # one probe at a time
        try:
            result = await operation()
        except Unavailable as exc:
            if not self._cache_down:
                log.warning("state cache unavailable, serving from the store: %s", exc.message)
                self._cache_down = True
            self._retry_at = time.monotonic() + self._retry_after
            raise
        if self._cache_down:
            self._cache_down = False
            log.warning("state cache recovered")
        return result


# -- the stored form ------------------------------------------------------------------------------


def _encode(conversation: Conversation) -> bytes:
    try:
        raw = orjson.dumps(
            {
                "v": _FORMAT,
                "conversation_id": conversation.conversation_id,
                "business_id": conversation.business_id,
                "end_user_id": conversation.end_user_id,
                "mode": conversation.mode.value,
                "stage": conversation.stage,
                "created_at": conversation.created_at.isoformat(),
                "data": dict(conversation.data),
                "active_response_id": conversation.active_response_id,
                "last_seq": conversation.last_seq,
                "epoch": conversation.epoch,
                "turns": conversation.turns,
                "turns_in_stage": conversation.turns_in_stage,
                "agent_id": conversation.agent_id,
            }
        )
        # JSON cannot carry every Python value (tuples, non-string keys, ...): cache only what
        # reads back equal, so that a hit is always the state that was put.
        if _decode(raw) == conversation:
            return raw
    except (TypeError, ValueError):
        pass
    raise InvalidInput("the conversation state is not representable as JSON")


def _decode(raw: bytes | str) -> Conversation:
    """The stored conversation, or ValueError when `raw` is not one."""
    value = orjson.loads(raw)
    if not isinstance(value, dict) or value.get("v") != _FORMAT:
        raise ValueError("not a conversation state of this format")
    data = value.get("data")
    if not isinstance(data, dict):
        raise ValueError("data is not an object")
    active = _optional_text(value, "active_response_id")
    agent = _optional_text(value, "agent_id")
    return Conversation(
        conversation_id=ConversationId(_text(value, "conversation_id")),
        business_id=BusinessId(_text(value, "business_id")),
        end_user_id=EndUserId(_text(value, "end_user_id")),
        mode=Mode(_text(value, "mode")),
        stage=StageName(_text(value, "stage")),
        created_at=datetime.fromisoformat(_text(value, "created_at")),
        data=data,
        active_response_id=ResponseId(active) if active is not None else None,
        last_seq=_int(value, "last_seq"),
        epoch=_optional_text(value, "epoch"),
        turns=_int(value, "turns"),
        turns_in_stage=_int(value, "turns_in_stage"),
        agent_id=AgentId(agent) if agent is not None else None,
    )


def _int(value: Mapping[str, Any], name: str) -> int:
    field = value.get(name)
    if not isinstance(field, int) or isinstance(field, bool):
        raise ValueError(f"{name} is not an integer")
    return field


def _text(value: Mapping[str, Any], name: str) -> str:
    field = value.get(name)
    if not isinstance(field, str):
        raise ValueError(f"{name} is not a string")
    return field


def _optional_text(value: Mapping[str, Any], name: str) -> str | None:
    field = value.get(name)
    if field is not None and not isinstance(field, str):
        raise ValueError(f"{name} is not a string or null")
    return field


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)
