"""A socket whose broker link loses an event still sees every seq once, in order: the gap is filled
from the replay log, or answered with reset when the log no longer has it.

The real app runs under uvicorn inside the test's event loop, because the loss has to be injected
into the broker; the client is a real WebSocket client and everything else is the production path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import uvicorn
from websockets.asyncio.client import connect

from core.models import Event
from gateway.app import create_app
from gateway.backends.memory_broker import MemoryBroker
from gateway.cli import uvicorn_config
from gateway.settings import Settings
from tests.servers import free_port

SECRET = "unit-test-secret-for-gap-tests-0123456789"


class LossyBroker(MemoryBroker):
    """Simulates a pub/sub link that drops deliveries: events whose seq is in `lose` are logged
    (replayable) but never handed to this instance's listener."""

    def __init__(self, lose: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lose = lose

    def _deliver(self, event: Event) -> None:
        if event.seq not in self.lose:
            super()._deliver(event)


async def run_turn(broker: LossyBroker) -> list[dict[str, Any]]:
    settings = Settings.from_env(
        {
            "CHATGW_SECRET": SECRET,
            "CHATGW_SCRIPTED_TPS": "0",
            "CHATGW_SCRIPTED_TOKENS": "30",
            "CHATGW_DELTA_MAX_CHARS": "1",
        }
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn_config(create_app(settings, broker=broker), settings, host="127.0.0.1", port=port)
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            session = (await http.post("/v1/widget/sessions", json={"business": "demo"})).json()
        frames: list[dict[str, Any]] = []
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(orjson.dumps({"type": "hello", "token": session["token"]}).decode())
            frames.append(orjson.loads(await ws.recv()))
            await ws.send(
                orjson.dumps({"type": "message", "client_msg_id": "g-1", "text": "mind the gap"}).decode()
            )
            async with asyncio.timeout(10):
                while frames[-1]["type"] != "ai_end":
                    frames.append(orjson.loads(await ws.recv()))
        return frames
    finally:
        server.should_exit = True
        await serving


async def test_a_lost_event_is_filled_from_the_replay_log() -> None:
    frames = await run_turn(LossyBroker({3, 7}, replay_window=1000))
    seqs = [f["seq"] for f in frames if f["type"] in ("message", "ai_start", "delta", "ai_end")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not [f for f in frames if f["type"] == "reset"]
    text = "".join(f["text"] for f in frames if f["type"] == "delta")
    assert text == frames[-1]["text"]


async def test_a_gap_the_log_cannot_fill_is_answered_with_reset() -> None:
    frames = await run_turn(LossyBroker({3}, replay_window=1))
    resets = [f for f in frames if f["type"] == "reset"]
    assert len(resets) == 1
    assert resets[0]["reason"] == "gap"
    after = [f["seq"] for f in frames[frames.index(resets[0]) + 1 :] if "seq" in f and f["type"] != "ack"]
    assert after, "the answer must continue after the reset"
    assert after == list(range(resets[0]["seq"] + 1, resets[0]["seq"] + 1 + len(after)))
