"""Store and Broker implementations, chosen by URL; each imported only when selected."""

from __future__ import annotations

from core.broker import Broker
from core.store import Store


def make_store(database_url: str | None) -> Store:
    """MemoryStore without a URL; the PostgreSQL store arrives with the persistence work."""
    if not database_url:
        from gateway.backends.memory_store import MemoryStore

        return MemoryStore()
    raise ValueError(f"unsupported DATABASE_URL scheme: {database_url.split(':', 1)[0]!r}")


def make_broker(redis_url: str | None, *, replay_window: int) -> Broker:
    """MemoryBroker without a URL; the Redis broker arrives with the scale-out work."""
    if not redis_url:
        from gateway.backends.memory_broker import MemoryBroker

        return MemoryBroker(replay_window=replay_window)
    raise ValueError(f"unsupported REDIS_URL scheme: {redis_url.split(':', 1)[0]!r}")
