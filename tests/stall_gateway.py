"""`python -m tests.stall_gateway serve --host H --port P`: the gateway as `chatgw serve` runs it,
except that a user message starting with `STALL_MARK` holds up the whole event loop (a blocking
sleep in the pipeline, on the loop's own thread) for `CHATGW_TEST_STALL_S` seconds.

The gateway's own limits keep every business's configuration from doing that (it runs off the loop
on a budget); this launcher stands for whatever else might, so that a test can check that a stall
longer than the answer lease never ends another conversation's answer on the same instance.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from core.flow_models import Flow
from core.models import Business, Conversation, Message
from core.pipeline import Pipeline, Prepared
from gateway.cli import main

STALL_MARK = "stall-the-loop"

_prepare = Pipeline.prepare


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


def _patch() -> None:
    setattr(Pipeline, "prepare", _stalling_prepare)  # noqa: B010 - mypy refuses a method assignment


if __name__ == "__main__":
    _patch()
    args: Any = sys.argv[1:]
    sys.exit(main(args))
