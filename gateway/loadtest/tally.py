"""What one client process counted and measured, in a form that crosses process boundaries and
merges: named counters, counters by key (error codes, close codes, ...) and latency histograms."""

from __future__ import annotations

from collections import Counter
from typing import Any

from gateway.loadtest.stats import Histogram, StreamCheck

HISTOGRAMS = (
    "ack",
    "ttft_total",
    "ttft_added",
    "token_lag_user",
    "token_lag_watcher",
    "token_lag_agent",
    "fanout",
    "fanout_agent",
    "takeover",
    "takeover_agent",
)
KEYED = (
    "errors",
    "close_codes",
    "connect_failures",
    "answer_status",
    "tokens_per_answer",
    "follow_failures",
    "takeover_errors",
    "agent_max_subscriptions",
    "message_refusals",
    "open_refusals",
)


class Tally:
    __slots__ = ("counts", "hist", "keyed")

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.keyed: dict[str, Counter[str]] = {name: Counter() for name in KEYED}
        self.hist: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}

    def histogram(self, name: str) -> Histogram:
        """The histogram `name`, created on first use (a new kind of client brings its own)."""
        return self.hist.setdefault(name, Histogram())

    def add_check(self, check: StreamCheck) -> None:
        """Add one socket's stream check (once, when the socket is done)."""
        c = self.counts
        c["seq_gaps"] += check.gaps
        c["seq_missing"] += check.missing
        c["seq_duplicates"] += check.duplicates
        c["late_deltas"] += check.late_deltas
        c["late_deltas_taken_over"] += check.late_taken_over
        c["duplicate_ai_end"] += check.duplicate_ends
        c["text_mismatches"] += check.text_mismatches
        c["unfinished_answers"] += check.unfinished

    def merge(self, other: Tally) -> None:
        self.counts.update(other.counts)
        for name, counter in other.keyed.items():
            self.keyed.setdefault(name, Counter()).update(counter)
        for name, histogram in other.hist.items():
            self.hist.setdefault(name, Histogram()).merge(histogram)

    def to_state(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "keyed": {name: dict(counter) for name, counter in self.keyed.items()},
            "hist": {name: h.to_state() for name, h in self.hist.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Tally:
        tally = cls()
        tally.counts.update(state["counts"])
        for name, counter in state["keyed"].items():
            tally.keyed[name] = Counter(counter)
        for name, h in state["hist"].items():
            tally.hist[name] = Histogram.from_state(h)
        return tally
