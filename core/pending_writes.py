"""PendingWrites: store writes that must not be lost, kept and retried while the store is down.

An ended answer's `ai_end` goes out through the broker before its row is written (the broker
assigns its seq). If the store is unavailable at that moment (PostgreSQL restarting, the network
cut), the write is kept here, keyed by what it writes (the response id), and tried again with a
capped backoff until the store takes it; so history and replay agree once the store is back. The
writes must be idempotent (`Store.finish_answer` is, on the response id and its seq).

Only `Unavailable` is retried: any other failure cannot succeed by waiting, and is logged.
The writes live in this process: an instance that dies while the store is down loses the ones it
kept (documented in docs/decisions.md).

Written here rather than with a retry library: the loop is a dozen lines, and what it needs
(one background task draining a keyed set, in order, stopping at the first `Unavailable`) is not
what per-call retry decorators offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from core.errors import CoreError, Unavailable

log = logging.getLogger(__name__)

Write = Callable[[], Awaitable[object]]


class PendingWrites:
    def __init__(self, *, what: str, first_delay: float = 0.5, max_delay: float = 5.0) -> None:
        self._what = what
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._writes: dict[str, Write] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._writes)

    def add(self, key: str, write: Write) -> None:
        """Keep `write` (replacing one kept under the same key) and retry it in the background."""
        self._writes[key] = write
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._retry_forever(), name=f"pending-{self._what}")

    async def flush(self) -> bool:
        """Try every kept write once, oldest first, stopping at the first `Unavailable`.
        Returns whether any write went through."""
        progressed = False
        for key, write in list(self._writes.items()):
            try:
                await write()
            except Unavailable:
                return progressed
            except CoreError as exc:  # waiting cannot make it succeed
                log.error("writing a kept %s failed for good: %s", self._what, exc.message)
            except Exception:
                log.exception("writing a kept %s failed for good", self._what)
            else:
                log.info("kept %s %s written", self._what, key)
                progressed = True
            if self._writes.get(key) is write:
                del self._writes[key]
        return progressed

    async def aclose(self, *, grace: float) -> None:
        """Stop retrying in the background; try what is left once more, for up to `grace` seconds."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._writes:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.flush()
        if self._writes:
            log.error("%d %s(s) could not be written before shutdown", len(self._writes), self._what)

    async def _retry_forever(self) -> None:
        delay = self._first_delay
        while self._writes:
            await asyncio.sleep(delay)
            progressed = await self.flush()
            delay = self._first_delay if progressed else min(delay * 2, self._max_delay)
