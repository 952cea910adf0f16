"""The send path's pieces: ASGI messages as the connection prepares them, and `finish`, which runs
to its end a send that was started outside any task and had to wait."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest

from gateway.connection import close_message, finish, send_message
from gateway.metrics import Metrics
from gateway.protocol import CloseCode, encode


def test_a_frame_goes_out_as_one_text_message_holding_its_json() -> None:
    frame = {"type": "delta", "seq": 7, "response_id": "r", "text": "é ⟦1⟧"}
    message = send_message(encode(frame))
    assert message == {"type": "websocket.send", "text": encode(frame)}
    assert orjson.loads(message["text"]) == frame
    assert "bytes" not in message


def test_a_close_carries_its_code_and_reason() -> None:
    assert close_message(CloseCode.SLOW_CONSUMER, "too slow") == {
        "type": "websocket.close",
        "code": 4008,
        "reason": "too slow",
    }


async def test_finish_runs_a_started_send_to_its_end_after_it_waited() -> None:
    writable = asyncio.Event()
    written: list[str] = []

    async def send(text: str) -> None:  # what uvicorn's send does: wait while paused, then write
        await writable.wait()
        written.append(text)
        await asyncio.sleep(0)  # a bare yield too
        written.append(text + "!")

    steps = send("a").__await__()
    waiting = steps.send(None)  # started by hand, as the connection does
    assert written == []
    task = asyncio.create_task(finish(steps, waiting))
    await asyncio.sleep(0.01)
    assert written == []
    assert not task.done()
    writable.set()
    await task
    assert written == ["a", "a!"]


async def test_finish_passes_a_failure_of_what_it_waits_for_into_the_send() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def send() -> None:
        try:
            await gate
        except ConnectionResetError:
            seen.append("reset")
            raise

    steps = send().__await__()
    task = asyncio.create_task(finish(steps, steps.send(None)))
    await asyncio.sleep(0)
    gate.set_exception(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        await task
    assert seen == ["reset"]


async def test_cancelling_the_task_that_finishes_a_send_cancels_the_send() -> None:
    never = asyncio.Event()
    seen: list[Any] = []

    async def send() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    steps = send().__await__()
    task = asyncio.create_task(finish(steps, steps.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


def test_frames_sent_are_counted_by_type_on_the_metrics_page() -> None:
    metrics = Metrics()
    for frame_type in ("welcome", "delta", "delta", "delta", "ai_end"):
        metrics.frame_out(frame_type)
    lines = generate_latest(metrics.registry).decode().splitlines()
    counted = {
        ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines if ln.startswith("chatgw_ws_frames_out")
    }
    assert counted == {
        'chatgw_ws_frames_out_total{type="ai_end"}': 1.0,
        'chatgw_ws_frames_out_total{type="delta"}': 3.0,
        'chatgw_ws_frames_out_total{type="welcome"}': 1.0,
    }
    assert "# TYPE chatgw_ws_frames_out_total counter" in lines


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_a_text_frame_is_the_frame_websockets_itself_serializes(size: int) -> None:
    from websockets.frames import Frame, Opcode

    from gateway.transport import text_frame

    text = ("é" * size)[: size // 2] + "x" * (size - size // 2)  # multi-byte characters included
    data = text.encode()
    assert text_frame(text) == Frame(Opcode.TEXT, data).serialize(mask=False)
