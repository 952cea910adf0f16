"""One client process of the load tool: it opens its share of the conversations, waits for the
common start, runs them, drains, closes, and sends its tally to the parent.

Messages to the parent, on a multiprocessing queue, as `(kind, worker, payload)`:
`ready` (its sockets are open), `progress` (counters and the token lags of the last second, every
second), `result` (its whole tally), `failed` (a traceback). The parent's `go` event starts the
run; its `abort` event ends the sending early (Ctrl-C), and the drain and the report still happen.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gateway.devtools import eventloop
from gateway.loadtest.agents import AgentClient, AgentPlan
from gateway.loadtest.clients import Conversation
from gateway.loadtest.config import LoadConfig
from gateway.loadtest.plan import assign_agents
from gateway.loadtest.sockets import OPEN_TIMEOUT_S, Run
from gateway.loadtest.tally import Tally

GO_TIMEOUT_S = 600.0  # a worker whose parent never says go stops by itself
PROGRESS_EVERY_S = 1.0
_CLOSING_AT_ONCE = 500


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    worker: int
    config: LoadConfig
    indices: tuple[int, ...]  # the conversations of this process
    model_ttft_us: int | None
    agents: tuple[AgentPlan, ...] = ()  # the agents of this process


class Channel(Protocol):
    """A queue to the parent (multiprocessing's, or queue.Queue for a worker thread)."""

    def put(self, item: Any) -> None: ...


class Flag(Protocol):
    """An event set by the parent (multiprocessing's, or threading's for a worker thread)."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Link:
    """The worker's side of its connection to the parent process."""

    def __init__(self, worker: int, queue: Channel, go: Flag, abort: Flag) -> None:
        self.worker = worker
        self.queue = queue
        self.go = go
        self.abort = abort

    def put(self, kind: str, payload: object) -> None:
        self.queue.put((kind, self.worker, payload))

    async def wait_go(self) -> bool:
        return await asyncio.to_thread(self.go.wait, GO_TIMEOUT_S)

    @property
    def aborted(self) -> bool:
        return self.abort.is_set()


def worker_main(plan: WorkerPlan, queue: Channel, go: Flag, abort: Flag, *, own_process: bool = True) -> None:
    """The entry point of a client process (or of the one worker thread of a one-process run)."""
    if own_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and sets `abort`
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    link = Link(plan.worker, queue, go, abort)
    try:
        link.put("result", eventloop.run(work(plan, link)))
    except BaseException:
        link.put("failed", traceback.format_exc())


async def work(plan: WorkerPlan, link: Link) -> dict[str, Any]:
    config = plan.config
    loop = asyncio.get_running_loop()
    run = Run(config, Tally(), plan.model_ttft_us)
    conversations = [Conversation(i, run) for i in plan.indices]
    agents = [AgentClient(run, a, config.targets[a.url_index]) for a in plan.agents]
    progress = asyncio.create_task(_progress(link, run))
    started = loop.time()
    await asyncio.gather(*(a.open() for a in agents))
    if agents:
        _assign(conversations, [a for a in agents if a.is_open], run.tally)
    await _connect(conversations, config.connect_rate / config.processes)
    link.put("ready", {"connect_s": loop.time() - started, "opened": run.tally.counts["sockets_opened"]})
    if not await link.wait_go():
        raise RuntimeError("the parent process never started the run")
    go_at, cpu_at = loop.time(), time.process_time()
    end_at = go_at + config.duration
    acts = [asyncio.create_task(s.act(end_at)) for c in conversations for s in c.sockets if s.is_open]
    # Polled: `abort` is set from another process. Ends early when every user socket is gone.
    while loop.time() < end_at and not link.aborted and any(not a.done() for a in acts):  # noqa: ASYNC110
        await asyncio.sleep(min(0.1, end_at - loop.time()))
    run.sending = False
    for act in acts:
        act.cancel()  # they have ended already, unless the run was aborted
    await asyncio.gather(*acts, return_exceptions=True)
    quiet_s = 1.0 + 2 * (plan.model_ttft_us or 0) / 1e6
    await _drain(conversations, agents, config.drain_timeout, quiet_s=quiet_s)
    window = loop.time() - go_at
    cpu = time.process_time() - cpu_at
    progress.cancel()
    await _close(conversations)
    await asyncio.gather(*(a.close() for a in agents))
    state = run.tally.to_state()
    state["window_s"] = window
    state["client_cpu_s"] = cpu
    return state


def _assign(conversations: list[Conversation], agents: list[AgentClient], tally: Tally) -> None:
    """Give each conversation the agent that will follow it (see `assign_agents`)."""
    chosen = assign_agents([c.home_index for c in conversations], [(a.plan.url_index, a.cap) for a in agents])
    for conversation, position in zip(conversations, chosen, strict=True):
        if position is None:
            tally.counts["conversations_unfollowed"] += 1
        else:
            conversation.agent = agents[position]


async def _drain(
    conversations: list[Conversation], agents: list[AgentClient], limit_s: float, quiet_s: float
) -> None:
    """Wait until every socket expects nothing more (agents: every conversation handed back) and
    none received anything for `quiet_s` (an answer to a message that overlapped the previous
    answer may still be due), or `limit_s`."""
    loop = asyncio.get_running_loop()
    until = loop.time() + limit_s
    quiet_ns = int(quiet_s * 1e9)
    while loop.time() < until:
        if all(c.idle() for c in conversations) and all(a.idle() for a in agents if a.is_open):
            frames = [c.last_frame() for c in conversations] + [a.last_frame for a in agents]
            if time.monotonic_ns() - max(frames, default=0) >= quiet_ns:
                return
        await asyncio.sleep(0.05)


async def _connect(conversations: list[Conversation], rate: float) -> None:
    """Set up the conversations, starting `rate` of them a second."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=OPEN_TIMEOUT_S, limits=limits, trust_env=False) as http:
        tasks = []
        for n, conversation in enumerate(conversations):
            delay = start + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(conversation.setup(http)))
        await asyncio.gather(*tasks)


async def _close(conversations: list[Conversation]) -> None:
    for n in range(0, len(conversations), _CLOSING_AT_ONCE):
        await asyncio.gather(*(c.close() for c in conversations[n : n + _CLOSING_AT_ONCE]))


async def _progress(link: Link, run: Run) -> None:
    """Every second: the counters so far and the token lags of the last second (their histogram's
    change), for the parent's progress line."""
    hists = run.tally.hist
    previous: dict[int, int] = {}
    while True:  # until cancelled
        await asyncio.sleep(PROGRESS_EVERY_S)
        now: dict[int, int] = {}
        for kind in ("user", "watcher", "agent"):
            for key, n in hists[f"token_lag_{kind}"].counts.items():
                now[key] = now.get(key, 0) + n
        recent = {k: n - previous.get(k, 0) for k, n in now.items() if n != previous.get(k, 0)}
        previous = now
        link.put("progress", {"counts": dict(run.tally.counts), "lag": recent})
