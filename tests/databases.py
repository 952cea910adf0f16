"""Real PostgreSQL and Redis for the tests: a database of its own per test run, a key prefix of its own.

The servers come from TEST_DATABASE_URL and TEST_REDIS_URL (scripts/test provides them, starting
or installing servers where needed); the defaults are the standard local ports. Nothing here skips:
a server that does not answer fails the tests that need it, saying so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from gateway.migrate import Migrator

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

T = TypeVar("T")


def server_database_url() -> str:
    return os.environ.get("TEST_DATABASE_URL") or DEFAULT_DATABASE_URL


def redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS_URL


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(prefix: str = "chatgw_test") -> str:
    """A new empty database on the test server; returns its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(server_database_url(), timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL does not answer at {server_database_url()} ({exc!r}); "
            "run the tests through scripts/test, which provides it, or set TEST_DATABASE_URL"
        ) from exc
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_database_url(), name)


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(server_database_url(), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def migrated_database() -> str:
    url = await create_database()
    await Migrator(url).up()
    return url


def sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine from synchronous (session-scoped) fixture code, on a thread of its own so
    that it also works while an event loop runs (a fixture requested from an async one)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def delete_redis_keys(prefix: str) -> int:
    client = redis.Redis.from_url(redis_url())
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()
