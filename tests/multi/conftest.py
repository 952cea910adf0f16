"""Several real gateway processes on one PostgreSQL database and one Redis."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.databases import delete_redis_keys, redis_url
from tests.servers import GatewayProcess, start_gateway

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
