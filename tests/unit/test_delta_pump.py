"""DeltaPump: pieces gathered into few ordered publishes; the model loop never waits on them."""

from __future__ import annotations

import asyncio

import pytest

from core.delta_pump import DeltaPump, PumpFailed


class Recorder:
    """A publish target that records chunks; optionally slow, to show the pump does not block."""

    def __init__(self, delay: float = 0.0) -> None:
        self.chunks: list[str] = []
        self.delay = delay

    async def __call__(self, chunk: str) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.chunks.append(chunk)


async def test_pieces_pushed_together_leave_as_one_delta() -> None:
    out = Recorder()
    pump = DeltaPump(out, flush_after=0.01, max_chars=1000)
    pump.start()
    for piece in ("a", "b", "c"):
        pump.push(piece)
    await pump.close(flush=True)
    assert out.chunks == ["abc"]
    assert pump.text == "abc"


async def test_max_chars_flushes_without_waiting_for_the_interval() -> None:
    out = Recorder()
    pump = DeltaPump(out, flush_after=60, max_chars=4)
    pump.start()
    pump.push("abcd")
    for _ in range(20):
        if out.chunks:
            break
        await asyncio.sleep(0.01)
    assert out.chunks == ["abcd"]
    pump.push("ef")
    await pump.close(flush=True)
    assert out.chunks == ["abcd", "ef"]


async def test_close_without_flush_drops_the_unsent_tail() -> None:
    out = Recorder()
    pump = DeltaPump(out, flush_after=60, max_chars=1000)
    pump.start()
    pump.push("never sent")
    await pump.close(flush=False)
    assert out.chunks == []
    assert pump.text == ""


async def test_a_slow_publisher_keeps_order_and_loses_nothing() -> None:
    out = Recorder(delay=0.02)
    pump = DeltaPump(out, flush_after=0.001, max_chars=3)
    pump.start()
    for i in range(30):
        pump.push(str(i % 10))
        await asyncio.sleep(0.001)
    await pump.close(flush=True)
    assert "".join(out.chunks) == "".join(str(i % 10) for i in range(30))
    assert len(out.chunks) < 30


async def test_a_failed_publish_stops_the_model_loop() -> None:
    async def broken(chunk: str) -> None:
        raise ConnectionError("broker gone")

    pump = DeltaPump(broken, flush_after=0, max_chars=1)
    pump.start()
    pump.push("x")
    await pump.close(flush=True)
    assert isinstance(pump.error, ConnectionError)
    with pytest.raises(PumpFailed):
        pump.push("y")


async def test_a_piece_after_a_pause_leaves_at_once_and_a_burst_is_gathered() -> None:
    """The first piece is published without waiting for the window; pieces that come while it is
    being published, or within the window after it, leave together."""
    gate = asyncio.Event()
    chunks: list[str] = []

    async def publish(chunk: str) -> None:
        chunks.append(chunk)
        if len(chunks) == 1:
            await gate.wait()  # the first publish stays pending until the test lets it go

    pump = DeltaPump(publish, flush_after=60, max_chars=1000)
    pump.start()
    pump.push("first")
    for _ in range(100):
        if chunks:
            break
        await asyncio.sleep(0.001)
    assert chunks == ["first"]  # out at once, though the window is a minute
    pump.push("a")
    pump.push("b")
    gate.set()
    await asyncio.sleep(0.01)
    assert chunks == ["first"]  # gathered: within the window after the first publish
    await pump.close(flush=True)
    assert chunks == ["first", "ab"]
