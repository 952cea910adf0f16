"""DeltaPump: coalesces a model's text pieces into `delta` events.

The model's loop only appends to a buffer (`push`, never awaits); the pump's own task publishes
what has gathered. A piece that comes after a pause leaves at once; pieces that arrive while a
publish is pending, or within `flush_after` seconds after the previous publish, are gathered and
leave together when that window ends, or at once when `max_chars` have gathered. So a slow model's
every token leaves without delay, a fast model costs one publish per few milliseconds (not one per
token), and a slow broker never slows the model's loop; publishes keep their order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class PumpFailed(Exception):
    """The pump could not publish; the answer must end."""


class DeltaPump:
    def __init__(
        self, publish: Callable[[str], Awaitable[object]], *, flush_after: float, max_chars: int
    ) -> None:
        if flush_after < 0 or max_chars < 1:
            raise ValueError("flush_after must be >= 0 and max_chars >= 1")
        self._publish = publish
        self._flush_after = flush_after
        self._max_chars = max_chars
        self._buffer: list[str] = []
        self._size = 0
        self._published: list[str] = []
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._drop = False
        self._task: asyncio.Task[None] | None = None
        self._window_ends = 0.0  # loop time until which new pieces are gathered (after a publish)
        self.error: BaseException | None = None

    @property
    def text(self) -> str:
        """Everything published so far, joined: what clients have seen of this answer."""
        return "".join(self._published)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delta-pump")

    def push(self, piece: str) -> None:
        """Add a piece. Raises `PumpFailed` once the pump has failed to publish."""
        if self.error is not None:
            raise PumpFailed("publishing deltas failed") from self.error
        if not piece:
            return
        self._buffer.append(piece)
        self._size += len(piece)
        self._wake.set()
        if self._size >= self._max_chars:
            self._full.set()

    async def close(self, *, flush: bool) -> None:
        """Stop the pump. With `flush`, publish what is buffered first; without, drop it."""
        self._closing = True
        self._drop = not flush
        self._wake.set()
        self._full.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                wait = self._window_ends - loop.time()
                if wait > 0 and not self._closing and self._size < self._max_chars:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), wait)
                chunk = "".join(self._buffer)
                self._buffer.clear()
                self._size = 0
                self._wake.clear()
                self._full.clear()
                if chunk and not self._drop:
                    await self._publish(chunk)
                    self._published.append(chunk)
                    self._window_ends = loop.time() + self._flush_after
                if self._closing and not self._buffer:
                    return
        except Exception as exc:  # reported through `error` and `push`, never lost
            log.warning("delta publish failed: %r", exc)
            self.error = exc
