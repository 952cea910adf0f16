"""RedisBroker: conversation events across instances, through Redis.

Implements the Broker contract (core.broker). Per conversation: a hash (`seq`, `epoch`, the active
answer), a capped stream (the replay window; entry ids are the seqs) and a pub/sub channel. A
publish is one server-side script: it checks the answer guard, assigns the seq, appends to the
stream and publishes, so every instance sees one order. Keys expire `ttl` seconds after the last
publish; a conversation whose log expired or was lost (Redis restarted empty) is opened again with a
new epoch, after the store's seq floor.

One pub/sub connection per instance, read by one task that never dies: on a failure it logs, backs
off (capped), reconnects, resubscribes, logs the recovery, and tells the listener `on_gap` for
every subscribed conversation so that their sessions fill what they missed from the streams.

Every other command goes through one bounded, blocking pool with automatic pipelining
(`redis_client.AutoPipelineRedis`): the publishes of many answers in one event-loop tick are one
round trip. The pub/sub connection is outside that pool; redis-py makes it and writes its SUBSCRIBEs, and its
replies are split out of each chunk read (`redis_wire.SubscribedConnection`) rather than read one at a
time through redis-py's `PubSub`: there is one per event delivered. redis-py exceptions stop in
`_call`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import orjson
import redis.asyncio
from redis.exceptions import NoScriptError, RedisError, ResponseError

from core.broker import (
    AnswerBusy,
    AnswerEnded,
    AnswerLease,
    HeldByAgent,
    HumanMode,
    Listener,
    NotHuman,
    StreamMissing,
    Takeover,
)
from core.errors import Unavailable
from core.models import Event, Replay, StreamPosition
from core.types import (
    AgentId,
    AnswerStatus,
    BusinessId,
    ConversationId,
    EventType,
    Mode,
    ResponseId,
    new_id,
)
from gateway.backends.redis_client import (
    DEFAULT_POOL_SIZE,
    auto_pipelined,
    close_quietly,
    translate,
    transport_stats,
)
from gateway.backends.redis_wire import Commands, Reply, SubscribedConnection

log = logging.getLogger(__name__)

T = TypeVar("T")

_REDIS_FAILURES = (RedisError, OSError, TimeoutError)

# Appends one event (the caller checked the log exists): seq, capped stream, TTLs, publish (and
# publish to the business feed when ARGV[9] names its channel, prefixed by ARGV[10], the
# conversation id). KEYS: meta, log, answer. ARGV: channel, type, payload, window, ttl, ...
_APPEND = """
local function append(kind, payload)
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], seq .. '-1', 't', kind, 'p', payload)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[5]) end
  local epoch = redis.call('HGET', KEYS[1], 'epoch')
  local message = seq .. '\\n' .. kind .. '\\n\\n' .. epoch .. '\\n' .. payload
  redis.call('PUBLISH', ARGV[1], message)
  if ARGV[9] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[10] .. '\\n' .. message) end
  return {seq, epoch}
end
"""

# ARGV (after the five above): guard (start|delta|end|none), response_id, delta text.
_PUBLISH = (
    _APPEND
    + """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then return redis.error_reply('MISSING') end
local guard = ARGV[6]
if guard == 'start' then
  if redis.call('HGET', KEYS[1], 'mode') == 'human' then return redis.error_reply('HUMAN') end
  if redis.call('HEXISTS', KEYS[1], 'active') == 1 then return redis.error_reply('BUSY') end
  redis.call('HSET', KEYS[1], 'active', ARGV[7])
  redis.call('DEL', KEYS[3])
elseif guard == 'delta' or guard == 'end' then
  if redis.call('HGET', KEYS[1], 'active') ~= ARGV[7] then return redis.error_reply('ENDED') end
  if guard == 'end' then
    redis.call('HDEL', KEYS[1], 'active')
    redis.call('DEL', KEYS[3])
  else
    redis.call('APPEND', KEYS[3], ARGV[8])
  end
end
return append(ARGV[2], ARGV[3])
"""
)

# ARGV (after the first five; ARGV[2] and ARGV[3] unused): status, response_id or ''.
# Returns {seq, payload}, or nil when there is no such active answer.
_END_ANSWER = (
    _APPEND
    + """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then return redis.error_reply('MISSING') end
local active = redis.call('HGET', KEYS[1], 'active')
if not active or (ARGV[7] ~= '' and ARGV[7] ~= active) then return nil end
local text = redis.call('GET', KEYS[3]) or ''
redis.call('HDEL', KEYS[1], 'active')
redis.call('DEL', KEYS[3])
local payload = cjson.encode({response_id = active, message_id = active, status = ARGV[6], text = text})
local appended = append('ai_end', payload)
return {appended[1], appended[2], payload}
"""
)

# ARGV (after the first five; ARGV[2] and ARGV[3] unused): the epoch the answer started in, its
# ai_end payload. Returns {seq, epoch}, or nil when the log is still that epoch.
_END_LOST_ANSWER = (
    _APPEND
    + """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then return redis.error_reply('MISSING') end
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[6] then return nil end
return append('ai_end', ARGV[7])
"""
)

# ARGV (after the first five; ARGV[2] and ARGV[3] unused): agent id.
# Returns {0} when that agent holds it already, {-1, holder} when another does, else
# {1, mode seq, epoch, mode payload, ai_end seq or '', ai_end payload or ''}.
_TAKE_OVER = (
    _APPEND
    + """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then return redis.error_reply('MISSING') end
if redis.call('HGET', KEYS[1], 'mode') == 'human' then
  local holder = redis.call('HGET', KEYS[1], 'agent') or ''
  if holder == ARGV[6] then return {0} end
  return {-1, holder}
end
local end_seq, end_payload = '', ''
local active = redis.call('HGET', KEYS[1], 'active')
if active then
  local text = redis.call('GET', KEYS[3]) or ''
  redis.call('HDEL', KEYS[1], 'active')
  redis.call('DEL', KEYS[3])
  end_payload = cjson.encode({response_id = active, message_id = active, status = 'taken_over', text = text})
  end_seq = append('ai_end', end_payload)[1]
end
redis.call('HSET', KEYS[1], 'mode', 'human', 'agent', ARGV[6])
local mode_payload = cjson.encode({mode = 'human', agent_id = ARGV[6]})
local appended = append('mode', mode_payload)
return {1, appended[1], appended[2], mode_payload, end_seq, end_payload}
"""
)

# ARGV (after the first five): none. Returns {seq, epoch, payload, former holder}, or nil when the
# mode is ai already.
_HAND_BACK = (
    _APPEND
    + """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then return redis.error_reply('MISSING') end
if redis.call('HGET', KEYS[1], 'mode') ~= 'human' then return nil end
local holder = redis.call('HGET', KEYS[1], 'agent') or ''
redis.call('HSET', KEYS[1], 'mode', 'ai')
redis.call('HDEL', KEYS[1], 'agent')
local payload = cjson.encode({mode = 'ai', agent_id = cjson.null})
local appended = append('mode', payload)
return {appended[1], appended[2], payload, holder}
"""
)

# KEYS: the conversation's presence set. ARGV: member, 1 (came) or 0 (left), ttl in ms. Scores are
# expiry times (Redis server time). Returns 1 when whether anyone is present changed.
_PRESENCE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local before = redis.call('ZCARD', KEYS[1])
if ARGV[2] == '1' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  if before == 0 then return 1 end
  return 0
end
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and before == 1 then return 1 end
return 0
"""

# KEYS: presence sets. ARGV: ttl in ms, then one member per key. Renews each member.
_RENEW_PRESENCE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""

# KEYS: presence sets. Returns, per key, how many members are present now.
_PRESENT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local counts = {}
for i, key in ipairs(KEYS) do counts[i] = redis.call('ZCOUNT', key, now, '+inf') end
return counts
"""

# KEYS: leases. ARGV: member, ttl in ms. Scores are Redis server time, the same for every instance.
_HOLD_LEASE = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[2]), ARGV[1])
return 1
"""

# KEYS: leases. ARGV: ttl in ms, then members. Renews the members still held (a dropped or claimed
# lease is not taken again); returns the positions (1-based) of the others.
_RENEW_LEASES = """
local t = redis.call('TIME')
local deadline = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], deadline, ARGV[i])
  else
    lost[#lost + 1] = i - 1
  end
end
return lost
"""

# KEYS: leases. ARGV: limit. Removes and returns expired members.
_CLAIM_LEASES = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
if #expired > 0 then redis.call('ZREM', KEYS[1], unpack(expired)) end
return expired
"""

# KEYS: meta, log. ARGV: floor, new epoch, ttl, mode, agent id or ''. Returns {epoch, seq}.
_OPEN = """
if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'epoch', ARGV[2], 'mode', ARGV[4])
  if ARGV[4] == 'human' and ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'agent', ARGV[5]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('HMGET', KEYS[1], 'epoch', 'seq')
"""

# KEYS: meta, log. ARGV: after_seq. Returns {epoch, seq, complete (0|1), entries...}.
_REPLAY = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not meta[2] then return redis.error_reply('MISSING') end
local seq = tonumber(meta[2])
local after = tonumber(ARGV[1])
if after > seq then return {meta[1], seq, 0} end
if after == seq then return {meta[1], seq, 1} end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local oldest = seq + 1
if first[1] then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
if after + 1 < oldest then return {meta[1], seq, 0} end
return {meta[1], seq, 1, redis.call('XRANGE', KEYS[2], (after + 1) .. '-1', '+')}
"""

_GUARDS = {EventType.AI_START: "start", EventType.DELTA: "delta", EventType.AI_END: "end"}


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatgw:",
        replay_window: int = 1000,
        ttl: int = 86_400,
        max_backoff: float = 5.0,
        presence_ttl: float = 60.0,
        pool_size: int = DEFAULT_POOL_SIZE,
    ) -> None:
        if replay_window < 1 or ttl < 1 or pool_size < 1:
            raise ValueError("replay_window, ttl and pool_size must be >= 1")
        self._pool_size = pool_size
        self._url = url
        self._prefix = prefix
        self._window = replay_window
        self._ttl = ttl
        self._max_backoff = max_backoff
        self._presence_ms = int(presence_ttl * 1000)
        self._instance_channel = f"{prefix}instance:{new_id()}"
        self._leases_key = f"{prefix}answer-leases"
        self._control_channel = f"{prefix}control"
        self._feed_prefix = f"{prefix}feed:"
        self._conversation_prefix = f"{prefix}conv:"
        self._client: redis.asyncio.Redis | None = None
        self._pubsub_client: redis.asyncio.Redis | None = None
        self._listener: Listener | None = None
        self._channels: set[str] = set()
        self._confirmed: dict[str, asyncio.Event] = {}
        self._pubsub: SubscribedConnection | None = None
        self._commands: Commands | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._scripts: dict[str, Any] = {}
        self.reconnects = 0

    # -- lifecycle ----------------------------------------------------------------------------

    async def connect(self) -> None:
        # No resend after a timeout: the script may have run, and a second run would publish its
        # event twice. The caller gets `Unavailable` and decides.
        self._client = auto_pipelined(
            self._url, pool_size=self._pool_size, timeout=5, resend_after_timeout=False
        )
        # The pub/sub connection is held for the reader's whole life: outside the pool.
        self._pubsub_client = redis.asyncio.Redis.from_url(
            self._url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
        )
        for name, source in (
            ("publish", _PUBLISH),
            ("end_answer", _END_ANSWER),
            ("end_lost_answer", _END_LOST_ANSWER),
            ("take_over", _TAKE_OVER),
            ("hand_back", _HAND_BACK),
            ("open", _OPEN),
            ("replay", _REPLAY),
            ("hold_lease", _HOLD_LEASE),
            ("renew_leases", _RENEW_LEASES),
            ("presence", _PRESENCE),
            ("renew_presence", _RENEW_PRESENCE),
            ("present", _PRESENT),
            ("claim_leases", _CLAIM_LEASES),
        ):
            self._scripts[name] = self._client.register_script(source)
        # The publish script, called once per streamed piece, has a connection of its own.
        self._commands = Commands(self._pubsub_client.connection_pool, timeout_s=5)
        await self.ping()
        self._reader = asyncio.create_task(self._read_loop(), name="redis-broker-reader")
        async with asyncio.timeout(10):
            await self._connected.wait()

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await self._close_pubsub()
        commands, self._commands = self._commands, None
        if commands is not None:
            await commands.close()
        client, self._client = self._client, None
        pubsub_client, self._pubsub_client = self._pubsub_client, None
        await close_quietly(pubsub_client)
        await close_quietly(client)

    async def ping(self) -> None:
        await self._call(lambda c: c.ping())

    def transport_stats(self) -> dict[str, int]:
        """The pipelining client's counters and pool size (`redis_client.transport_stats`), the
        publishing connection's calls and writes counted in as commands and round trips."""
        stats = transport_stats(self._client)
        commands = self._commands
        if stats and commands is not None:
            stats["commands"] += commands.calls
            stats["round_trips"] += commands.writes
        return stats

    def reconnect_count(self) -> int:
        """How often the pub/sub connection was re-established (for metrics)."""
        return self.reconnects

    def set_listener(self, listener: Listener) -> None:
        self._listener = listener

    # -- subscriptions --------------------------------------------------------------------------

    async def subscribe(self, conversation_id: ConversationId) -> None:
        await self._subscribe_channel(self._channel(conversation_id))

    async def _subscribe_channel(self, channel: str) -> None:
        self._channels.add(channel)
        confirmed = self._confirmed.setdefault(channel, asyncio.Event())
        if self._pubsub is None or not self._connected.is_set():
            return  # the reader subscribes everything when it reconnects, and reports a gap
        try:
            await self._pubsub.send("SUBSCRIBE", channel)
            async with asyncio.timeout(5):
                await confirmed.wait()
        except (*_REDIS_FAILURES, TimeoutError) as exc:
            log.warning("subscribe to %s not confirmed: %r", channel, exc)

    async def subscribe_feed(self, business_id: BusinessId) -> None:
        await self._subscribe_channel(self._feed_channel(business_id))

    async def unsubscribe_feed(self, business_id: BusinessId) -> None:
        await self._unsubscribe_channel(self._feed_channel(business_id))

    async def unsubscribe(self, conversation_id: ConversationId) -> None:
        await self._unsubscribe_channel(self._channel(conversation_id))

    async def _unsubscribe_channel(self, channel: str) -> None:
        self._channels.discard(channel)
        self._confirmed.pop(channel, None)
        if self._pubsub is not None and self._connected.is_set():
            try:
                await self._pubsub.send("UNSUBSCRIBE", channel)
            except _REDIS_FAILURES as exc:
                log.warning("unsubscribe from %s failed: %r", channel, exc)

    # -- publishing and replay ------------------------------------------------------------------

    async def publish(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        feed: BusinessId | None = None,
    ) -> Event:
        guard = _GUARDS.get(type, "none")
        encoded = orjson.dumps(dict(payload)).decode()
        arguments = (
            *self._keys(conversation_id),
            self._channel(conversation_id),
            type.value,
            encoded,
            self._window,
            self._ttl,
            guard,
            str(payload.get("response_id", "")),
            str(payload.get("text", "")) if type is EventType.DELTA else "",
            self._feed_channel(feed) if feed else "",
            conversation_id,
        )
        try:
            result = await self._call(lambda c: self._run_publish(c, arguments))
        except ResponseError as exc:
            raise _script_error(exc, conversation_id) from None
        if not isinstance(result, list) or len(result) != 2 or not isinstance(result[1], bytes):
            raise Unavailable(f"redis answered the publish script with {result!r}")
        return Event(conversation_id, type, int(cast(int, result[0])), dict(payload), epoch=_text(result[1]))

    async def _run_publish(self, client: redis.asyncio.Redis, arguments: tuple[str | int, ...]) -> Reply:
        """The publish script on the publishing connection (`redis_wire.Commands`: one write in
        flight, no pool); loaded again through `client` if Redis lost it (a restart)."""
        commands = self._commands
        if commands is None:
            raise Unavailable("the broker is not connected")
        script = self._scripts["publish"]
        try:
            return await commands.call("EVALSHA", script.sha, 3, *arguments)
        except NoScriptError:
            pass
        await client.script_load(_PUBLISH)
        return await commands.call("EVALSHA", script.sha, 3, *arguments)

    async def end_answer(
        self,
        conversation_id: ConversationId,
        status: AnswerStatus,
        *,
        response_id: ResponseId | None = None,
        feed: BusinessId | None = None,
    ) -> Event | None:
        result = await self._control_script(
            "end_answer", conversation_id, feed, status.value, response_id or ""
        )
        if result is None:
            return None
        return Event(
            conversation_id, EventType.AI_END, int(result[0]), orjson.loads(result[2]), epoch=_text(result[1])
        )

    async def end_lost_answer(
        self,
        conversation_id: ConversationId,
        *,
        started_epoch: str,
        response_id: ResponseId,
        status: AnswerStatus,
        text: str,
        feed: BusinessId | None = None,
    ) -> Event | None:
        payload = {
            "response_id": response_id,
            "message_id": response_id,
            "status": status.value,
            "text": text,
        }
        encoded = orjson.dumps(payload).decode()
        result = await self._control_script("end_lost_answer", conversation_id, feed, started_epoch, encoded)
        if result is None:
            return None
        return Event(conversation_id, EventType.AI_END, int(result[0]), payload, epoch=_text(result[1]))

    async def take_over(
        self, conversation_id: ConversationId, agent_id: AgentId, *, feed: BusinessId | None = None
    ) -> Takeover:
        result = await self._control_script("take_over", conversation_id, feed, agent_id)
        if int(result[0]) == 0:
            return Takeover(None, None)
        if int(result[0]) < 0:
            holder = AgentId(_text(result[1])) if result[1] else None
            raise HeldByAgent(f"agent {holder} holds this conversation", holder=holder)
        epoch = _text(result[2])
        mode = Event(conversation_id, EventType.MODE, int(result[1]), orjson.loads(result[3]), epoch=epoch)
        ended = None
        if result[4]:
            ended = Event(
                conversation_id, EventType.AI_END, int(result[4]), orjson.loads(result[5]), epoch=epoch
            )
        return Takeover(ended, mode)

    async def hand_back(
        self, conversation_id: ConversationId, *, feed: BusinessId | None = None
    ) -> tuple[Event, AgentId | None]:
        result = await self._control_script("hand_back", conversation_id, feed)
        if result is None:
            raise NotHuman("the AI already answers in this conversation")
        event = Event(
            conversation_id, EventType.MODE, int(result[0]), orjson.loads(result[2]), epoch=_text(result[1])
        )
        return event, AgentId(_text(result[3])) if result[3] else None

    async def _control_script(
        self, name: str, conversation_id: ConversationId, feed: BusinessId | None, *extra: str
    ) -> Any:
        """Run one of the scripts that end answers or change the mode (ARGV 6 onwards: `extra`)."""
        args: list[Any] = [self._channel(conversation_id), "", "", self._window, self._ttl]
        args += [*extra, *[""] * (3 - len(extra))]
        args += [self._feed_channel(feed) if feed else "", conversation_id]
        try:
            return await self._call(
                lambda c: self._scripts[name](keys=self._keys(conversation_id), args=args, client=c)
            )
        except ResponseError as exc:
            raise _script_error(exc, conversation_id) from None

    async def hold_lease(self, lease: AnswerLease, ttl: float) -> None:
        await self._call(
            lambda c: self._scripts["hold_lease"](
                keys=[self._leases_key], args=[_lease_member(lease), int(ttl * 1000)], client=c
            )
        )

    async def renew_leases(self, leases: Sequence[AnswerLease], ttl: float) -> list[AnswerLease]:
        if not leases:
            return []
        args = [int(ttl * 1000), *(_lease_member(lease) for lease in leases)]
        lost = await self._call(
            lambda c: self._scripts["renew_leases"](keys=[self._leases_key], args=args, client=c)
        )
        return [leases[int(i) - 1] for i in lost]

    async def drop_lease(self, lease: AnswerLease) -> None:
        await self._call(lambda c: c.zrem(self._leases_key, _lease_member(lease)))

    async def claim_expired_leases(self, limit: int) -> list[AnswerLease]:
        members = await self._call(
            lambda c: self._scripts["claim_leases"](keys=[self._leases_key], args=[limit], client=c)
        )
        leases = []
        for member in members:
            try:
                bid, cid, rid = _text(member).split("|")
            except ValueError:
                log.warning("unreadable answer lease dropped: %r", member)
                continue
            leases.append(AnswerLease(BusinessId(bid), ConversationId(cid), ResponseId(rid)))
        return leases

    async def publish_control(self, message: Mapping[str, Any]) -> None:
        encoded = orjson.dumps(dict(message)).decode()
        await self._call(lambda c: c.publish(self._control_channel, encoded))

    async def publish_ephemeral(
        self,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
        *,
        origin: str | None = None,
    ) -> None:
        message = f"\n{type.value}\n{origin or ''}\n\n{orjson.dumps(dict(payload)).decode()}"
        await self._call(lambda c: c.publish(self._channel(conversation_id), message))

    async def publish_feed(
        self,
        business_id: BusinessId,
        conversation_id: ConversationId,
        type: EventType,
        payload: Mapping[str, Any],
    ) -> None:
        message = f"{conversation_id}\n\n{type.value}\n\n\n{orjson.dumps(dict(payload)).decode()}"
        await self._call(lambda c: c.publish(self._feed_channel(business_id), message))

    async def set_presence(self, conversation_id: ConversationId, member: str, present: bool) -> bool:
        args = [member, "1" if present else "0", self._presence_ms]
        changed = await self._call(
            lambda c: self._scripts["presence"](
                keys=[self._presence_key(conversation_id)], args=args, client=c
            )
        )
        return bool(int(changed))

    async def renew_presence(self, members: Mapping[str, ConversationId]) -> None:
        if not members:
            return
        keys = [self._presence_key(cid) for cid in members.values()]
        args = [self._presence_ms, *members.keys()]
        await self._call(lambda c: self._scripts["renew_presence"](keys=keys, args=args, client=c))

    async def present(self, conversation_ids: list[ConversationId]) -> set[ConversationId]:
        if not conversation_ids:
            return set()
        keys = [self._presence_key(cid) for cid in conversation_ids]
        counts = await self._call(lambda c: self._scripts["present"](keys=keys, client=c))
        return {cid for cid, count in zip(conversation_ids, counts, strict=True) if int(count) > 0}

    def _presence_key(self, conversation_id: ConversationId) -> str:
        return f"{self._prefix}{{conv:{conversation_id}}}:presence"

    async def open(
        self,
        conversation_id: ConversationId,
        *,
        floor_seq: int,
        mode: Mode = Mode.AI,
        agent_id: AgentId | None = None,
    ) -> StreamPosition:
        args = [max(floor_seq, 0), new_id()[:8], self._ttl, mode.value, agent_id or ""]
        epoch, seq = await self._call(
            lambda c: self._scripts["open"](keys=self._keys(conversation_id), args=args, client=c)
        )
        return StreamPosition(_text(epoch), int(seq))

    async def replay(self, conversation_id: ConversationId, after_seq: int) -> Replay:
        try:
            result = await self._call(
                lambda c: self._scripts["replay"](
                    keys=self._keys(conversation_id), args=[after_seq], client=c
                )
            )
        except ResponseError as exc:
            raise _script_error(exc, conversation_id) from None
        position = StreamPosition(_text(result[0]), int(result[1]))
        if int(result[2]) == 0:
            return Replay(position, None)
        entries = result[3] if len(result) > 3 else []
        return Replay(
            position, tuple(_entry_event(conversation_id, entry, position.epoch) for entry in entries)
        )

    # -- the reader -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read the pub/sub connection forever; on a failure reconnect and report gaps."""
        backoff = 0.1
        first = True
        while True:
            try:
                await self._open_pubsub()
                if not first:
                    self.reconnects += 1
                    log.warning("redis pub/sub reconnected: resubscribed to %d channels", len(self._channels))
                    self._report_gaps()
                first = False
                backoff = 0.1
                await self._pump()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                log.warning("redis pub/sub failed, retrying in %.1f s: %r", backoff, exc)
                await self._close_pubsub()
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self._max_backoff)

    async def _open_pubsub(self) -> None:
        """Subscribe everything on a new connection; return once Redis confirmed it."""
        assert self._pubsub_client is not None
        subscription = await SubscribedConnection.open(self._pubsub_client.connection_pool, timeout_s=5.0)
        try:
            # The instance channel keeps at least one subscription, and its confirmation (the
            # first reply) says the connection is subscribed; replies after it are handled as usual.
            opened = self._confirmed[self._instance_channel] = asyncio.Event()
            sent = set(self._channels)
            await subscription.send("SUBSCRIBE", self._instance_channel, self._control_channel, *sent)
            async with asyncio.timeout(5):
                while not opened.is_set():
                    self._handle(await subscription.read())
        except BaseException:
            await subscription.close()
            raise
        self._pubsub = subscription
        self._connected.set()
        # Channels subscribed or dropped while this connection was being opened.
        if late := self._channels - sent:
            await subscription.send("SUBSCRIBE", *late)
        if gone := sent - self._channels:
            await subscription.send("UNSUBSCRIBE", *gone)

    async def _pump(self) -> None:
        subscription = self._pubsub
        assert subscription is not None
        while True:
            self._handle(await subscription.read())

    def _handle(self, replies: list[Reply]) -> None:
        for reply in replies:
            if type(reply) is not list:
                if isinstance(reply, ResponseError):
                    raise reply  # a command on this connection refused: start again on a new one
                continue
            kind, channel = reply[0], _text(cast(bytes, reply[1]))
            if kind == b"message":
                data = cast(bytes, reply[2])
                if channel.startswith(self._conversation_prefix):
                    self._dispatch(channel, data)
                elif channel == self._control_channel:
                    self._control(data)
                elif channel.startswith(self._feed_prefix):
                    self._dispatch_feed(channel, data)
            elif kind == b"subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()

    def _dispatch(self, channel: str, data: bytes) -> None:
        if self._listener is None:
            return
        event = _decode_event(ConversationId(channel[len(self._conversation_prefix) :]), data)
        if event is None:
            log.warning("unreadable event on %s dropped", channel)
            return
        try:
            self._listener.on_event(event)
        except Exception:  # a listener bug must not stop the reader
            log.exception("event listener failed", extra={"conversation_id": event.conversation_id})

    def _dispatch_feed(self, channel: str, data: bytes) -> None:
        if self._listener is None:
            return
        conversation_id, _, rest = data.partition(b"\n")
        event = _decode_event(ConversationId(_text(conversation_id)), rest)
        if event is None:
            log.warning("unreadable event on %s dropped", channel)
            return
        try:
            self._listener.on_feed(BusinessId(channel[len(self._feed_prefix) :]), event)
        except Exception:
            log.exception("feed listener failed")

    def _control(self, data: bytes) -> None:
        if self._listener is None:
            return
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            log.warning("unreadable control message dropped")
            return
        try:
            self._listener.on_control(message)
        except Exception:
            log.exception("control listener failed")

    def _report_gaps(self) -> None:
        if self._listener is None:
            return
        for channel in tuple(self._channels):
            if channel.startswith(self._feed_prefix):
                continue  # the feed is a live view; conversation subscribers fill their own gaps
            self._listener.on_gap(ConversationId(channel[len(self._conversation_prefix) :]))

    async def _close_pubsub(self) -> None:
        subscription, self._pubsub = self._pubsub, None
        if subscription is not None:
            await subscription.close()

    # -- helpers --------------------------------------------------------------------------------

    def _feed_channel(self, business_id: BusinessId) -> str:
        return f"{self._feed_prefix}{business_id}"

    def _channel(self, conversation_id: ConversationId) -> str:
        return f"{self._conversation_prefix}{conversation_id}"

    def _keys(self, conversation_id: ConversationId) -> list[str]:
        # One hash tag per conversation: a cluster keeps a conversation's keys on one node.
        base = f"{self._prefix}{{conv:{conversation_id}}}"
        return [f"{base}:meta", f"{base}:log", f"{base}:answer"]

    async def _call(self, operation: Callable[[redis.asyncio.Redis], Awaitable[T]]) -> T:
        """Run `operation` on the pipelining client. A script's own refusal (an error reply of one
        word, such as MISSING or ENDED) stays a `ResponseError` for the caller to translate
        (`_script_error`); every other failure becomes a core error here (`translate`)."""
        client = self._client
        if client is None:
            raise Unavailable("the broker is not connected")
        try:
            return await operation(client)
        except ResponseError as exc:
            if type(exc) is ResponseError and " " not in str(exc):
                raise
            raise translate(exc, "the broker") from exc
        except _REDIS_FAILURES as exc:
            raise translate(exc, "the broker") from exc


def _script_error(exc: ResponseError, conversation_id: ConversationId) -> Exception:
    text = str(exc)
    if "MISSING" in text:
        return StreamMissing(f"no event log for conversation {conversation_id}")
    if "ENDED" in text:
        return AnswerEnded(f"the answer in conversation {conversation_id} has ended")
    if "BUSY" in text:
        return AnswerBusy(f"another answer in conversation {conversation_id} has not ended yet")
    if "HUMAN" in text:
        return HumanMode(f"an agent holds conversation {conversation_id}: no AI answer")
    return Unavailable(f"redis refused the script: {text}")


def _decode_event(conversation_id: ConversationId, data: bytes) -> Event | None:
    """An event from its pub/sub form "seq\\ntype\\norigin\\nepoch\\npayload"; None if unreadable."""
    try:
        seq, type_, origin, epoch, payload = data.split(b"\n", 4)
        return Event(
            conversation_id,
            EventType(type_.decode()),
            int(seq) if seq else None,
            orjson.loads(payload),
            origin.decode() or None,
            epoch.decode() or None,
        )
    except (ValueError, orjson.JSONDecodeError):
        return None


def _lease_member(lease: AnswerLease) -> str:
    return f"{lease.business_id}|{lease.conversation_id}|{lease.response_id}"


def _entry_event(conversation_id: ConversationId, entry: Any, epoch: str) -> Event:
    entry_id, fields = entry
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return Event(
        conversation_id,
        EventType(_text(values[b"t"])),
        int(_text(entry_id).split("-", 1)[0]),
        orjson.loads(values[b"p"]),
        epoch=epoch,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
