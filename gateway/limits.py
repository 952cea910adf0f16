"""Rate and resource limits: who may do how much, and what a breach gets.

Rates are counted by the `limits` library (sliding window counters). Per-socket rates (messages,
typing, violations) always live in this process's memory: a socket lives on one instance. The
others (per conversation, per IP, per key, per end user, per business) are shared by every
instance through Redis when `REDIS_URL` is set, in memory otherwise. So are the counts of things
held open (sockets per IP, sockets per conversation): in Redis they are `gateway.held` counts,
whose places an instance that dies stops renewing, and which so free themselves.

A breach raises `RateLimited` with the time after which the same call would pass
(`retry_after_ms`): a socket gets an `error` frame `rate_limited`, HTTP a 429 with `Retry-After`.
A socket that keeps breaching (CHATGW_LIMIT_VIOLATIONS) is closed with 4429. Every breach counts
on `chatgw_rate_limited_total{limit}`.

If Redis cannot be reached the shared limits and counts let calls through (logged, and counted as the
error `limiter_unavailable`): the chat itself needs Redis and fails on its own terms then.
See docs/limits.md.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import logging
import math
import time
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any, cast

import limits
from limits.aio.storage import MemoryStorage, RedisStorage, SlidingWindowCounterSupport
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError

from gateway.backends.redis_client import AutoPipelineRedis, auto_pipelined, close_quietly, transport_stats
from gateway.errors import GatewayError
from gateway.held import Place, SharedHeld
from gateway.protocol import ClientFrame, SendMessage, Typing
from gateway.settings import LimitSettings

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


class SweptMemoryStorage(MemoryStorage):
    """`limits`' in-memory storage, with its sweep of expired counters at most once a second.

    The library starts a sweep after any call that finds the previous one finished: a walk over
    every counter of the process, in practice once per counted frame, which at a few hundred
    sockets cost more than the counting (bench/README.md, "Rate limit counters"). Reading a
    counter already drops it when expired (`get`), so the sweep only frees the memory of counters
    no longer read; once a second does that as well. The hook is the library's private
    `__schedule_expiry` (name-mangled); if a version renames it, this class just sweeps as often
    as the library does, and tests/unit/test_limits.py fails to say so.
    """

    _next_sweep = 0.0

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL_S
        await super()._MemoryStorage__schedule_expiry()  # type: ignore[misc]


class PipelinedRedisStorage(RedisStorage):
    """`limits`' redis-py storage on a client it is given (an `AutoPipelineRedis`) instead of the
    plain client it would build on a pool: the library's scripts are registered on that client, so
    every counted call goes through its pipelines. `configure_bridge` is the hook the library's own
    cluster and sentinel storages override; the bridge's `storage` and `connection_getter` are the
    client it calls (tests/integration/test_held_counts.py checks that calls go through it)."""

    def __init__(self, uri: str, client: AutoPipelineRedis, **options: Any) -> None:
        self._given_client = client
        super().__init__(uri, implementation="redispy", **options)

    def configure_bridge(self) -> None:
        client = self._given_client
        bridge = cast(Any, self.bridge)
        bridge.storage = client
        bridge.connection_getter = lambda _readonly: client


class Limit(enum.StrEnum):
    """Each limit, by the name it has on /metrics and in `error` frames."""

    SOCKET_FRAMES = "socket_frames"
    AGENT_FRAMES = "agent_frames"
    SOCKET_MESSAGES = "socket_messages"
    SOCKET_TYPING = "socket_typing"
    CONVERSATION_MESSAGES = "conversation_messages"
    USER_ANSWERS = "user_answers"
    BUSINESS_ANSWERS = "business_answers"
    IP_CONNECTS = "ip_connects"
    IP_CONNECTIONS = "ip_connections"
    CONVERSATION_SOCKETS = "conversation_sockets"
    IP_WIDGET_SESSIONS = "ip_widget_sessions"
    IP_HTTP = "ip_http"
    KEY_HTTP = "key_http"
    VIOLATIONS = "violations"


# What is counted, for the error message: "too many <what>".
_WHAT = {
    Limit.SOCKET_FRAMES: "frames on this socket",
    Limit.AGENT_FRAMES: "frames on this agent socket",
    Limit.SOCKET_MESSAGES: "messages on this socket",
    Limit.SOCKET_TYPING: "typing frames on this socket",
    Limit.CONVERSATION_MESSAGES: "messages in this conversation",
    Limit.USER_ANSWERS: "messages asking for an answer from this user",
    Limit.BUSINESS_ANSWERS: "answers asked of this business's model",
    Limit.IP_CONNECTS: "new connections from this address",
    Limit.IP_WIDGET_SESSIONS: "new chat sessions from this address",
    Limit.IP_HTTP: "requests from this address",
    Limit.KEY_HTTP: "requests with this key",
    Limit.VIOLATIONS: "rate limit violations",
}
_LOCAL = frozenset(
    {Limit.SOCKET_FRAMES, Limit.AGENT_FRAMES, Limit.SOCKET_MESSAGES, Limit.SOCKET_TYPING, Limit.VIOLATIONS}
)
# How long a concurrency breach asks the client to wait before trying again.
HELD_RETRY_MS = 5000


class RateLimited(GatewayError):
    """A limit was reached; the same call passes again after `retry_after_ms`."""

    code = "rate_limited"

    def __init__(self, limit: Limit, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_ms = retry_after_ms


class Limiter:
    """The limits of one gateway process. `connect()` before use, `close()` at the end."""

    def __init__(
        self,
        settings: LimitSettings,
        *,
        registry: CollectorRegistry,
        redis_url: str | None = None,
        redis_prefix: str = "chatgw:",
        redis_pool_size: int = 16,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_error = on_error
        rates = {limit: getattr(settings, limit.value, None) for limit in Limit}
        self._items = {limit: limits.parse(rate) for limit, rate in rates.items() if isinstance(rate, str)}
        self._redis_url = redis_url
        self._redis_prefix = redis_prefix
        self._redis_pool_size = redis_pool_size
        self._client: AutoPipelineRedis | None = None
        self._local: SlidingWindowCounterRateLimiter | None = None
        self._shared: SlidingWindowCounterRateLimiter | None = None
        self._held: SharedHeld | None = None
        self._per_ip: Tally[str] = Tally()
        self._per_conversation: Tally[str] = Tally()
        self._storage_failing = False
        self.hits = Counter(
            "chatgw_rate_limited",
            "Calls refused by a rate or resource limit, by limit.",
            ["limit"],
            registry=registry,
        )

    async def connect(self) -> None:
        self._local = self._shared = SlidingWindowCounterRateLimiter(SweptMemoryStorage())
        if self._redis_url is not None:
            # The broker's kind of client: the calls of one event-loop tick go out as one pipeline,
            # at most `redis_pool_size` pipelines at once, and calls made meanwhile join the next
            # one instead of each waiting for a connection of their own (which, at a few hundred
            # counted calls a second on a busy event loop, ran the pool dry: bench/README.md).
            self._client = auto_pipelined(
                self._redis_url, pool_size=self._redis_pool_size, timeout=2.0, resend_after_timeout=False
            )
            shared = PipelinedRedisStorage(
                "async+" + self._redis_url,
                self._client,
                key_prefix=self._redis_prefix + "limits",
                wrap_exceptions=True,
            )
            self._shared = SlidingWindowCounterRateLimiter(shared)
            self._held = SharedHeld(
                self._client, prefix=self._redis_prefix + "held:", on_error=self._storage_failed
            )
            self._held.start()

    def transport_stats(self) -> dict[str, int]:
        """The limiter's Redis client's counters (`redis_client.transport_stats`); empty without Redis."""
        return transport_stats(self._client)

    async def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            await held.close()
        client, self._client = self._client, None
        await close_quietly(client)

    # -- rates ----------------------------------------------------------------------------------

    async def hit(self, limit: Limit, *key: str) -> None:
        """Count one call against `limit` for `key`; raise `RateLimited` when it is over."""
        item = self._items.get(limit)
        if item is None:
            return
        strategy = self._local if limit in _LOCAL else self._shared
        assert strategy is not None, "Limiter.connect() first"
        try:
            if await strategy.hit(item, limit.value, *key):
                if strategy is not self._local:
                    self._storage_recovered()
                return
            storage = cast(SlidingWindowCounterSupport, strategy.storage)
            window = await storage.get_sliding_window(item.key_for(limit.value, *key), item.get_expiry())
        except StorageError as exc:
            self._storage_failed(exc)
            return
        retry_after_ms = max(1, math.ceil(retry_after_s(item.amount, item.get_expiry(), *window) * 1000))
        raise self.breach(limit, f"at most {item}", retry_after_ms)

    def breach(self, limit: Limit, detail: str, retry_after_ms: int) -> RateLimited:
        """Count a breach of `limit` and make its exception."""
        self.hits.labels(limit.value).inc()
        what = _WHAT.get(limit, limit.value.replace("_", " "))
        seconds = max(1, math.ceil(retry_after_ms / 1000))
        message = f"too many {what} ({detail}): try again in {seconds} s"
        return RateLimited(limit, message, retry_after_ms=retry_after_ms)

    def _storage_failed(self, exc: Exception) -> None:
        if not self._storage_failing:
            log.warning("rate limits cannot be counted, letting calls through: %s", exc)
            self._storage_failing = True
        if self._on_error is not None:
            self._on_error("limiter_unavailable")

    def _storage_recovered(self) -> None:
        if self._storage_failing:
            log.info("rate limits are counted again")
            self._storage_failing = False

    def exempt(self, address: str | None) -> bool:
        """Whether per-address limits skip this client address (CHATGW_LIMIT_EXEMPT_IPS)."""
        if address is None or not self.settings.exempt:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.settings.exempt)

    # -- what is held open ----------------------------------------------------------------------

    async def open_connection(self, address: str | None) -> Place | None:
        """Count a new socket of `address`: its rate of new sockets and the sockets it holds open
        (both shared); `RateLimited` when over. Returns the place to pass to `close_connection`
        (None: nothing counted)."""
        if address is None or self.exempt(address):
            return None
        await self.hit(Limit.IP_CONNECTS, address)
        return await self._take(
            Limit.IP_CONNECTIONS, self._per_ip, "ip:", address, self.settings.connections_per_ip
        )

    async def close_connection(self, place: Place | None) -> None:
        await self._let_go(self._per_ip, place)

    async def open_conversation_socket(self, conversation_id: str) -> Place | None:
        """Count a widget socket of the conversation (shared); `RateLimited` when it holds as many
        as it may. Returns the place to pass to `close_conversation_socket`."""
        most = self.settings.sockets_per_conversation
        return await self._take(
            Limit.CONVERSATION_SOCKETS, self._per_conversation, "conversation:", conversation_id, most
        )

    async def close_conversation_socket(self, place: Place | None) -> None:
        await self._let_go(self._per_conversation, place)

    async def _take(self, limit: Limit, tally: Tally[str], kind: str, key: str, most: int) -> Place | None:
        if self._held is None:
            if tally[key] >= most:
                raise self.breach(limit, f"at most {most} open at once", HELD_RETRY_MS)
            tally[key] += 1
            return Place(key, None)
        try:
            place = await self._held.take(kind + key, most)
        except RedisError as exc:
            self._storage_failed(exc)
            return None
        self._storage_recovered()
        if place is None:
            raise self.breach(limit, f"at most {most} open at once", HELD_RETRY_MS)
        return place

    async def _let_go(self, tally: Tally[str], place: Place | None) -> None:
        if place is None:
            return
        if place.member is None:
            _release(tally, place.key)
        elif self._held is not None:
            await self._held.let_go(place)

    # -- frames ---------------------------------------------------------------------------------

    async def admit_frame(
        self,
        frame: ClientFrame,
        *,
        session_id: str,
        conversation_id: str | None,
        user: tuple[str, str] | None,
    ) -> None:
        """Count a client frame against its limits: `typing` per socket; `message` per socket, per
        conversation and, for an end user's message (`user`: business id, end user id), against
        the answers the user and the business may ask of the model."""
        if isinstance(frame, Typing):
            await self.hit(Limit.SOCKET_TYPING, session_id)
        elif isinstance(frame, SendMessage):
            await self.hit(Limit.SOCKET_MESSAGES, session_id)
            if conversation_id is not None:
                await self.hit(Limit.CONVERSATION_MESSAGES, conversation_id)
            if user is not None:
                business_id, end_user = user
                await self.hit(Limit.USER_ANSWERS, business_id, end_user)
                await self.hit(Limit.BUSINESS_ANSWERS, business_id)

    async def violated(self, session_id: str) -> bool:
        """Count a breach by this socket; True when it has breached too often and must close."""
        try:
            await self.hit(Limit.VIOLATIONS, session_id)
        except RateLimited:
            return True
        return False


def retry_after_s(
    amount: int, expiry: float, previous: int, previous_ttl: float, current: int, current_ttl: float
) -> float:
    """When a sliding window counter lets the next call pass, from the window as the storage
    reports it (the library's own `get_window_stats` can answer "now" for a window just begun).

    A call passes while `previous * (time left of the previous window) / expiry + current` is below
    `amount`; the current window ends `current_ttl - expiry` from now, and its count then weighs as
    the previous one."""
    if current >= amount:
        ends_in = max(0.0, current_ttl - expiry)
        return ends_in + expiry * max(0.0, 1 - amount / current)
    if previous == 0:
        return 0.0
    return max(0.0, previous_ttl - (amount - current) * expiry / previous)


def _release(tally: Tally[str], key: str | None) -> None:
    if key is None:
        return
    tally[key] -= 1
    if tally[key] <= 0:
        del tally[key]


def key_id(credential: str) -> str:
    """A short stable name for a credential, so that no key or token is kept as a limiter key."""
    return hashlib.sha256(credential.encode()).hexdigest()[:24]
