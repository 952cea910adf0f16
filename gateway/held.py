"""Counts of things held open (sockets per address, per conversation), shared by every instance
through Redis.

Per counted key, a sorted set of holders (one member per open socket) scored by when the member
expires, in Redis server time. Taking a place is one script: drop the expired members, count the
rest, add the new one if under the maximum, set the key's TTL. Letting go is ZREM. Each instance
renews the expiry of all its members in one script call every `renew_s`; an instance that dies
stops renewing, and its members drop out within `expiry_s`.

Written here rather than taken from a library: the `limits` library counts rates, not things held
open, and a Redis semaphore library would add a client and a dependency for two short scripts.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

EXPIRY_S = 60.0
RENEW_S = 20.0

# KEYS[1] the set; ARGV: expiry (ms), maximum, member. 1 taken, 0 refused.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + expiry, ARGV[3])
redis.call('PEXPIRE', KEYS[1], expiry)
return 1
"""

# KEYS: the sets; ARGV[1] expiry (ms), then one member per key. Only members still there are
# renewed (XX): a member let go meanwhile, or already expired, is not put back.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + expiry, ARGV[i + 1]) == 1 then
    redis.call('PEXPIRE', key, expiry)
  end
end
return #KEYS
"""


@dataclass(frozen=True, slots=True)
class Place:
    """One place held in a count: the Redis key and this holder's member (None: not counted)."""

    key: str
    member: str | None


class SharedHeld:
    """Places held in Redis counts, renewed by this instance until let go."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str,
        expiry_s: float = EXPIRY_S,
        renew_s: float = RENEW_S,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._expiry_ms = max(1, int(expiry_s * 1000))
        self._renew_s = renew_s
        self._on_error = on_error
        self._take: Any = self._client.register_script(_TAKE)
        self._renew: Any = self._client.register_script(_RENEW)
        self._held: dict[str, str] = {}  # member -> key
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="limits-held-renew")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def take(self, name: str, most: int) -> Place | None:
        """Take a place in the count `name` if fewer than `most` are held; None when full.
        Raises `RedisError` when Redis cannot be reached."""
        key = self._prefix + name
        member = uuid.uuid4().hex
        if not await self._take(keys=[key], args=[self._expiry_ms, most, member]):
            return None
        self._held[member] = key
        return Place(key, member)

    async def let_go(self, place: Place) -> None:
        if place.member is None:
            return
        self._held.pop(place.member, None)
        try:
            await self._client.zrem(place.key, place.member)
        except RedisError as exc:  # it expires on its own once no longer renewed
            self._failed(exc)

    async def renew(self) -> None:
        """Push back the expiry of every place this instance holds (one call)."""
        held = list(self._held.items())
        if not held:
            return
        await self._renew(keys=[key for _, key in held], args=[self._expiry_ms, *(m for m, _ in held)])

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._renew_s)
            try:
                await self.renew()
            except RedisError as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        if self._on_error is not None:
            self._on_error(exc)
