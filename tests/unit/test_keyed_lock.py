"""KeyedLock serialises work per key, lets other keys run, and forgets idle keys."""

from __future__ import annotations

import asyncio

from core.keyed_lock import KeyedLock


async def test_one_key_at_a_time_other_keys_free_idle_keys_forgotten() -> None:
    locks: KeyedLock[str] = KeyedLock()
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with locks.hold("a"):
            order.append("a1 in")
            await release.wait()
            order.append("a1 out")

    async def second() -> None:
        async with locks.hold("a"):
            order.append("a2 in")

    async def other() -> None:
        async with locks.hold("b"):
            order.append("b in")

    tasks = [asyncio.create_task(first())]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(second()), asyncio.create_task(other())]
    await asyncio.sleep(0.01)
    assert order == ["a1 in", "b in"]  # a2 waits for a1; b does not
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["a1 in", "b in", "a1 out", "a2 in"]
    assert len(locks) == 0
