"""Redis holds conversation state and event logs, never the only copy of anything durable: flushed,
the state is rebuilt from PostgreSQL, the event log starts a new epoch after the stored seqs, and
clients are told to reset instead of seeing a gap."""

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
        await settled(cache, key, end["seq"])
        assert cache.ttl(key) > 0

        assert delete_redis_keys(prefix) >= 3  # the state, and the event log's two keys
        assert cache.get(key) is None

        again = await Client.open(gw)
        resumed = await again.hello(widget, resume={"epoch": welcome["epoch"], "last_seq": end["seq"]})
        assert resumed["resumed"] is False
        reset = await again.recv()
        assert reset["type"] == "reset"
        assert reset["reason"] == "epoch_changed"
        assert reset["epoch"] != welcome["epoch"]
        assert reset["seq"] == end["seq"]  # the new log starts after what PostgreSQL recorded
        await again.send({"type": "message", "client_msg_id": "r-2", "text": "still there?"})
        later = await again.until_ai_end()
        assert later[-1]["status"] == "complete"
        assert min(f["seq"] for f in later if "seq" in f and f["type"] != "ack") == end["seq"] + 1
        await again.close()

        state = await settled(cache, key, later[-1]["seq"])
        assert state["conversation_id"] == widget.conversation_id
        assert state["last_seq"] == later[-1]["seq"]
        assert state["active_response_id"] is None
        assert state["mode"] == "ai"
    finally:
        cache.close()


async def settled(cache: redis.Redis, key: str, seq: int) -> dict[str, object]:
    """The cached state once it shows the answer ending at `seq` (recorded just after its ai_end)."""
    state: dict[str, object] = {}
    for _ in range(300):
        raw = cache.get(key)
        state = orjson.loads(raw) if raw else {}
        if state.get("last_seq") == seq and state.get("active_response_id") is None:
            return state
        await asyncio.sleep(0.01)
    raise AssertionError(f"the cached state never showed seq {seq}: {state}")
