"""The load tool's sockets: what every kind has in common (connect, say hello, take the welcome,
read and dispatch frames, send, close), and what every client of one process shares (`Run`).

A kind is a `SocketClient` subclass: how it says hello and takes the welcome, what it does while
the run lasts (`act`), which stream check a conversation event goes to (`check_for`), and what it
makes of the frames it receives (the `on_*` hooks). Every socket checks its streams
(`StreamCheck`), counts deltas and measures each token's lag from the model server's send-time
marker. A socket the server closes is counted with its close code; the run goes on without it.

A `hello` refused with a hint (`error` `unavailable` or `rate_limited` with `retry_after_ms`, then
close 1013: the instance is overloaded, or a count is full) is tried again on a new socket after
that many milliseconds, as the widget does, until `--open-within` seconds after the first try; the
refusals are counted by reason (`open_refusals`), and only a socket that never opened is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from gateway.devtools.marker import MARKER_RE
from gateway.loadtest.config import LoadConfig, Target
from gateway.loadtest.stats import EVENT_TYPES, StreamCheck
from gateway.loadtest.tally import Tally

OPEN_TIMEOUT_S = 10.0
_MAX_FRAME = 1 << 22

RETRIED_CODES = frozenset({"unavailable", "rate_limited"})
"""Error codes of a refusal that says when to try again (with `retry_after_ms`): a message the
gateway did not take, or a socket or session it did not open, is tried again after that time."""


def retry_hint(code: object, retry_ms: object) -> float | None:
    """The seconds to wait before trying again what was refused with `code` and `retry_ms`, when
    the refusal says so; else None (not to be retried)."""
    if code in RETRIED_CODES and isinstance(retry_ms, int | float) and retry_ms >= 0:
        return float(retry_ms) / 1000
    return None


async def opened_within(
    tally: Tally, seconds: float, attempt: Callable[[], Awaitable[tuple[str | None, float | None]]]
) -> str | None:
    """Run `attempt` (a failure's reason or None, and the wait a refusal asked for) until it
    succeeds, fails without a hint, or its hinted wait would end more than `seconds` after the
    first try; each hinted refusal is counted by reason (`open_refusals`) and each new try
    (`opens_retried`). Returns the last failure's reason, or None."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while True:
        failure, wait = await attempt()
        if failure is None:
            return None
        if wait is None:
            return failure
        tally.keyed["open_refusals"][failure] += 1
        if loop.time() + wait > until:
            return failure
        tally.counts["opens_retried"] += 1
        await asyncio.sleep(wait)


@dataclass
class Run:
    """What every client of one process shares."""

    config: LoadConfig
    tally: Tally
    model_ttft_us: int | None = None  # the model server's configured TTFT, when known
    rng: random.Random = field(default_factory=random.Random)
    sending: bool = True  # users send messages, and agents pick answers to take over, while this holds


def now_ns() -> int:
    return time.monotonic_ns()


class SocketClient:
    """One WebSocket. Subclasses set `kind` and override `hello`, `welcome`, `check_for`, `checks`
    and the hooks."""

    kind: ClassVar[str] = "socket"

    def __init__(self, run: Run, target: Target) -> None:
        self.run = run
        self.tally = run.tally
        self.target = target
        self.ws: ClientConnection | None = None
        self.closing = False  # we close it: its close code is not the server's doing
        self.reader: asyncio.Task[None] | None = None
        self.last_frame = 0  # monotonic ns of the last frame received
        self._lag = run.tally.histogram(f"token_lag_{self.kind}")
        self._frames_key = f"delta_frames_{self.kind}"
        self._tokens_key = f"tokens_{self.kind}"

    def hello(self) -> dict[str, Any]:
        raise NotImplementedError

    def welcome(self, frame: dict[str, Any]) -> str | None:
        """Take the answer to `hello`: None when it is a welcome this socket can run with, else the
        failure's reason (counted in `connect_failures`)."""
        if frame.get("type") == "welcome":
            return None
        return f"hello_{frame.get('code') or frame.get('type')}"

    def check_for(self, frame: dict[str, Any]) -> StreamCheck | None:
        """The stream check a conversation event goes to (None: not followed, ignored)."""
        raise NotImplementedError

    def checks(self) -> Iterable[StreamCheck]:
        """Every stream check of the socket (accounted when it closes)."""
        raise NotImplementedError

    async def open(self) -> bool:
        """Connect, say hello, read the welcome and start reading; False (counted) on failure."""
        failure = await self._open()
        if failure is not None:
            self.tally.keyed["connect_failures"][failure] += 1
            self.tally.counts["sockets_failed"] += 1
            return False
        self.tally.counts["sockets_opened"] += 1
        self.tally.counts[f"opened_{self.kind}"] += 1
        self.reader = asyncio.create_task(self._read())
        return True

    async def _open(self) -> str | None:
        return await opened_within(self.tally, self.run.config.open_within, self._try_open)

    async def _try_open(self) -> tuple[str | None, float | None]:
        """One try: the failure's reason (None: open) and, for a refusal that says when to try
        again, the seconds to wait."""
        try:
            self.ws = await connect(
                self.target.ws,
                open_timeout=OPEN_TIMEOUT_S,
                max_size=_MAX_FRAME,
                compression=None,
                ping_interval=None,  # the server pings; the client answers on its own
                proxy=None,  # loopback targets: never through a proxy from the environment
                close_timeout=2,
            )
        except InvalidStatus as exc:
            return f"ws_http_{exc.response.status_code}", None
        except (InvalidHandshake, InvalidURI):
            return "ws_handshake", None
        except TimeoutError:
            return "ws_timeout", None
        except OSError:
            return "ws_refused", None
        failure: str | None
        wait = None
        try:
            await self.ws.send(orjson.dumps(self.hello()).decode())
            welcome = orjson.loads(await asyncio.wait_for(self.ws.recv(), OPEN_TIMEOUT_S))
        except TimeoutError:
            failure = "hello_timeout"
        except ConnectionClosed as exc:
            failure = f"hello_closed_{exc.rcvd.code if exc.rcvd else 1006}"
        else:
            failure = self.welcome(welcome)
            if failure is None:
                return None, None
            if welcome.get("type") == "error":
                wait = retry_hint(welcome.get("code"), welcome.get("retry_after_ms"))
        await self.ws.close()
        return failure, wait

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            while True:
                raw = await self.ws.recv()
                self.last_frame = now = now_ns()
                self.on_frame(orjson.loads(raw), now)
        except ConnectionClosed as exc:
            if not self.closing:
                code = exc.rcvd.code if exc.rcvd else 1006
                self.tally.keyed["close_codes"][str(code)] += 1
                self.tally.counts["closed_by_server"] += 1

    @property
    def is_open(self) -> bool:
        return self.reader is not None and not self.reader.done()

    async def send(self, frame: dict[str, Any]) -> bool:
        if self.ws is None or not self.is_open:
            return False
        try:
            await self.ws.send(orjson.dumps(frame).decode())
        except ConnectionClosed:
            return False
        return True

    async def close(self) -> None:
        """Close from our side and account the socket's stream checks."""
        self.closing = True
        if self.ws is not None:
            with contextlib.suppress(OSError):
                await self.ws.close()
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)
            for check in self.checks():
                self.tally.add_check(check)

    async def act(self, end_at: float) -> None:
        """What the socket does while the run lasts (until `end_at`, loop time); default: read."""

    # -- frames ------------------------------------------------------------------------------

    def on_frame(self, frame: dict[str, Any], now: int) -> None:
        kind = frame.get("type")
        if kind in EVENT_TYPES:
            check = self.check_for(frame)
            if check is not None:
                self._event(check, kind, frame, now)
        elif kind == "ack":
            self.on_ack(frame, now)
        elif kind == "error":
            self.tally.keyed["errors"][str(frame.get("code"))] += 1
            self.on_error(frame)
        elif kind in ("reset", "reconnect"):
            self.tally.counts[f"{kind}_frames"] += 1
        else:
            self.on_other(frame, now)

    def _event(self, check: StreamCheck, kind: str, frame: dict[str, Any], now: int) -> None:
        if not check.seq(frame["seq"]):
            return  # a duplicate: counted, not handled twice
        if kind == "delta":
            self._delta(check, frame, now)
        elif kind == "ai_start":
            check.ai_start(frame["response_id"])
            self.on_ai_start(frame, now)
        elif kind == "ai_end":
            if check.ai_end(frame["response_id"], frame["text"], str(frame.get("status"))):
                self.on_ai_end(frame, now)
        elif kind == "mode":
            self.on_mode(frame, now)

    def _delta(self, check: StreamCheck, frame: dict[str, Any], now: int) -> None:
        text = frame["text"]
        if not check.delta(frame["response_id"], text):
            return  # late: counted by the check
        counts = self.tally.counts
        counts[self._frames_key] += 1
        stamps = MARKER_RE.findall(text)
        if stamps:
            wall_us = time.time_ns() // 1000
            add = self._lag.add
            for stamp in stamps:
                add(wall_us - int(stamp))
            counts[self._tokens_key] += len(stamps)
        self.on_delta(frame, now, stamps)

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None: ...

    def on_ai_start(self, frame: dict[str, Any], now: int) -> None: ...

    def on_ai_end(self, frame: dict[str, Any], now: int) -> None: ...

    def on_ack(self, frame: dict[str, Any], now: int) -> None: ...

    def on_mode(self, frame: dict[str, Any], now: int) -> None: ...

    def on_error(self, frame: dict[str, Any]) -> None: ...

    def on_other(self, frame: dict[str, Any], now: int) -> None: ...

    def idle(self) -> bool:
        """Nothing more is expected on this socket (used to end the drain early)."""
        return not any(check.open for check in self.checks())
