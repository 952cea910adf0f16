"""The load tool's clients: one class per kind of socket, and the conversation that holds them.

A kind is a `SocketClient` subclass: how it says hello, what it does while the run lasts (`act`),
and what it makes of the frames it receives (the `on_*` hooks); `Conversation` decides how many of
each kind a conversation has. Every socket checks its stream
(`StreamCheck`), counts deltas and measures each token's lag from the model server's send-time
marker. A socket the server closes is counted with its close code; the run goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from gateway.devtools.marker import MARKER_RE
from gateway.loadtest.config import LoadConfig, Target
from gateway.loadtest.stats import EVENT_TYPES, FanoutPairer, StreamCheck
from gateway.loadtest.tally import Tally

OPEN_TIMEOUT_S = 10.0
_MAX_FRAME = 1 << 22


@dataclass
class Run:
    """What every client of one process shares."""

    config: LoadConfig
    tally: Tally
    model_ttft_us: int | None = None  # the model server's configured TTFT, when known
    rng: random.Random = field(default_factory=random.Random)
    sending: bool = True  # users send messages while this holds


def _now() -> int:
    return time.monotonic_ns()


class SocketClient:
    """One WebSocket of a conversation. Subclasses set `kind` and override the hooks."""

    kind: ClassVar[str] = "socket"

    def __init__(self, run: Run, conversation: Conversation, target: Target) -> None:
        self.run = run
        self.tally = run.tally
        self.conversation = conversation
        self.target = target
        self.ws: ClientConnection | None = None
        self.check = StreamCheck(0)
        self.closing = False  # we close it: its close code is not the server's doing
        self.reader: asyncio.Task[None] | None = None
        self.last_frame = 0  # monotonic ns of the last frame received
        self._lag = run.tally.histogram(f"token_lag_{self.kind}")
        self._frames_key = f"delta_frames_{self.kind}"
        self._tokens_key = f"tokens_{self.kind}"

    def hello(self) -> dict[str, Any]:
        return {"type": "hello", "token": self.conversation.token}

    async def open(self) -> bool:
        """Connect, say hello, read the welcome and start reading; False (counted) on failure."""
        failure = await self._open()
        if failure is not None:
            self.tally.keyed["connect_failures"][failure] += 1
            self.tally.counts["sockets_failed"] += 1
            return False
        self.tally.counts["sockets_opened"] += 1
        self.reader = asyncio.create_task(self._read())
        return True

    async def _open(self) -> str | None:
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
            return f"ws_http_{exc.response.status_code}"
        except (InvalidHandshake, InvalidURI):
            return "ws_handshake"
        except TimeoutError:
            return "ws_timeout"
        except OSError:
            return "ws_refused"
        try:
            await self.ws.send(orjson.dumps(self.hello()).decode())
            welcome = orjson.loads(await asyncio.wait_for(self.ws.recv(), OPEN_TIMEOUT_S))
        except TimeoutError:
            failure = "hello_timeout"
        except ConnectionClosed as exc:
            failure = f"hello_closed_{exc.rcvd.code if exc.rcvd else 1006}"
        else:
            if welcome.get("type") == "welcome":
                self.check = StreamCheck(int(welcome["seq"]))
                return None
            failure = f"hello_{welcome.get('code') or welcome.get('type')}"
        await self.ws.close()
        return failure

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            while True:
                raw = await self.ws.recv()
                self.last_frame = now = _now()
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
            self.tally.add_check(self.check)

    async def act(self, end_at: float) -> None:
        """What the socket does while the run lasts (until `end_at`, loop time); default: read."""

    # -- frames ------------------------------------------------------------------------------

    def on_frame(self, frame: dict[str, Any], now: int) -> None:
        kind = frame.get("type")
        if kind in EVENT_TYPES:
            if not self.check.seq(frame["seq"]):
                return  # a duplicate: counted, not handled twice
            if kind == "delta":
                self._delta(frame, now)
            elif kind == "ai_start":
                self.check.ai_start(frame["response_id"])
                self.on_ai_start(frame, now)
            elif kind == "ai_end" and self.check.ai_end(frame["response_id"], frame["text"]):
                self.on_ai_end(frame, now)
        elif kind == "ack":
            self.on_ack(frame, now)
        elif kind == "error":
            self.tally.keyed["errors"][str(frame.get("code"))] += 1
            self.on_error(frame)
        elif kind in ("reset", "reconnect"):
            self.tally.counts[f"{kind}_frames"] += 1

    def _delta(self, frame: dict[str, Any], now: int) -> None:
        text = frame["text"]
        if not self.check.delta(frame["response_id"], text):
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

    def on_error(self, frame: dict[str, Any]) -> None: ...

    def idle(self) -> bool:
        """Nothing more is expected on this socket (used to end the drain early)."""
        return not self.check.open


class UserClient(SocketClient):
    """The end user: sends a message every `--message-interval` seconds (open loop: whether or not
    the last one was answered), stops `--stop-rate` of the answers at their first delta, and
    measures ack latency and time to first token."""

    kind = "user"

    def __init__(self, run: Run, conversation: Conversation, target: Target) -> None:
        super().__init__(run, conversation, target)
        self.pending: dict[str, int] = {}  # client_msg_id -> sent at
        self.awaiting_since: int | None = None  # the first message sent since the last ai_start
        self.asked_at: dict[str, int | None] = {}  # response id -> when its question was sent
        self.sent = 0

    async def act(self, end_at: float) -> None:
        loop = asyncio.get_running_loop()
        interval = self.run.config.message_interval
        due = loop.time() + self.run.rng.uniform(0, interval)  # spread conversations over the interval
        while due < end_at:
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not self.run.sending or not await self._message():
                return
            due += interval

    async def _message(self) -> bool:
        n = self.sent
        self.sent += 1
        cmid = f"lt-{self.conversation.index}-{n}"
        text = f"Question {n} of load test conversation {self.conversation.index}; write to lt{self.conversation.index}@example.com"
        sent_at = _now()
        self.pending[cmid] = sent_at
        if self.awaiting_since is None:
            self.awaiting_since = sent_at
        if not await self.send({"type": "message", "client_msg_id": cmid, "text": text}):
            del self.pending[cmid]
            return False
        self.tally.counts["messages_sent"] += 1
        return True

    def on_ack(self, frame: dict[str, Any], now: int) -> None:
        sent_at = self.pending.pop(frame.get("client_msg_id", ""), None)
        if sent_at is None:
            self.tally.counts["unexpected_acks"] += 1
            return
        self.tally.counts["acks"] += 1
        self.tally.hist["ack"].add((now - sent_at) // 1000)

    def on_error(self, frame: dict[str, Any]) -> None:
        if self.pending.pop(frame.get("client_msg_id") or "", None) is not None:
            self.tally.counts["messages_refused"] += 1

    def on_ai_start(self, frame: dict[str, Any], now: int) -> None:
        self.tally.counts["answers_started"] += 1
        self.asked_at[frame["response_id"]] = self.awaiting_since
        self.awaiting_since = None

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None:
        for lag in self.conversation.pairer.user(frame["seq"], now):
            self.conversation.fanout(lag)
        rid = frame["response_id"]
        if rid not in self.asked_at:
            return  # not the answer's first delta
        asked = self.asked_at.pop(rid)
        hist = self.tally.hist
        if stamps:
            hist["ttft_added"].add(time.time_ns() // 1000 - int(stamps[0]))
            self.tally.counts["ttft_added_from_marker"] += 1
        if asked is None:
            # Its question went out before the previous answer started: which answer the gateway
            # gave it to cannot be told from here, so its time to first token is not measured.
            self.tally.counts["ttft_unattributed"] += 1
        else:
            hist["ttft_total"].add((now - asked) // 1000)
            if not stamps and self.run.model_ttft_us is not None:
                hist["ttft_added"].add((now - asked) // 1000 - self.run.model_ttft_us)
                self.tally.counts["ttft_added_from_config"] += 1
        if self.run.config.stop_rate and self.run.rng.random() < self.run.config.stop_rate:
            # The gateway drops what was queued behind a stopped answer, so nothing is awaited.
            self.awaiting_since = None
            self.tally.counts["stops_sent"] += 1
            self.conversation.spawn(self.send({"type": "stop"}))

    def on_ai_end(self, frame: dict[str, Any], now: int) -> None:
        self.asked_at.pop(frame["response_id"], None)
        status = str(frame.get("status"))
        self.tally.counts["answers_ended"] += 1
        self.tally.keyed["answer_status"][status] += 1
        if status == "complete":
            self.tally.keyed["tokens_per_answer"][str(len(MARKER_RE.findall(frame["text"])))] += 1

    def idle(self) -> bool:
        return super().idle() and not self.pending and self.awaiting_since is None

    def account_end(self) -> None:
        """Count what is still outstanding when the run ends."""
        self.tally.counts["unacked_messages"] += len(self.pending)
        if self.awaiting_since is not None:
            self.tally.counts["unanswered_users"] += 1


class WatcherClient(SocketClient):
    """A second socket with the user's token (another tab, or a device), on the next URL: it only
    reads, and measures how much later than the user socket each delta reaches it."""

    kind = "watcher"

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None:
        lag = self.conversation.pairer.watcher(frame["seq"], now)
        if lag is not None:
            self.conversation.fanout(lag)


class Conversation:
    """A widget session and its sockets: the user on URL i, watchers on the next URLs."""

    def __init__(self, index: int, run: Run) -> None:
        self.index = index
        self.run = run
        self.token = ""
        self.conversation_id = ""
        self.pairer = FanoutPairer()
        targets = run.config.targets
        self.home = targets[index % len(targets)]
        self.user = UserClient(run, self, self.home)
        self.sockets: list[SocketClient] = [self.user]
        for n in range(run.config.watchers_per_conversation):
            self.sockets.append(WatcherClient(run, self, targets[(index + 1 + n) % len(targets)]))
        self._tasks: set[asyncio.Task[Any]] = set()

    async def setup(self, http: httpx.AsyncClient) -> None:
        """Create the widget session, then open every socket (failures are counted)."""
        failure = await self._create(http)
        if failure is not None:
            self.run.tally.keyed["connect_failures"][failure] += 1
            self.run.tally.counts["sessions_failed"] += 1
            return
        self.run.tally.counts["conversations_created"] += 1
        for socket in self.sockets:
            await socket.open()

    async def _create(self, http: httpx.AsyncClient) -> str | None:
        try:
            r = await http.post(
                f"{self.home.http}/v1/widget/sessions", json={"business": self.run.config.business}
            )
        except httpx.TimeoutException:
            return "session_timeout"
        except httpx.HTTPError:
            return "session_refused"
        if r.status_code != 201:
            return f"session_http_{r.status_code}"
        body = r.json()
        self.token, self.conversation_id = body["token"], body["conversation_id"]
        return None

    def fanout(self, lag_ns: int) -> None:
        tally = self.run.tally
        tally.counts["fanout_pairs"] += 1
        if lag_ns < 0:
            tally.counts["fanout_watcher_first"] += 1
        tally.hist["fanout"].add(max(0, lag_ns) // 1000)

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run a send from a frame handler (which must not await), keeping a reference to it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def idle(self) -> bool:
        return all(s.idle() for s in self.sockets if s.is_open)

    def last_frame(self) -> int:
        return max(s.last_frame for s in self.sockets)

    async def close(self) -> None:
        self.user.account_end()
        await asyncio.gather(*(s.close() for s in self.sockets))
