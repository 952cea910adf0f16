"""Redis holds a cache of conversation state, never the only copy: flushed, it is rebuilt from
PostgreSQL, and the gateway serves on meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from tests.databases import delete_redis_keys, redis_url
from tests.e2e.client import Client, new_widget
from tests.servers import GatewayProcess, start_gateway


@pytest.fixture
def cached_gateway(database_url: str, tmp_path: Path) -> Iterator[tuple[GatewayProcess, str]]:
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    gw = start_gateway(
        tmp_path,
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url(), "CHATGW_REDIS_PREFIX": prefix},
    )
    yield gw, prefix
    gw.stop()
    delete_redis_keys(prefix)


async def test_flushed_state_is_rebuilt_from_postgres(cached_gateway: tuple[GatewayProcess, str]) -> None:
    gw, prefix = cached_gateway
    cache = redis.Redis.from_url(redis_url())
    try:
        widget = new_widget(gw)
        key = f"{prefix}conv:{widget.conversation_id}:state"
        client = await Client.open(gw)
        welcome = await client.hello(widget)
        await client.send({"type": "message", "client_msg_id": "r-1", "text": "remember me"})
        end = (await client.until_ai_end())[-1]
        await client.close()
        cached = cache.get(key)
        assert cached is not None, "the conversation's state was not cached"
        assert cache.ttl(key) > 0

        assert delete_redis_keys(prefix) >= 1
        assert cache.get(key) is None

        again = await Client.open(gw)
        resumed = await again.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": end["seq"]})
        assert resumed["resumed"] is True
        assert resumed["seq"] == end["seq"]
        assert resumed["mode"] == "ai"
        await again.send({"type": "message", "client_msg_id": "r-2", "text": "still there?"})
        later = await again.until_ai_end()
        assert later[-1]["status"] == "complete"
        await again.close()

        # The answer's seq and end are recorded just after its ai_end went out: wait for them.
        state: dict[str, object] = {}
        for _ in range(200):
            rebuilt = cache.get(key)
            state = orjson.loads(rebuilt) if rebuilt else {}
            if state.get("last_seq") == later[-1]["seq"] and state.get("active_response_id") is None:
                break
            await asyncio.sleep(0.01)
        assert state, "the state was not cached again after the flush"
        assert state["conversation_id"] == widget.conversation_id
        assert state["last_seq"] == later[-1]["seq"]
        assert state["active_response_id"] is None
        assert state["mode"] == "ai"
    finally:
        cache.close()
