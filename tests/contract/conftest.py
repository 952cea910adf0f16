"""Backends under contract. Each parameter is one implementation (the PostgreSQL store also behind
the Redis state cache); every contract test runs against each."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from core.broker import Broker
from core.store import Store
from gateway.backends.memory_broker import MemoryBroker
from gateway.backends.memory_store import MemoryStore
from gateway.backends.postgres_store import PostgresStore
from gateway.backends.redis_broker import RedisBroker
from gateway.backends.redis_state import CachedStore, RedisStateCache
from tests.databases import redis_url

REPLAY_WINDOW = 8


@pytest.fixture(params=["memory", "postgres", "postgres+redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    else:
        backend = PostgresStore(request.getfixturevalue("database_url"), pool_size=4)
        if request.param == "postgres+redis":
            prefix = request.getfixturevalue("redis_prefix")
            backend = CachedStore(backend, RedisStateCache(redis_url(), prefix=prefix, ttl=60))
    await backend.connect()
    yield backend
    await backend.close()


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    backend: Broker
    if request.param == "memory":
        backend = MemoryBroker(replay_window=REPLAY_WINDOW)
    else:
        prefix = f"{request.getfixturevalue('redis_prefix')}{uuid.uuid4().hex[:6]}:"
        backend = RedisBroker(redis_url(), prefix=prefix, replay_window=REPLAY_WINDOW, ttl=600)
    await backend.connect()
    yield backend
    await backend.close()
