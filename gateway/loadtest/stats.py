"""The load tool's analysis, as pure code: latency histograms and percentiles, per-socket stream
checks (every seq once and in order, no delta after its answer's end), send-time markers, and the
pairing of one delta's arrivals on two sockets. No sockets and no clocks here: callers pass times.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

_EXACT_BELOW = 2048  # values below this many µs are kept exactly
_PRECISION_BITS = 11  # above, 11 significant bits: a value is off by less than 0.1 %


def bucket(value_us: int) -> int:
    """The histogram bucket of a value in µs: the value itself below 2048, else the value with all
    but its 11 most significant bits cleared (so a bucket's key is its lower bound)."""
    if value_us < _EXACT_BELOW:
        return value_us
    shift = value_us.bit_length() - _PRECISION_BITS
    return (value_us >> shift) << shift


def percentile(counts: Mapping[int, int], p: float) -> int | None:
    """Nearest-rank percentile of the values `counts` holds (value -> how many times): the smallest
    value such that at least p % of all values are at most it. None when there are none."""
    if not 0 < p <= 100:
        raise ValueError("a percentile is above 0 and at most 100")
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise AssertionError("unreachable: the ranks add up to the total")


class Histogram:
    """Counts of latencies in µs, bucketed (see `bucket`); the maximum and sum are exact. Negative
    values (a clock that went backwards, or two hosts' clocks) count as 0 and are counted apart."""

    __slots__ = ("count", "counts", "max", "negative", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.max = 0
        self.negative = 0

    def add(self, value_us: int) -> None:
        if value_us < 0:
            self.negative += 1
            value_us = 0
        key = value_us if value_us < _EXACT_BELOW else bucket(value_us)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.count += 1
        self.total += value_us
        if value_us > self.max:
            self.max = value_us

    def merge(self, other: Histogram) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.negative += other.negative

    def summary_ms(self) -> dict[str, Any]:
        """`{count, mean, p50, p95, p99, max}` in milliseconds (None when empty), and `negative`."""

        def ms(value: int | None) -> float | None:
            return None if value is None else round(value / 1000, 3)

        return {
            "count": self.count,
            "mean": ms(self.total // self.count) if self.count else None,
            "p50": ms(percentile(self.counts, 50)),
            "p95": ms(percentile(self.counts, 95)),
            "p99": ms(percentile(self.counts, 99)),
            "max": ms(self.max) if self.count else None,
            "negative": self.negative,
        }

    def to_state(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "count": self.count,
            "total": self.total,
            "max": self.max,
            "negative": self.negative,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(v) for k, v in state["counts"].items()}
        h.count, h.total, h.max, h.negative = state["count"], state["total"], state["max"], state["negative"]
        return h


# Frame types that carry a conversation event seq (welcome, ack and reset carry other seqs).
EVENT_TYPES = frozenset({"message", "ai_start", "delta", "ai_end", "mode", "stage"})


class StreamCheck:
    """What one socket saw of its conversation's events, checked as they come.

    - seq: after `welcome` (seq N) the events must be N+1, N+2, ... each exactly once. A jump is a
      gap (`gaps` jumps, `missing` seqs skipped); a seq at or below the last one is a duplicate.
    - answers: each `ai_start` opens a response and its `ai_end` closes it, once (`duplicate_ends`).
      A `delta` of a response already ended is late (`late_deltas`; `late_taken_over` counts those
      of answers that ended `taken_over`). `text_mismatches` counts answers whose `ai_end.text` is
      not as long as their deltas joined (lengths only: cheap).
    """

    __slots__ = (
        "duplicate_ends",
        "duplicates",
        "ended",
        "gaps",
        "last_seq",
        "late_deltas",
        "late_taken_over",
        "missing",
        "open",
        "taken_over",
        "text_mismatches",
    )

    def __init__(self, start_seq: int) -> None:
        self.last_seq = start_seq
        self.gaps = 0
        self.missing = 0
        self.duplicates = 0
        self.late_deltas = 0
        self.late_taken_over = 0
        self.duplicate_ends = 0
        self.text_mismatches = 0
        self.open: dict[str, int] = {}  # response id -> characters received in its deltas
        self.ended: set[str] = set()
        self.taken_over: set[str] = set()  # the ended responses whose status was taken_over

    def seq(self, seq: int) -> bool:
        """Check one event's seq; False for a duplicate (the caller may ignore the frame)."""
        expected = self.last_seq + 1
        if seq == expected:
            self.last_seq = seq
            return True
        if seq > expected:
            self.gaps += 1
            self.missing += seq - expected
            self.last_seq = seq
            return True
        self.duplicates += 1
        return False

    def ai_start(self, response_id: str) -> None:
        self.open.setdefault(response_id, 0)

    def delta(self, response_id: str, text: str) -> bool:
        """Account a delta; False when it is late (its response already ended)."""
        if response_id in self.ended:
            self.late_deltas += 1
            if response_id in self.taken_over:
                self.late_taken_over += 1
            return False
        self.open[response_id] = self.open.get(response_id, 0) + len(text)
        return True

    def ai_end(self, response_id: str, text: str, status: str = "complete") -> bool:
        """Close a response with its `ai_end` status; False when it had already ended."""
        if response_id in self.ended:
            self.duplicate_ends += 1
            return False
        self.ended.add(response_id)
        if status == "taken_over":
            self.taken_over.add(response_id)
        if self.open.pop(response_id, 0) != len(text):
            self.text_mismatches += 1
        return True

    def observe(self, frame: Mapping[str, Any]) -> None:
        """Check one server frame (a convenience over the methods above, for whole sequences)."""
        kind = frame.get("type")
        if kind not in EVENT_TYPES or not self.seq(int(frame["seq"])):
            return
        if kind == "ai_start":
            self.ai_start(str(frame["response_id"]))
        elif kind == "delta":
            self.delta(str(frame["response_id"]), str(frame["text"]))
        elif kind == "ai_end":
            self.ai_end(str(frame["response_id"]), str(frame["text"]), str(frame.get("status")))

    @property
    def unfinished(self) -> int:
        """Responses started (or streaming) and not ended."""
        return len(self.open)


def check_frames(frames: Iterable[Mapping[str, Any]], start_seq: int = 0) -> StreamCheck:
    """Check a whole sequence of server frames as one socket received them."""
    check = StreamCheck(start_seq)
    for frame in frames:
        check.observe(frame)
    return check


class AskClock:
    """When the question that an answer answers was asked, as one user socket can tell.

    `since` is when the first message sent after the last `ai_start` went out: the next answer
    answers it. A takeover blurs that: a message waiting when the agent took over, or sent while an
    agent held the conversation, is answered after the handback (or never), together with whatever
    the user sends until then, so the next answer's question time is unknown (`started` gives
    None). A user's `stop` drops what was queued behind the stopped answer."""

    __slots__ = ("blurred", "human", "since")

    def __init__(self) -> None:
        self.since: int | None = None
        self.human = False
        self.blurred = False

    def sent(self, at: int) -> None:
        if self.human or self.blurred:
            self.blurred = True
        elif self.since is None:
            self.since = at

    def stopped(self) -> None:
        self.since = None

    def mode(self, human: bool) -> None:
        if human and self.since is not None:
            self.blurred = True
            self.since = None
        self.human = human

    def started(self) -> int | None:
        """An answer started: when its question was asked, or None when that cannot be told."""
        since = self.since
        self.since = None
        self.blurred = False
        return since

    @property
    def waiting(self) -> bool:
        """A question is out that no answer has started for (and no takeover blurred)."""
        return self.since is not None


class FanoutPairer:
    """Pairs a conversation's deltas as the user socket and its watchers receive them: each
    watcher's arrival time minus the user's, for the same seq. Keeps the last `window` seqs."""

    __slots__ = ("_early", "_user", "window")

    def __init__(self, window: int = 1024) -> None:
        self.window = window
        self._user: dict[int, int] = {}  # seq -> arrival on the user socket
        self._early: dict[int, list[int]] = {}  # seq -> arrivals on watchers before the user's

    def user(self, seq: int, at: int) -> list[int]:
        """The user socket got `seq` at `at`; returns lags of watchers that got it first (<= 0)."""
        self._user[seq] = at
        if len(self._user) > self.window:
            del self._user[next(iter(self._user))]
        early = self._early.pop(seq, None)
        return [t - at for t in early] if early else []

    def watcher(self, seq: int, at: int) -> int | None:
        """A watcher got `seq` at `at`: its lag behind the user socket, or None before the user's."""
        first = self._user.get(seq)
        if first is not None:
            return at - first
        self._early.setdefault(seq, []).append(at)
        if len(self._early) > self.window:
            del self._early[next(iter(self._early))]
        return None
