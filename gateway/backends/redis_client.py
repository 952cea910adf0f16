"""The Redis client of both Redis backends: a bounded blocking pool, automatic pipelining, and the
translation of every redis-py exception into the core's.

redis-py sends each command on a pooled connection of its own and waits for its reply, so many
concurrent answers cost one round trip (and one connection) per delta, and its default pool fails
at once when its connections are all in use. `AutoPipelineRedis` instead sends the commands issued
during one event-loop tick as one pipeline: one write, one read, one connection. redis-py has no
such mode (ioredis's `enableAutoPipelining` is the model), so it is written here, on top of
redis-py's own pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from core.errors import CoreError, Unavailable

RETRY_AFTER_MS: Final = 1000
DEFAULT_POOL_SIZE: Final = 16

# Error replies that say "not now" rather than "never": a replica during a failover (READONLY), a
# server loading its data (LOADING) or running a slow script (BUSY), out of memory (OOM), unable
# to persist (MISCONF), a cluster re-sharding (TRYAGAIN, CLUSTERDOWN, MASTERDOWN), a script cache
# emptied between a load and its use (NOSCRIPT).
_TRANSIENT_REPLIES: Final = frozenset(
    {"READONLY", "LOADING", "BUSY", "OOM", "MISCONF", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "NOSCRIPT"}
)
_TRANSIENT_TYPES: Final = (
    ConnectionError,  # refused, reset, closed; also LOADING and "max number of clients reached"
    RedisTimeoutError,
    ReadOnlyError,
    OutOfMemoryError,
    TryAgainError,
    ClusterDownError,  # and MasterDownError
    NoScriptError,
    OSError,
    TimeoutError,
)


def translate(exc: BaseException, what: str) -> CoreError:
    """The core's exception for a redis-py (or socket) failure of `what`: `Unavailable`, with a
    retry hint, for what may pass (an outage, a timeout, a failover, a busy or loading server);
    `CoreError` (internal) for what will not (a wrong key type, a script bug)."""
    if isinstance(exc, CoreError):
        return exc
    if isinstance(exc, _TRANSIENT_TYPES) or (
        isinstance(exc, ResponseError) and _code(exc) in _TRANSIENT_REPLIES
    ):
        return Unavailable(
            f"{what} failed: redis is unavailable ({describe(exc)})", retry_after_ms=RETRY_AFTER_MS
        )
    if isinstance(exc, ResponseError):
        return CoreError(f"{what} failed: redis refused the command ({describe(exc)})")
    return Unavailable(f"{what} failed: {describe(exc)}", retry_after_ms=RETRY_AFTER_MS)


def _code(exc: ResponseError) -> str:
    """The error reply's code: redis-py keeps it apart for the replies it maps to a class of its
    own, and leaves it in front of the message for the others."""
    return exc.status_code or str(exc).split(" ", 1)[0]


def describe(exc: BaseException) -> str:
    """The exception's type and message (redis-py's own repr leaves the message out)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(slots=True)
class _Call:
    args: tuple[EncodableT, ...]
    options: dict[str, Any]
    future: asyncio.Future[Any]


class AutoPipelineRedis(redis.asyncio.Redis):
    """A `redis.asyncio.Redis` whose commands issued in one event-loop tick go out as one pipeline.

    - Every call gets its own reply or its own error: an error reply (a script's refusal,
      NOSCRIPT, READONLY) fails that call only; a failed connection fails every call of its
      pipeline (after the resend the pool's retry policy allows), whose outcome is then unknown.
    - Commands of one pipeline run in the order they were issued, one after another (not as a
      transaction). A caller that awaits each call before the next keeps its order across
      pipelines; calls issued together in one tick keep theirs.
    - At most `max_pipelines` pipelines are in flight at once (set it to the pool's size, so that
      a pipeline never waits for a connection); calls issued meanwhile gather into the next one.
    - A call made while nothing is in flight or queued goes out at once, on its own (a quiet
      process pays nothing for the batching); from then on, calls gather.
    - A call whose caller was cancelled before its pipeline went out is not sent.

    `pipeline()` and `pubsub()` are redis-py's own and use the pool directly.
    """

    def __init__(self, *, max_pipelines: int, **kwargs: Any) -> None:
        if max_pipelines < 1:
            raise ValueError("max_pipelines must be >= 1")
        super().__init__(**kwargs)
        self._max_pipelines = max_pipelines
        self._queue: deque[_Call] = deque()
        self._scheduled = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._direct = 0  # calls sent at once, on their own, not answered yet
        self.commands_sent = 0
        """Commands sent so far (for metrics and benchmarks)."""
        self.pipelines_sent = 0
        """Pipelines (round trips) they took."""
        self.most_in_flight = 0
        """The most pipelines that were in flight at once (for sizing the pool)."""
        self.pool_waits = 0
        """Calls queued while every pooled connection carried a pipeline (they wait, not fail)."""

    async def execute_command(self, *args: EncodableT, **options: Any) -> Any:
        if not self._queue and not self._in_flight and not self._direct:
            return await self._send_at_once(args, options)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if len(self._in_flight) + self._direct >= self._max_pipelines:
            self.pool_waits += 1
        self._queue.append(_Call(args, options, future))
        self._schedule()
        return await future

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        while self._queue:
            call = self._queue.popleft()
            if not call.future.done():
                call.future.set_exception(ConnectionError("the client was closed"))
        if self._in_flight:
            await asyncio.wait(self._in_flight)
        await super().aclose(close_connection_pool)

    async def _send_at_once(self, args: tuple[EncodableT, ...], options: dict[str, Any]) -> Any:
        self._direct += 1
        self.commands_sent += 1
        self.pipelines_sent += 1
        self.most_in_flight = max(self.most_in_flight, 1)
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        finally:
            self._direct -= 1
            self._schedule()

    def _schedule(self) -> None:
        busy = len(self._in_flight) + self._direct
        if not self._scheduled and self._queue and busy < self._max_pipelines:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        calls = [call for call in self._queue if not call.future.done()]
        self._queue.clear()
        if not calls:
            return
        task = asyncio.get_running_loop().create_task(self._send(calls), name="redis-pipeline")
        self._in_flight.add(task)
        self.most_in_flight = max(self.most_in_flight, len(self._in_flight) + self._direct)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._schedule()

    async def _send(self, calls: list[_Call]) -> None:
        self.commands_sent += len(calls)
        self.pipelines_sent += 1
        try:
            replies = await self._replies(calls)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else ConnectionError("the pipeline was cancelled")
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for call, reply in zip(calls, replies, strict=True):
            if call.future.done():
                continue
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _replies(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply, or its error reply as an exception, in order."""
        if len(calls) == 1:  # alone: redis-py's own path, without a pipeline's bookkeeping
            try:
                return [await super().execute_command(*calls[0].args, **calls[0].options)]  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                return [exc]
        pipe = self.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*call.args, **call.options)
        return await pipe.execute(raise_on_error=False)


def auto_pipelined(
    url: str, *, pool_size: int, timeout: float, resend_after_timeout: bool
) -> AutoPipelineRedis:
    """A client on a `BlockingConnectionPool` of at most `pool_size` connections: a call that finds
    them all busy waits up to `timeout` seconds for one (then fails `Unavailable`), instead of
    failing at once. `timeout` is also the socket timeout.

    A pipeline whose connection fails is sent once more on a new connection: the usual case is a
    pooled connection the server closed while it was idle (a restart), which redis-py notices only
    on use, and nothing ran. A reply that does not come in time is sent again only with
    `resend_after_timeout`: the commands may have run, so only for commands safe to run twice."""
    if pool_size < 1:
        raise ValueError("the Redis pool size must be >= 1")
    resend_on: tuple[type[RedisError], ...] = (ConnectionError,)
    if resend_after_timeout:
        resend_on = (ConnectionError, RedisTimeoutError)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=pool_size,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 1, supported_errors=resend_on),
    )
    client = AutoPipelineRedis(connection_pool=pool, max_pipelines=pool_size)
    client.auto_close_connection_pool = True  # the client owns its pool
    return client


def transport_stats(client: redis.asyncio.Redis | None) -> dict[str, int]:
    """A pipelining client's counters (commands, round trips, the most pipelines in flight, calls
    that waited for a connection) and its pool size, for metrics; empty for any other client."""
    if not isinstance(client, AutoPipelineRedis):
        return {}
    return {
        "commands": client.commands_sent,
        "round_trips": client.pipelines_sent,
        "most_in_flight": client.most_in_flight,
        "pool_waits": client.pool_waits,
        "pool_size": client._max_pipelines,
    }


async def close_quietly(client: redis.asyncio.Redis | None) -> None:
    if client is not None:
        with contextlib.suppress(RedisError, OSError):
            await client.aclose()
