"""Backends under contract. Each parameter is one implementation; the persistence and scale-out
work adds "postgres" and "redis" here, and every contract test then runs against them too."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from core.broker import Broker
from core.store import Store
from gateway.backends.memory_broker import MemoryBroker
from gateway.backends.memory_store import MemoryStore

REPLAY_WINDOW = 8


@pytest.fixture(params=["memory"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    backend: Store = MemoryStore()
    await backend.connect()
    yield backend
    await backend.close()


@pytest.fixture(params=["memory"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    backend: Broker = MemoryBroker(replay_window=REPLAY_WINDOW)
    await backend.connect()
    yield backend
    await backend.close()
