"""Several real gateway processes on one PostgreSQL database and one Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.databases import delete_redis_keys, redis_url
from tests.servers import GatewayProcess, load_services, start_gateway

Cluster = Callable[..., list[GatewayProcess]]


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    """cluster(n, env, redis=URL) starts n gateways sharing the database and a Redis key prefix."""
    started: list[GatewayProcess] = []
    prefixes: list[str] = []

    def start(
        n: int, env: Mapping[str, str] | None = None, *, redis: str | None = None
    ) -> list[GatewayProcess]:
        prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
        prefixes.append(prefix)
        common = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis or redis_url(),
            "CHATGW_REDIS_PREFIX": prefix,
            **(env or {}),
        }
        gateways = [start_gateway(tmp_path, common) for _ in range(n)]
        started.extend(gateways)
        return gateways

    yield start
    for gw in started:
        gw.stop()
    for prefix in prefixes:
        delete_redis_keys(prefix)


@pytest.fixture
def own_redis() -> Iterator[tuple[str, Any]]:
    """A throwaway Redis server of this test's own, and the services module to stop and start it."""
    services = load_services()
    binary = services.find_redis_server()
    assert binary is not None, "redis-server is needed for this test (scripts/test installs it)"
    url = services.start_redis(binary)
    yield url, services
    if services.redis_answers(url):
        services.stop_redis(url)
