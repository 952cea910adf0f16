"""Run a coroutine on uvloop when it is installed (it comes with `uvicorn[standard]`), else asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # an install without uvicorn's extras: plain asyncio works, only slower
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T]) -> _T:
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
