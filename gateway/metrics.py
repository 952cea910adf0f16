"""Prometheus metrics of one gateway process; also the core's Observer."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from core.types import AnswerStatus
from gateway.protocol import CLIENT_TYPES

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: what `chatgw loadtest`
        # reads to report the gateway's CPU per delivered delta.
        ProcessCollector(registry=r)
        self.sockets = Gauge("chatgw_ws_connections", "Open WebSocket connections.", registry=r)
        self.frames_in = Counter(
            "chatgw_ws_frames_in", "Client frames received, by type.", ["type"], registry=r
        )
        # Frames sent, by type: counted in plain integers and read on scrape (one count per frame
        # sent, the hottest counter; a prometheus Counter's lock showed in profiles).
        self.frames_out = _FramesOut()
        r.register(self.frames_out)
        self.messages = Counter(
            "chatgw_messages_processed", "User messages handled, by outcome.", ["outcome"], registry=r
        )
        self.ttft = Histogram(
            "chatgw_llm_time_to_first_token_seconds",
            "From a user message stored to the model's first text piece.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.answers = Counter(
            "chatgw_answers", "Assistant answers ended, by status.", ["status"], registry=r
        )
        self.errors = Counter("chatgw_errors", "Errors, by code or type.", ["code"], registry=r)
        self.steps = Histogram(
            "chatgw_message_processing_seconds",
            "Time of each step of the per-message pipeline.",
            ["step"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.tokens = Counter(
            "chatgw_llm_pieces_relayed", "Text pieces (tokens, roughly) received from the model.", registry=r
        )
        self.db_pool = Gauge(
            "chatgw_db_pool_connections", "PostgreSQL pool connections, by state.", ["state"], registry=r
        )
        self.db_pool_waits = Gauge(
            "chatgw_db_pool_waits",
            "Queries that found every pooled PostgreSQL connection busy and queued (since start).",
            registry=r,
        )
        self.db_pool_wait_seconds = Gauge(
            "chatgw_db_pool_wait_seconds", "Seconds those queries waited, in all (since start).", registry=r
        )
        self.redis_transport = Gauge(
            "chatgw_redis_broker",
            "The Redis broker client since start: commands, round_trips (pipelines), most_in_flight"
            " (pipelines at once), pool_waits (calls queued with every connection busy), pool_size.",
            ["what"],
            registry=r,
        )
        self.redis_limiter = Gauge(
            "chatgw_redis_limiter",
            "The rate limiter's Redis client since start, as chatgw_redis_broker: commands, round_trips,"
            " most_in_flight, pool_waits, pool_size.",
            ["what"],
            registry=r,
        )
        self.answers_active = Gauge(
            "chatgw_answers_active", "Conversations with an answer running on this instance.", registry=r
        )
        self.answers_active_limit = Gauge(
            "chatgw_answers_active_limit",
            "The limit in force on answers at once (CHATGW_MAX_ACTIVE_ANSWERS, less while the event"
            " loop lags); beyond it new answers are refused (0: no limit).",
            registry=r,
        )
        self.answers_active_cap = Gauge(
            "chatgw_answers_active_cap", "CHATGW_MAX_ACTIVE_ANSWERS (0: no limit).", registry=r
        )
        self.event_loop_lag = Gauge(
            "chatgw_event_loop_lag_seconds",
            "How late the event loop ran a timer, at the last sample (every 0.25 s).",
            registry=r,
        )
        self.event_loop_lag_recent = Gauge(
            "chatgw_event_loop_lag_recent_seconds",
            "The event loop's lag averaged over the last second's samples; over"
            " CHATGW_OVERLOAD_ARRIVALS_LAG_MS, new conversations and sockets are refused.",
            registry=r,
        )
        self.db_pool_wait_recent = Gauge(
            "chatgw_db_pool_wait_recent_seconds",
            "How long the queries that got a pooled database connection in the last second waited"
            " for it, on average; over CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS, new conversations and"
            " sockets are refused.",
            registry=r,
        )
        self.arrivals_refused = Counter(
            "chatgw_arrivals_refused",
            "New conversations (kind=session) and new widget sockets (kind=socket) refused while the"
            " instance was overloaded (CHATGW_OVERLOAD_ARRIVALS_LAG_MS, CHATGW_OVERLOAD_ARRIVALS_DB_WAIT_MS).",
            ["kind"],
            registry=r,
        )
        self.redis_reconnects = Gauge(
            "chatgw_redis_reconnects", "Times the Redis pub/sub connection was re-established.", registry=r
        )
        self.cache = Counter(
            "chatgw_template_cache", "Flow and template cache lookups, by result.", ["result"], registry=r
        )

        self.agent_connections = Gauge(
            "chatgw_agent_connections", "Open agent WebSocket connections.", registry=r
        )
        self.takeovers = Counter(
            "chatgw_takeovers", "Takeovers that changed the mode, by business.", ["business"], registry=r
        )
        self.handbacks = Counter("chatgw_handbacks", "Handbacks, by business.", ["business"], registry=r)
        self.conversations = Gauge(
            "chatgw_conversations",
            "Conversations of all businesses active in the snapshot window (CHATGW_SNAPSHOT_WINDOW_S), by mode.",
            ["mode"],
            registry=r,
        )
        self.conversations_counted_at = float("-inf")  # time.monotonic() of the last count
        self.takeover_seconds = Histogram(
            "chatgw_takeover_to_ai_end_seconds",
            "From a takeover frame arriving to the ai_end of the answer it ended being published.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )

    def frame_in(self, frame_type: str) -> None:
        """Count a received frame; types outside the protocol count as 'invalid' (bounded labels)."""
        self.frames_in.labels(frame_type if frame_type in CLIENT_TYPES else "invalid").inc()

    def watch(
        self,
        *,
        pool: Callable[[], tuple[int, int]] | None,
        reconnects: Callable[[], int] | None,
        pool_waits: Callable[[], tuple[int, float]] | None = None,
        redis: Callable[[], dict[str, int]] | None = None,
        limiter_redis: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        """Read the database pool's size, use and waits, the Redis broker's and the rate limiter's
        client counters and the broker's reconnects, at each scrape."""
        if pool is not None:
            self.db_pool.labels("open").set_function(lambda: pool()[0])
            self.db_pool.labels("idle").set_function(lambda: pool()[1])
        if pool_waits is not None:
            self.db_pool_waits.set_function(lambda: pool_waits()[0])
            self.db_pool_wait_seconds.set_function(lambda: pool_waits()[1])
        for gauge, stats in ((self.redis_transport, redis), (self.redis_limiter, limiter_redis)):
            if stats is not None:
                for what in ("commands", "round_trips", "most_in_flight", "pool_waits", "pool_size"):
                    gauge.labels(what).set_function(_reader(stats, what))
        if reconnects is not None:
            self.redis_reconnects.set_function(reconnects)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # Observer (core.observer)
    def message_processed(self, outcome: str) -> None:
        self.messages.labels(outcome).inc()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def pieces(self, count: int) -> None:
        self.tokens.inc(count)

    def answer_ended(self, status: AnswerStatus) -> None:
        self.answers.labels(status.value).inc()

    def frame_out(self, frame_type: str) -> None:
        """Count a frame sent (the server's own types: a bounded set)."""
        counts = self.frames_out.counts
        counts[frame_type] = counts.get(frame_type, 0) + 1

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def step_seconds(self, step: str, seconds: float) -> None:
        self.steps.labels(step).observe(seconds)

    def flow_cache(self, hit: bool) -> None:
        self.cache.labels("hit" if hit else "miss").inc()


def _reader(stats: Callable[[], dict[str, int]], key: str) -> Callable[[], float]:
    return lambda: stats().get(key, 0)


class _FramesOut(Collector):
    """`chatgw_ws_frames_out_total{type}`, from counts kept as plain integers."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("chatgw_ws_frames_out", "Frames sent, by type.", labels=["type"])
        for frame_type, count in sorted(self.counts.items()):
            family.add_metric([frame_type], count)
        yield family
