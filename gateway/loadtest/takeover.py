"""One followed conversation's takeovers and handbacks, decided purely.

The agent socket feeds a `TakeoverCycle` what it sees of the conversation (answer starts, deltas,
ends, mode changes, errors) and the firing of the conversation's one timer; the cycle answers with
what to do next: nothing, `Wait(seconds)` (restart the timer, then call `fired`) or `Send(kind)`
(send `takeover` or `handback` now). Random draws come in as arguments, so it is deterministic.

    IDLE --ai_start, picked--> PICKED --its first delta--> WAITING --timer--> SENT (send takeover)
    SENT --mode human, this agent--> HELD --timer (the hold)--> HANDING_BACK (send handback)
    HANDING_BACK --mode ai--> IDLE

An answer that ends before its takeover point is `skipped` (nothing is sent). A refused takeover
goes back to IDLE; a refused handback is tried again after another hold.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass


class Phase(enum.Enum):
    IDLE = "idle"
    PICKED = "picked"  # this answer will be taken over: waiting for its first delta
    WAITING = "waiting"  # the takeover point is set
    SENT = "sent"  # takeover sent, no mode event yet
    HELD = "held"  # this agent holds the conversation
    HANDING_BACK = "handing_back"  # handback sent, no mode event yet


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float


@dataclass(frozen=True, slots=True)
class Send:
    kind: str  # "takeover" or "handback"


Step = Wait | Send | None


class TakeoverCycle:
    """Counts go to `counts` (shared by every conversation of a process) under `takeovers_*` and
    `handbacks_*` keys; see the module docstring for the states."""

    __slots__ = ("agent_id", "counts", "cut", "hold", "phase", "target", "within")

    def __init__(self, counts: Counter[str], agent_id: str, *, within: float, hold: float) -> None:
        self.counts = counts
        self.agent_id = agent_id
        self.within = within
        self.hold = hold
        self.phase = Phase.IDLE
        self.target: str | None = None  # the response picked or taken over
        self.cut = False  # the target ended taken_over

    def ai_start(self, response_id: str, *, picked: bool) -> None:
        if self.phase is Phase.IDLE and picked:
            self.phase, self.target, self.cut = Phase.PICKED, response_id, False

    def delta(self, response_id: str, draw: float) -> Step:
        """A delta; `draw` in [0, 1) places the takeover point within `within` s of the first."""
        if self.phase is Phase.PICKED and response_id == self.target:
            self.phase = Phase.WAITING
            return Wait(draw * self.within)
        return None

    def ai_end(self, response_id: str, status: str) -> None:
        if self.phase in (Phase.PICKED, Phase.WAITING) and response_id == self.target:
            self.phase = Phase.IDLE
            self.counts["takeovers_skipped"] += 1
        elif self.phase is Phase.SENT and status == "taken_over":
            # Whichever answer streamed when the takeover arrived: the target, or (when the target
            # had just ended) the next one.
            self.cut = True

    def fired(self) -> Step:
        """The timer ran out (a stale timer, in another phase, does nothing)."""
        if self.phase is Phase.WAITING:
            self.phase = Phase.SENT
            self.counts["takeovers_sent"] += 1
            return Send("takeover")
        if self.phase is Phase.HELD:
            self.phase = Phase.HANDING_BACK
            self.counts["handbacks_sent"] += 1
            return Send("handback")
        return None

    def mode(self, mode: str, agent_id: str | None) -> Step:
        if self.phase is Phase.SENT and mode == "human" and agent_id == self.agent_id:
            self.phase = Phase.HELD
            self.counts["takeovers_done"] += 1
            self.counts["takeovers_cut"] += self.cut
            return Wait(self.hold)
        if self.phase is Phase.HANDING_BACK and mode == "ai":
            self.phase = Phase.IDLE
            self.counts["handbacks_done"] += 1
        return None

    def error(self) -> Step:
        """An `error` frame naming the conversation: the takeover or handback in flight was refused."""
        if self.phase is Phase.SENT:
            self.phase = Phase.IDLE
            self.counts["takeovers_refused"] += 1
        elif self.phase is Phase.HANDING_BACK:
            self.phase = Phase.HELD
            self.counts["handbacks_refused"] += 1
            return Wait(self.hold)
        return None

    @property
    def idle(self) -> bool:
        return self.phase is Phase.IDLE

    def account_end(self) -> None:
        """Count what is still in flight when the run ends."""
        if self.phase is Phase.SENT:
            self.counts["takeovers_unanswered"] += 1
        elif self.phase is Phase.HANDING_BACK:
            self.counts["handbacks_unanswered"] += 1
        if self.phase in (Phase.HELD, Phase.HANDING_BACK):
            self.counts["takeovers_held_at_end"] += 1
