"""The load tool's widget-side clients (the user and the watchers of a conversation) and the
conversation that holds them: `Conversation` decides how many of each kind a conversation has
(agents, which follow many conversations, are in `gateway.loadtest.agents`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

import httpx

from gateway.devtools.marker import MARKER_RE
from gateway.loadtest.config import Target
from gateway.loadtest.sockets import Run, SocketClient, now_ns, opened_within, retry_hint
from gateway.loadtest.stats import AskClock, FanoutPairer, StreamCheck

if TYPE_CHECKING:
    from gateway.loadtest.agents import AgentClient


class ConversationSocket(SocketClient):
    """A socket with a widget token: one conversation, one stream check."""

    def __init__(self, run: Run, conversation: Conversation, target: Target) -> None:
        super().__init__(run, target)
        self.conversation = conversation
        self.check = StreamCheck(0)

    def hello(self) -> dict[str, Any]:
        return {"type": "hello", "token": self.conversation.token}

    def welcome(self, frame: dict[str, Any]) -> str | None:
        failure = super().welcome(frame)
        if failure is None:
            self.check = StreamCheck(int(frame["seq"]))
        return failure

    def check_for(self, frame: dict[str, Any]) -> StreamCheck | None:
        return self.check

    def checks(self) -> Iterable[StreamCheck]:
        return (self.check,)


class UserClient(ConversationSocket):
    """The end user: sends a message every `--message-interval` seconds (open loop: whether or not
    the last one was answered), stops `--stop-rate` of the answers at their first delta, and
    measures ack latency, time to first token and, when its agent took over, the time from the
    agent's `takeover` to the `ai_end` here."""

    kind = "user"

    def __init__(self, run: Run, conversation: Conversation, target: Target) -> None:
        super().__init__(run, conversation, target)
        self.pending: dict[str, int] = {}  # client_msg_id -> when it was written (first sent or held)
        self.texts: dict[str, str] = {}  # client_msg_id -> text, while pending (to send it again)
        self.on_wire: set[str] = set()  # sent at least once
        self.held: list[str] = []  # to send when the gateway's retry_after_ms is over, in order
        self.hold_until = 0.0  # loop time until which the gateway asked this user to wait
        self.flusher: asyncio.Task[None] | None = None
        self.asking = AskClock()
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
        sent_at = now_ns()
        self.pending[cmid] = sent_at
        self.texts[cmid] = text
        self.asking.sent(sent_at)
        if asyncio.get_running_loop().time() < self.hold_until:
            # The gateway said to wait (a refusal's retry_after_ms): as the widget does, the new
            # message goes out with the refused ones when the wait is over.
            self.held.append(cmid)
            self.tally.counts["messages_held"] += 1
            return True
        return await self._send_message(cmid)

    async def _send_message(self, cmid: str) -> bool:
        """Send a pending message (again); False when the socket is gone (a message that never went
        out is then forgotten; one that did stays pending, counted unacked at the end)."""
        if await self.send({"type": "message", "client_msg_id": cmid, "text": self.texts[cmid]}):
            if cmid not in self.on_wire:
                self.on_wire.add(cmid)
                self.tally.counts["messages_sent"] += 1
            return True
        if cmid not in self.on_wire:
            del self.pending[cmid], self.texts[cmid]
        return False

    def on_ack(self, frame: dict[str, Any], now: int) -> None:
        cmid = frame.get("client_msg_id", "")
        sent_at = self.pending.pop(cmid, None)
        self.texts.pop(cmid, None)
        if sent_at is None:
            self.tally.counts["unexpected_acks"] += 1
            return
        self.tally.counts["acks"] += 1
        self.tally.hist["ack"].add((now - sent_at) // 1000)

    def on_error(self, frame: dict[str, Any]) -> None:
        """An error naming a pending message: counted by code (`message_refusals`). One that says
        when to try again (`unavailable` or `rate_limited` with `retry_after_ms`: the gateway did
        not take it) stays pending and is sent again then, as the widget does, with the messages
        written meanwhile; any other ends it as refused."""
        cmid = frame.get("client_msg_id") or ""
        if cmid not in self.pending:
            return
        code = str(frame.get("code"))
        self.tally.keyed["message_refusals"][code] += 1
        wait = retry_hint(code, frame.get("retry_after_ms"))
        if wait is not None:
            self.tally.counts["messages_retried"] += 1
            if cmid not in self.held:
                self.held.append(cmid)
            self.hold_until = max(self.hold_until, asyncio.get_running_loop().time() + wait)
            if self.flusher is None:
                self.flusher = asyncio.ensure_future(self._flush_held())
                self.conversation.keep(self.flusher)
            return
        del self.pending[cmid]
        self.texts.pop(cmid, None)
        self.tally.counts["messages_refused"] += 1

    async def _flush_held(self) -> None:
        """When the wait is over, send the held messages in the order they were written."""
        loop = asyncio.get_running_loop()
        delay = self.hold_until - loop.time()
        while delay > 0:  # a later refusal may have extended the wait
            await asyncio.sleep(delay)
            delay = self.hold_until - loop.time()
        held, self.held, self.flusher = self.held, [], None
        for cmid in sorted(held, key=lambda c: self.pending.get(c, 0)):
            if cmid in self.pending and not await self._send_message(cmid):
                return

    def on_ai_start(self, frame: dict[str, Any], now: int) -> None:
        self.tally.counts["answers_started"] += 1
        self.asked_at[frame["response_id"]] = self.asking.started()

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None:
        conversation = self.conversation
        for lag in conversation.pairer.user(frame["seq"], now):
            conversation.fanout(lag)
        if conversation.agent_pairer is not None:
            for lag in conversation.agent_pairer.user(frame["seq"], now):
                conversation.fanout(lag, "agent")
        rid = frame["response_id"]
        if rid not in self.asked_at:
            return  # not the answer's first delta
        asked = self.asked_at.pop(rid)
        hist = self.tally.hist
        if stamps:
            hist["ttft_added"].add(time.time_ns() // 1000 - int(stamps[0]))
            self.tally.counts["ttft_added_from_marker"] += 1
        if asked is None:
            # Its question went out before the previous answer started, or around a takeover:
            # which answer the gateway gave it to cannot be told from here, so its time to first
            # token is not measured.
            self.tally.counts["ttft_unattributed"] += 1
        else:
            hist["ttft_total"].add((now - asked) // 1000)
            if not stamps and self.run.model_ttft_us is not None:
                hist["ttft_added"].add((now - asked) // 1000 - self.run.model_ttft_us)
                self.tally.counts["ttft_added_from_config"] += 1
        if self.run.config.stop_rate and self.run.rng.random() < self.run.config.stop_rate:
            # The gateway drops what was queued behind a stopped answer, so nothing is awaited.
            self.asking.stopped()
            self.tally.counts["stops_sent"] += 1
            self.conversation.spawn(self.send({"type": "stop"}))

    def on_ai_end(self, frame: dict[str, Any], now: int) -> None:
        self.asked_at.pop(frame["response_id"], None)
        status = str(frame.get("status"))
        self.tally.counts["answers_ended"] += 1
        self.tally.keyed["answer_status"][status] += 1
        if status == "complete":
            self.tally.keyed["tokens_per_answer"][str(len(MARKER_RE.findall(frame["text"])))] += 1
        elif status == "taken_over":
            self.conversation.took_over(now, "takeover")

    def on_mode(self, frame: dict[str, Any], now: int) -> None:
        self.asking.mode(frame.get("mode") == "human")

    def idle(self) -> bool:
        return super().idle() and not self.pending and not self.asking.waiting

    def account_end(self) -> None:
        """Count what is still outstanding when the run ends: messages the gateway said to send
        again later (refused, or written during the wait), which it never took, apart from
        messages that got no answer at all."""
        waiting = len(self.held) if self.flusher is not None else 0
        self.tally.counts["messages_waiting"] += waiting
        self.tally.counts["unacked_messages"] += len(self.pending) - waiting
        if self.asking.waiting:
            self.tally.counts["unanswered_users"] += 1


class WatcherClient(ConversationSocket):
    """A second socket with the user's token (another tab, or a device), on the next URL: it only
    reads, and measures how much later than the user socket each delta reaches it."""

    kind = "watcher"

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None:
        lag = self.conversation.pairer.watcher(frame["seq"], now)
        if lag is not None:
            self.conversation.fanout(lag)


class Conversation:
    """A widget session and its sockets: the user on URL i, watchers on the next URLs, and the agent
    that follows it, if any (set before `setup`)."""

    def __init__(self, index: int, run: Run) -> None:
        self.index = index
        self.run = run
        self.token = ""
        self.conversation_id = ""
        self.pairer = FanoutPairer()
        self.agent: AgentClient | None = None
        self.agent_pairer: FanoutPairer | None = None  # the user's and the agent's deltas
        self.takeover: tuple[int, int] | None = None  # the agent's last takeover: (number, sent at)
        self._timed: dict[str, int] = {}  # histogram -> the number of the last takeover timed in it
        targets = run.config.targets
        self.home_index = index % len(targets)
        self.home = targets[self.home_index]
        self.user = UserClient(run, self, self.home)
        self.sockets: list[SocketClient] = [self.user]
        for n in range(run.config.watchers_per_conversation):
            self.sockets.append(WatcherClient(run, self, targets[(index + 1 + n) % len(targets)]))
        self._tasks: set[asyncio.Future[Any]] = set()

    async def setup(self, http: httpx.AsyncClient) -> None:
        """Create the widget session, open every socket, then have the agent follow it (failures are
        counted)."""
        failure = await self._create(http)
        if failure is not None:
            self.run.tally.keyed["connect_failures"][failure] += 1
            self.run.tally.counts["sessions_failed"] += 1
            return
        self.run.tally.counts["conversations_created"] += 1
        for socket in self.sockets:
            await socket.open()
        if self.agent is not None:
            if await self.agent.follow(self):
                self.agent_pairer = FanoutPairer()
            else:
                self.agent = None

    async def _create(self, http: httpx.AsyncClient) -> str | None:
        """Create the widget session; one refused with a hint (503 or 429 with `retry_after_ms` or
        `Retry-After`) is asked for again after it, within `--open-within` (see `opened_within`)."""
        return await opened_within(
            self.run.tally, self.run.config.open_within, lambda: self._try_create(http)
        )

    async def _try_create(self, http: httpx.AsyncClient) -> tuple[str | None, float | None]:
        try:
            r = await http.post(
                f"{self.home.http}/v1/widget/sessions", json={"business": self.run.config.business}
            )
        except httpx.TimeoutException:
            return "session_timeout", None
        except httpx.HTTPError:
            return "session_refused", None
        if r.status_code != 201:
            return f"session_http_{r.status_code}", _session_retry(r)
        body = r.json()
        self.token, self.conversation_id = body["token"], body["conversation_id"]
        return None, None

    def fanout(self, lag_ns: int, other: str = "watcher") -> None:
        """One delta's arrival on a watcher (or the agent) minus its arrival on the user socket."""
        tally = self.run.tally
        name = "fanout" if other == "watcher" else f"fanout_{other}"
        tally.counts[f"{name}_pairs"] += 1
        if lag_ns < 0:
            tally.counts[f"fanout_{other}_first"] += 1
        tally.hist[name].add(max(0, lag_ns) // 1000)

    def took_over(self, now: int, histogram: str) -> None:
        """The user's (`takeover`) or the agent's (`takeover_agent`) socket got an `ai_end`
        `taken_over`: the first one after the agent's last takeover is timed from its send (only the
        run's agent takes this conversation over)."""
        if self.takeover is None:
            return
        number, sent_at = self.takeover
        if self._timed.get(histogram, 0) < number:
            self._timed[histogram] = number
            self.run.tally.hist[histogram].add((now - sent_at) // 1000)

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run a send from a frame handler (which must not await), keeping a reference to it."""
        self.keep(asyncio.ensure_future(work))

    def keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def idle(self) -> bool:
        return all(s.idle() for s in self.sockets if s.is_open)

    def last_frame(self) -> int:
        return max(s.last_frame for s in self.sockets)

    async def close(self) -> None:
        self.user.account_end()
        await asyncio.gather(*(s.close() for s in self.sockets))


def _session_retry(r: httpx.Response) -> float | None:
    """The seconds a refused session creation says to wait (its body's `retry_after_ms`, else its
    `Retry-After` in seconds), or None when it is not a refusal to retry (not 429 or 503)."""
    if r.status_code not in (429, 503):
        return None
    try:
        error = r.json().get("error") or {}
    except ValueError:
        error = {}
    code = error.get("code") if isinstance(error, dict) else None
    retry_ms = error.get("retry_after_ms") if isinstance(error, dict) else None
    if retry_ms is None and (r.headers.get("retry-after") or "").isdigit():
        retry_ms = int(r.headers["retry-after"]) * 1000
    return retry_hint(code or ("rate_limited" if r.status_code == 429 else "unavailable"), retry_ms)
