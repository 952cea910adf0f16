"""Work budgets for what business admins configure: conditions and templates run on one.

A `Budget` counts steps (interpreter nodes, loop iterations, calls) and watches a deadline. The
code that runs a business's condition or template ticks it at every step and stops with
`BudgetExceeded` when either runs out, so no configuration can run for long, whatever it says.
The step limit is what normally stops runaway work (the same for every run, so tested exactly);
the deadline is the backstop for steps that are each slow.

The budget of the work running now is in a context variable, so the evaluators that tick it
need no extra argument (and each thread or task has its own).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar


class BudgetExceeded(Exception):
    """A condition or template used up its budget; `str()` says which limit, for the admin."""


class Budget:
    """Steps and time for one piece of work; `within` another budget, a step counts in both (the
    stage selection's budget covers all its conditions, each of which has its own)."""

    __slots__ = ("deadline", "max_seconds", "max_steps", "steps", "what", "within")

    def __init__(
        self, what: str, *, max_steps: int, max_seconds: float, within: Budget | None = None
    ) -> None:
        self.what = what
        self.max_steps = max_steps
        self.max_seconds = max_seconds
        self.within = within
        self.steps = 0
        self.deadline = time.monotonic() + max_seconds

    def tick(self, steps: int = 1) -> None:
        """Count `steps`; raise `BudgetExceeded` when the steps or the time are used up."""
        if self.within is not None:
            self.within.tick(steps)
        self.steps += steps
        if self.steps > self.max_steps:
            raise BudgetExceeded(f"{self.what} took more than {self.max_steps} steps (the limit)")
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"{self.what} took longer than {self.max_seconds:g} s (the limit)")


_CURRENT: ContextVar[Budget | None] = ContextVar("chatgw_budget", default=None)


@contextlib.contextmanager
def running(budget: Budget) -> Iterator[Budget]:
    """Make `budget` the current one while the block runs."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def current() -> Budget | None:
    """The budget of the work running now, if any."""
    return _CURRENT.get()


def tick(steps: int = 1) -> None:
    """Tick the current budget (nothing when no budget runs, e.g. in a save-time check)."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.tick(steps)
