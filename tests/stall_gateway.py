"""`python -m tests.stall_gateway serve --host H --port P`: the gateway as `chatgw serve` runs it,
except that a user message starting with `STALL_MARK` holds up the whole event loop (a blocking
sleep in the pipeline, on the loop's own thread) for `CHATGW_TEST_STALL_S` seconds; and that,
while the file named by `CHATGW_TEST_LAG_FILE` exists, the loop is held up for `LAG_BLOCK_S` at a
time, over and over, with one pass of the loop between (requests are still served, late).

Every tick of the gateway's lag watch (every 0.25 s) then falls within a block and finds the loop
at least `LAG_BLOCK_S` - 0.25 s late, whatever the machine's speed: a lag the gateway sees as
overload, for as long as the test keeps the file, and gone once it deletes it.

And while the file named by `CHATGW_TEST_DB_HOLD_FILE` exists, two tasks take turns holding a
pooled PostgreSQL connection for `DB_HOLD_S` (`SELECT pg_sleep`): with `CHATGW_DB_POOL_SIZE=1`
each waits about that long for the other's, so the pool's recent waits stay near `DB_HOLD_S`
while the loop keeps up.

The gateway's own limits keep every business's configuration from doing that (it runs off the loop
on a budget); this launcher stands for whatever else might, so that a test can check that a stall
longer than the answer lease never ends another conversation's answer on the same instance.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from core.answers import AnswerRunner
from core.flow_models import Flow
from core.models import Business, Conversation, Message
from core.pipeline import Pipeline, Prepared
from gateway.cli import main

STALL_MARK = "stall-the-loop"
LAG_BLOCK_S = 0.5
DB_HOLD_S = 0.5

_prepare = Pipeline.prepare
_start = AnswerRunner.start
_lagging: set[asyncio.Task[None]] = set()


async def _stalling_prepare(
    self: Pipeline,
    business: Business,
    conversation: Conversation,
    flow: Flow,
    message: Message | None,
    history: Sequence[Message],
) -> Prepared:
    if message is not None and message.text.startswith(STALL_MARK):
        time.sleep(float(os.environ.get("CHATGW_TEST_STALL_S", "3")))  # noqa: ASYNC251 - on purpose
    return await _prepare(self, business, conversation, flow, message, history)


async def _lag_while(path: str) -> None:
    while True:
        if os.path.exists(path):  # noqa: ASYNC240 - a stat of a local file, on purpose
            time.sleep(LAG_BLOCK_S)  # noqa: ASYNC251 - on purpose
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.05)


async def _hold_db_while(store: Any, path: str) -> None:
    while True:
        if os.path.exists(path):  # noqa: ASYNC240 - a stat of a local file, on purpose
            await store._run(lambda c: c.fetchval("SELECT pg_sleep($1)", DB_HOLD_S))
        else:
            await asyncio.sleep(0.05)


def _lagging_start(self: AnswerRunner) -> None:
    _start(self)
    if _lagging:
        return
    loop = asyncio.get_running_loop()
    path = os.environ.get("CHATGW_TEST_LAG_FILE")
    if path:
        _lagging.add(loop.create_task(_lag_while(path), name="test-lag"))
    hold = os.environ.get("CHATGW_TEST_DB_HOLD_FILE")
    if hold:
        for n in range(2):
            _lagging.add(loop.create_task(_hold_db_while(self.store, hold), name=f"test-db-hold-{n}"))


def _patch() -> None:
    setattr(Pipeline, "prepare", _stalling_prepare)  # noqa: B010 - mypy refuses a method assignment
    setattr(AnswerRunner, "start", _lagging_start)  # noqa: B010


if __name__ == "__main__":
    _patch()
    args: Any = sys.argv[1:]
    sys.exit(main(args))
