"""The parent process of a load test: it starts the client processes, prints progress, reads the
gateways' CPU and the model server's counters before and after, and merges the results."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import queue
import queue as queues
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.loadtest import report
from gateway.loadtest.agents import AgentPlan, AgentSetupError, create_agents, disable_agents
from gateway.loadtest.config import LoadConfig
from gateway.loadtest.stats import percentile
from gateway.loadtest.tally import Tally
from gateway.loadtest.worker import PROGRESS_EVERY_S, WorkerPlan, worker_main

_JOIN_TIMEOUT_S = 30.0
_MODEL_COUNTERS = (
    "requests",
    "streams",
    "completions",
    "streams_completed",
    "disconnects",
    "tokens_sent",
    "bad_requests",
)


class RunError(RuntimeError):
    """The run could not take place (the message says why)."""


@dataclass
class _Workers:
    """What the parent knows of its client processes."""

    count: int
    ready: dict[int, dict[str, Any]] = field(default_factory=dict)  # worker -> connect time, sockets
    progress: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    def take(self, message: tuple[str, int, Any]) -> None:
        kind, worker, payload = message
        if kind == "ready":
            self.ready[worker] = payload
        elif kind == "progress":
            self.progress[worker] = payload
        elif kind == "result":
            self.results[worker] = payload
        elif kind == "failed":
            self.failed[worker] = payload

    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for p in self.progress.values():
            for key, n in p["counts"].items():
                total[key] = total.get(key, 0) + n
        return total

    def recent_lag_p99_ms(self) -> float | None:
        merged: dict[int, int] = {}
        for p in self.progress.values():
            for key, n in p["lag"].items():
                merged[key] = merged.get(key, 0) + n
        value = percentile(merged, 99)
        return None if value is None else value / 1000

    def done(self, group: dict[int, Any]) -> bool:
        return len(group) + len(self.failed) >= self.count


def run(config: LoadConfig, *, err: TextIO = sys.stderr) -> dict[str, Any]:
    """Run the load test and return its report. Raises RunError when it cannot run."""
    model_before = _model_stats(config.model_server)
    ttft_ms = model_before["config"]["ttft_ms"] if model_before else None
    agents = _agents(config, err)
    plans = [
        WorkerPlan(
            worker=w,
            config=config,
            indices=tuple(range(w, config.conversations, config.processes)),
            model_ttft_us=None if ttft_ms is None else int(ttft_ms * 1000),
            agents=tuple(a for a in agents if a.process == w),
        )
        for w in range(config.processes)
    ]
    pool = _Pool(plans)
    workers = _Workers(config.processes)
    progress = _Progress(config, err)
    cpu_before: dict[str, float | None] = dict.fromkeys(_urls(config))  # unknown if Ctrl-C comes first
    try:
        try:
            _collect(workers, workers.ready, pool, lambda: progress.connecting(workers))
            cpu_before = _gateway_cpu(config)
            if not sum(r["opened"] for r in workers.ready.values()):
                pool.abort.set()  # nothing to run: the workers skip to their report
            pool.go.set()
            progress.start()
            _collect(workers, workers.results, pool, lambda: progress.running(workers))
        except KeyboardInterrupt:
            print("loadtest: stopping early; the report follows", file=err, flush=True)
            pool.abort.set()
            pool.go.set()
            _collect(workers, workers.results, pool, lambda: progress.running(workers))
    finally:
        pool.stop()
        if agents:
            for problem in disable_agents(config, agents):
                print(f"loadtest: could not disable an agent: {problem}", file=err)
    if not workers.results:
        raise RunError("no client process finished:\n" + "\n".join(workers.failed.values()))
    for failure in workers.failed.values():
        print(f"loadtest: a client process failed:\n{failure}", file=err)
    cpu_after = _gateway_cpu(config)
    tally = Tally()
    for state in workers.results.values():
        tally.merge(Tally.from_state(state))
    return report.build(
        config,
        tally,
        window_s=max(s["window_s"] for s in workers.results.values()),
        connect_s=max((r["connect_s"] for r in workers.ready.values()), default=0.0),
        client_cpu=[s["client_cpu_s"] for s in workers.results.values()],
        gateways=[
            {"url": url, "cpu_seconds": None if before is None or after is None else round(after - before, 3)}
            for (url, before), after in zip(cpu_before.items(), cpu_after.values(), strict=True)
        ],
        model_server=_model_delta(model_before, _model_stats(config.model_server)),
        aborted=pool.abort.is_set(),
        failed_workers=len(workers.failed),
    )


def _agents(config: LoadConfig, err: TextIO) -> list[AgentPlan]:
    if not config.agents:
        return []
    if not config.quiet:
        print(f"loadtest making {config.agents} agents", file=err, flush=True)
    try:
        return create_agents(config)
    except AgentSetupError as exc:
        raise RunError(str(exc)) from None


class _Pool:
    """The client workers: spawned processes, or a thread when there is only one (it starts at
    once, without a new interpreter importing everything again)."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.handles: list[threading.Thread | multiprocessing.process.BaseProcess]
        if len(plans) == 1:
            self.channel: Any = queue.Queue()
            self.go: Any = threading.Event()
            self.abort: Any = threading.Event()
            args = (plans[0], self.channel, self.go, self.abort)
            self.handles = [
                threading.Thread(target=worker_main, args=args, kwargs={"own_process": False}, daemon=True)
            ]
        else:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds threads
            self.channel, self.go, self.abort = ctx.Queue(), ctx.Event(), ctx.Event()
            self.handles = [
                ctx.Process(
                    target=worker_main,
                    args=(plan, self.channel, self.go, self.abort),
                    name=f"chatgw-loadtest-{plan.worker}",
                    daemon=True,
                )
                for plan in plans
            ]
        for handle in self.handles:
            handle.start()

    def gone(self, n: int) -> str | None:
        """Why worker `n` is no longer running, or None while it runs."""
        handle = self.handles[n]
        if handle.is_alive():
            return None
        if isinstance(handle, threading.Thread):
            return "the client thread ended"
        return f"client process {n} exited with status {handle.exitcode}"

    def stop(self) -> None:
        for handle in self.handles:
            handle.join(_JOIN_TIMEOUT_S)
            if isinstance(handle, multiprocessing.process.BaseProcess) and handle.is_alive():
                handle.terminate()


def _collect(workers: _Workers, group: dict[int, Any], pool: _Pool, tick: Any) -> None:
    """Take messages until every worker is in `group` or failed; call `tick` about every second."""
    next_tick = time.monotonic() + PROGRESS_EVERY_S
    while not workers.done(group):
        with contextlib.suppress(queues.Empty):
            workers.take(pool.channel.get(timeout=max(0.05, next_tick - time.monotonic())))
        if time.monotonic() >= next_tick:
            next_tick += PROGRESS_EVERY_S
            tick()
            for n in range(len(pool.handles)):
                reason = pool.gone(n)
                if reason is not None and n not in workers.results and n not in workers.failed:
                    _drain_queue(workers, pool)
                    if n not in workers.results and n not in workers.failed:
                        workers.failed[n] = reason


def _drain_queue(workers: _Workers, pool: _Pool) -> None:
    while True:
        try:
            workers.take(pool.channel.get(timeout=0.5))
        except queues.Empty:
            return


class _Progress:
    """One line on stderr every second: sockets, messages, deltas, the last second's token lag."""

    def __init__(self, config: LoadConfig, err: TextIO) -> None:
        self.config = config
        self.err = err
        self.started = time.monotonic()
        self.last: dict[str, int] = {}

    def _print(self, line: str) -> None:
        if not self.config.quiet:
            print(line, file=self.err, flush=True)

    def connecting(self, workers: _Workers) -> None:
        c = workers.counts()
        self._print(
            f"loadtest connecting  {c.get('sockets_opened', 0)}/{self.config.sockets} sockets open, "
            f"{c.get('sockets_failed', 0) + c.get('sessions_failed', 0)} failed"
        )

    def start(self) -> None:
        self.started = time.monotonic()

    def running(self, workers: _Workers) -> None:
        c = workers.counts()
        prev, self.last = self.last, c

        def delta(key: str) -> int:
            return c.get(key, 0) - prev.get(key, 0)

        kinds = ("delta_frames_user", "delta_frames_watcher", "delta_frames_agent")
        frames = sum(c.get(key, 0) for key in kinds)
        recent_frames = sum(delta(key) for key in kinds)
        lag = workers.recent_lag_p99_ms()
        takeovers = f"  takeovers {c.get('takeovers_done', 0)}" if self.config.agents else ""
        self._print(
            f"loadtest {time.monotonic() - self.started:6.1f}s  open {c.get('sockets_opened', 0) - c.get('closed_by_server', 0)}"
            f"  msgs {c.get('messages_sent', 0)}  acks {c.get('acks', 0)} ({delta('acks')}/s)"
            f"  deltas {frames} ({recent_frames}/s)  token lag p99 {'-' if lag is None else f'{lag:.1f} ms'}"
            f"{takeovers}  closed {c.get('closed_by_server', 0)}"
        )


def _urls(config: LoadConfig) -> list[str]:
    return list(dict.fromkeys(t.http for t in config.targets))


def _gateway_cpu(config: LoadConfig) -> dict[str, float | None]:
    """`process_cpu_seconds_total` of each target (None where /metrics does not say)."""
    return {url: _cpu_seconds(url) for url in _urls(config)}


def _cpu_seconds(url: str) -> float | None:
    try:
        r = httpx.get(f"{url}/metrics", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name == "process_cpu_seconds_total":
                return float(sample.value)
    return None


def _model_stats(url: str | None) -> dict[str, Any] | None:
    if url is None:
        return None
    try:
        r = httpx.get(f"{url}/stats", timeout=5, trust_env=False)
        r.raise_for_status()
        stats = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise RunError(f"--model-server {url}: cannot read /stats ({exc})") from None
    if not isinstance(stats, dict) or "config" not in stats:
        raise RunError(f"--model-server {url}: /stats is not chatgw model-server's")
    return stats


def _model_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    delta: dict[str, Any] = {key: after[key] - before[key] for key in _MODEL_COUNTERS}
    delta["cpu_seconds"] = round(after["cpu_seconds"] - before["cpu_seconds"], 3)
    delta["active_streams_at_end"] = after["active_streams"]
    delta["config"] = after["config"]
    return delta
