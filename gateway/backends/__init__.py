"""Store and Broker implementations, chosen by URL; each imported only when selected."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from core.broker import Broker
from core.store import Store
from gateway.settings import Settings

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Backends:
    store: Store
    broker: Broker
    checks: dict[str, tuple[str, Check]] = field(default_factory=dict)
    """Dependency name -> (backend name, readiness check) for /readyz."""
    pool_stats: Callable[[], tuple[int, int]] | None = None
    """The database pool's (open, idle) connections, for /metrics."""
    broker_reconnects: Callable[[], int] | None = None
    """How often the broker's pub/sub connection was re-established, for /metrics."""
    pool_waits: Callable[[], tuple[int, float]] | None = None
    """Queries that waited for a pooled database connection, and the seconds waited, for /metrics."""
    redis_stats: Callable[[], dict[str, int]] | None = None
    """The Redis broker client's commands, round trips and pool use, for /metrics."""


def make_backends(settings: Settings, *, broker: Broker | None = None) -> Backends:
    """The store (memory, or PostgreSQL with a Redis state cache when REDIS_URL is set) and the
    broker (Redis with REDIS_URL, else memory); `broker` replaces the latter (tests)."""
    checks: dict[str, tuple[str, Check]] = {}
    store: Store
    pool_stats: Callable[[], tuple[int, int]] | None = None
    pool_waits: Callable[[], tuple[int, float]] | None = None
    if settings.database_url:
        scheme = settings.database_url.split(":", 1)[0]
        if scheme not in ("postgres", "postgresql"):
            raise ValueError(f"unsupported DATABASE_URL scheme: {scheme!r}")
        from gateway.backends.postgres_store import PostgresStore

        store = pg = PostgresStore(settings.database_url, pool_size=settings.db_pool_size)
        pool_stats, pool_waits = pg.pool_stats, pg.pool_wait_stats
        checks["store"] = ("postgres", store.ping)
        if settings.redis_url:
            from gateway.backends.redis_state import CachedStore, RedisStateCache

            cache = RedisStateCache(
                settings.redis_url,
                prefix=settings.redis_prefix,
                ttl=settings.state_ttl,
                pool_size=settings.redis_pool_size,
            )
            checks["state_cache"] = ("redis", cache.ping)
            store = CachedStore(store, cache)
    else:
        from gateway.backends.memory_store import MemoryStore

        store = MemoryStore()
        checks["store"] = ("memory", store.ping)
    reconnects: Callable[[], int] | None = None
    redis_stats: Callable[[], dict[str, int]] | None = None
    if broker is None:
        broker, reconnects = _make_broker(settings)
    stats = getattr(broker, "transport_stats", None)  # the Redis broker's
    if callable(stats):
        redis_stats = stats
    checks["broker"] = ("redis" if settings.redis_url else "memory", broker.ping)
    return Backends(store, broker, checks, pool_stats, reconnects, pool_waits, redis_stats)


def _make_broker(settings: Settings) -> tuple[Broker, Callable[[], int] | None]:
    """RedisBroker (fan-out across instances) with REDIS_URL, MemoryBroker (this process) without;
    and how to read the broker's reconnect count, if it has one."""
    if settings.redis_url:
        from gateway.backends.redis_broker import RedisBroker

        redis_broker = RedisBroker(
            settings.redis_url,
            prefix=settings.redis_prefix,
            replay_window=settings.replay_window,
            ttl=settings.stream_ttl,
            pool_size=settings.redis_pool_size,
        )
        return redis_broker, redis_broker.reconnect_count
    from gateway.backends.memory_broker import MemoryBroker

    return MemoryBroker(replay_window=settings.replay_window), None
