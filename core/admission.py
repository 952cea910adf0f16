"""Admission: how many conversations one instance answers at once, and when a refused one should
come back.

`max_active_answers` caps the conversations with an answer running (or about to) on this
instance. A user message that would start one more is refused before it is stored (`Overloaded`);
a conversation answering already is always admitted (its message waits for the running answer and
adds none).

Below that cap the limit adapts to what the process can do now (`watch`): the event loop's lag
is sampled every `tick` seconds; while it is over `lag_target` the limit shrinks by a tenth per
tick (down to `floor`), and while it is under half of it and the limit is what holds answers
back, it grows by one per tick (up to the cap). On a machine whose CPU is taken by others the
same cap would let answers pile up until lease renewals and keepalive pings are late; the lag is
what says so first.

A refusal says when to try again. A fixed delay makes every refused client come back at once and
keeps the instance busy refusing (at 1,000 conversations and 100 answers at a time, refusals cost
the instance more than the answers did: bench/README.md, "Overload"). So `retry_after_ms`
estimates the wait instead, by Little's law: the conversations refused in the last `window`
seconds (all waiting for a slot) times the time an answer takes (a moving average), divided by the
slots; between the configured minimum and `max_retry_ms`, then spread by a random share of up to
half of it.

The same lag also says when the instance should take no new arrivals: while the event loop's lag,
averaged over the last second of ticks, is over `arrivals_lag`, `admit_arrival` refuses a new
conversation or a new socket (`Overloaded`) before it costs a query. Shedding answers is the
first response to lag; this is the next one, for when that was not enough: at 1,000 conversations
on a starved CPU, creating a session and saying hello on a new socket took longer than clients
waited (bench/README.md, "Overload"): work taken on for clients that had given up, and no word to
them of when to come back. Refusing them at once costs the instance almost nothing. Their `retry_after_ms`
spreads them out the same way: the arrivals refused in the last `window` seconds, brought back
at about `ARRIVAL_RETRIES_PER_SECOND` in all, between the configured minimum and `max_retry_ms`,
plus a random share of up to half.

The event loop is not the only queue an arrival waits in. A process whose loop keeps up can still
have its database pool queued for seconds (at 1,000 conversations on PostgreSQL the loop ran
20-50 ms late while queries waited 1-3.7 s for a connection: a new conversation's few queries
then outlast the client's patience just the same). So, when the caller gives `queue_waits` (the
pool's running count of queries that waited for a connection and the seconds they waited), an
arrival is also refused while the queries that got a connection in the last second waited over
`arrivals_queue_wait` on average.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Collection

from core.errors import Overloaded
from core.types import ConversationId

ARRIVAL_RETRIES_PER_SECOND = 50
"""How many refused arrivals in all a refusal's `retry_after_ms` aims to bring back per second
(each costs a request and its refusal, or a socket and its hello)."""


class Admission:
    def __init__(
        self,
        *,
        limit: int,
        retry_ms: int,
        max_retry_ms: int = 30_000,
        window: float = 10.0,
        lag_target: float = 0.0,
        tick: float = 0.25,
        floor: int = 16,
        arrivals_lag: float = 0.0,
        arrivals_queue_wait: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cap = limit
        self.limit = limit
        """The limit in force: the cap, or less while the event loop lags (0: no limit)."""
        self.lag_target = lag_target
        self.tick = tick
        self.floor = max(1, min(floor, limit))
        self.lag = 0.0
        """The event loop's lag at the last tick, in seconds."""
        self._limited = False  # a message was refused since the last tick
        self.arrivals_lag = arrivals_lag
        """New conversations and sockets are refused while the lag's mean over the last second is
        over this (seconds; 0: never)."""
        self._lags: deque[float] = deque(maxlen=max(1, round(1.0 / tick)))  # the last second's
        self.arrivals_queue_wait = arrivals_queue_wait
        """New conversations and sockets are refused while the queries that got a pooled
        connection in the last second waited longer than this for it, on average (seconds; 0:
        never)."""
        self.queue_waits: Callable[[], tuple[int, float]] | None = None
        """The pool's running (queries that waited for a connection, seconds they waited), when
        there is a pool (set by the caller)."""
        self._queue_seen: tuple[int, float] | None = None
        self._queue: deque[tuple[int, float]] = deque(maxlen=max(1, round(1.0 / tick)))  # per tick
        self._arrivals_refused: deque[float] = deque()  # when, within the last `window` seconds
        self.retry_ms = retry_ms
        self.max_retry_ms = max(max_retry_ms, retry_ms)
        self.window = window
        self._clock = clock
        self._admitting: Counter[ConversationId] = Counter()  # admitted, not scheduled yet
        self._seconds: float | None = None  # how long an answer runs (moving average)
        self._refused: dict[ConversationId, float] = {}  # conversation -> its last refusal

    def reserve(self, conversation_id: ConversationId, active: Collection[ConversationId]) -> None:
        """Admit a message that may start an answer, with `active` the conversations answering
        now; `Overloaded` when that would be one too many. Call `release` once the answer is
        scheduled (or the message came to nothing)."""
        if self.limit and conversation_id not in active and conversation_id not in self._admitting:
            admitting = sum(1 for cid in self._admitting if cid not in active)
            if len(active) + admitting >= self.limit:
                self._limited = True
                retry_ms = self.retry_after_ms(conversation_id)
                raise Overloaded(
                    f"this instance is answering as many conversations as it may ({self.limit}): the "
                    f"message was not taken, send it again in {retry_ms} ms",
                    retry_after_ms=retry_ms,
                )
        self._refused.pop(conversation_id, None)
        self._admitting[conversation_id] += 1

    def release(self, conversation_id: ConversationId) -> None:
        self._admitting[conversation_id] -= 1
        if self._admitting[conversation_id] <= 0:
            del self._admitting[conversation_id]

    def sample(self, lag: float) -> None:
        """One tick's event-loop lag (seconds late): adapt the limit (see the module docstring)."""
        self.lag = lag
        self._lags.append(lag)
        if self.queue_waits is not None:
            seen = self.queue_waits()
            if self._queue_seen is not None:
                self._queue.append((seen[0] - self._queue_seen[0], seen[1] - self._queue_seen[1]))
            self._queue_seen = seen
        limited, self._limited = self._limited, False
        if not self.cap or not self.lag_target:
            return
        if lag > self.lag_target:
            self.limit = max(self.floor, int(self.limit * 0.9))
        elif lag < self.lag_target / 2 and limited and self.limit < self.cap:
            self.limit += 1

    @property
    def watching(self) -> bool:
        """Whether the lag is needed (`watch` is worth running)."""
        return bool((self.cap and self.lag_target) or self.arrivals_lag or self.arrivals_queue_wait)

    @property
    def recent_lag(self) -> float:
        """The event loop's lag, averaged over the last second's ticks (seconds; 0 before any)."""
        return sum(self._lags) / len(self._lags) if self._lags else 0.0

    @property
    def recent_queue_wait(self) -> float:
        """How long the queries that got a pooled connection in the last second waited for it, on
        average (seconds; 0 when none waited, or without `queue_waits`)."""
        waits = sum(n for n, _ in self._queue)
        return sum(seconds for _, seconds in self._queue) / waits if waits else 0.0

    def admit_arrival(self, what: str) -> None:
        """Take a new arrival (`what`: "a new conversation", "a new socket"), or raise `Overloaded`
        while the event loop's recent lag is over `arrivals_lag`, or the pool's recent wait over
        `arrivals_queue_wait` (see the module docstring)."""
        lag, wait = self.recent_lag, self.recent_queue_wait
        if self.arrivals_lag and lag > self.arrivals_lag:
            why = f"its event loop ran {lag * 1000:.0f} ms late on average over the last second"
        elif self.arrivals_queue_wait and wait > self.arrivals_queue_wait:
            why = f"its database queries waited {wait * 1000:.0f} ms for a connection on average over the last second"
        else:
            return
        retry_ms = self._arrival_retry_ms()
        raise Overloaded(
            f"this instance is overloaded ({why}): {what} is not taken now, try again in {retry_ms} ms",
            retry_after_ms=retry_ms,
        )

    def _arrival_retry_ms(self) -> int:
        now = self._clock()
        refused = self._arrivals_refused
        refused.append(now)
        while refused[0] < now - self.window:
            refused.popleft()
        wait_ms = len(refused) * 1000 // ARRIVAL_RETRIES_PER_SECOND
        base = min(self.max_retry_ms, max(self.retry_ms, wait_ms))
        return base + random.randrange(base // 2 + 1)

    async def watch(self) -> None:
        """Sample the event loop's lag every `tick` seconds, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.tick
            await asyncio.sleep(self.tick)
            self.sample(max(0.0, loop.time() - due))

    def answer_ended(self, seconds: float) -> None:
        """An answer that ran for `seconds` ended here (any status): its slot is free."""
        if self._seconds is None:
            self._seconds = seconds
        else:
            self._seconds += 0.1 * (seconds - self._seconds)

    def retry_after_ms(self, refused: ConversationId) -> int:
        now = self._clock()
        self._refused.pop(refused, None)
        self._refused[refused] = now  # ordered by last refusal, oldest first
        horizon = now - self.window
        while (oldest := next(iter(self._refused))) != refused and self._refused[oldest] < horizon:
            del self._refused[oldest]
        wait_ms = self.retry_ms
        if self._seconds is not None and self.limit:
            wait_ms = int(len(self._refused) * self._seconds / self.limit * 1000)
        base = min(self.max_retry_ms, max(self.retry_ms, wait_ms))
        return base + random.randrange(base // 2 + 1)
