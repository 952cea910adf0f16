"""`chatgw model-server` and `chatgw loadtest` as real processes, for the tests of both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.servers import ROOT, free_port


@dataclass
class ModelServerProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL is set to."""
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/stats", timeout=5)
        r.raise_for_status()
        stats: dict[str, Any] = r.json()
        return stats

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        """The stats once `predicate` holds for them; fails after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the model server's stats never got there: {stats}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_model_server(tmp_dir: Path, *args: str) -> ModelServerProcess:
    """`python -m gateway model-server --port <free> ARGS...`, once it answers."""
    port = free_port()
    log_path = tmp_dir / f"model-server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "model-server", "--port", str(port), *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = ModelServerProcess(port, process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the model server exited: {log_path.read_text()}")
        try:
            server.stats()
            return server
        except httpx.TransportError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"the model server did not answer in 20 s: {log_path.read_text()}")


def model_env(model: ModelServerProcess) -> dict[str, str]:
    """A gateway's environment for answering through the model server, without the model limits
    of the demo business getting in the way, nor the per-address limits (every simulated user
    comes from this machine) or the answers budget of the one business they all use
    (docs/limits.md, "Load tests")."""
    return {
        "OPENAI_API_KEY": "load-test",
        "OPENAI_BASE_URL": model.base_url,
        "CHATGW_LLM_CONCURRENCY": "1000",
        "CHATGW_LLM_REQUESTS_PER_MINUTE": "100000",
        "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1",
        "CHATGW_LIMIT_BUSINESS_ANSWERS": "off",
    }


@dataclass
class LoadRun:
    status: int
    report: dict[str, Any]
    stdout: str
    stderr: str


def run_loadtest(tmp_dir: Path, *args: str, timeout: float = 60) -> LoadRun:
    """`python -m gateway loadtest ARGS... --json-out FILE` to its end."""
    out = tmp_dir / f"loadtest-{time.monotonic_ns()}.json"
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "loadtest", *args, "--json-out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return LoadRun(done.returncode, report, done.stdout, done.stderr)


def start_loadtest(tmp_dir: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """The same, started in the background: (process, where its JSON report will be)."""
    out = tmp_dir / f"loadtest-{time.monotonic_ns()}.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "loadtest", *args, "--json-out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, out


def assert_consistent(report: dict[str, Any], *, conversations: int, watchers: int, agents: int = 0) -> None:
    """What every clean run must show, whatever the timing."""
    sockets = conversations * (1 + watchers) + agents
    assert report["schema"] == "chatgw.loadtest/1"
    assert report["connections"]["sockets_opened"] == sockets
    assert report["connections"]["sockets_failed"] == report["connections"]["closed_by_server"] == 0
    assert report["connections"]["close_codes"] == {}
    messages, answers, deltas = report["messages"], report["answers"], report["deltas"]
    assert messages["sent"] >= conversations
    assert messages["acked"] == messages["sent"]
    assert messages["unacked"] == messages["refused"] == messages["unexpected_acks"] == 0
    assert report["latency_ms"]["ack"]["count"] == messages["sent"]
    assert 1 <= answers["started"] <= messages["sent"]
    assert answers["ended"] == answers["started"]
    assert answers["unfinished"] == 0
    assert report["integrity"] == {
        "seq_gaps": 0,
        "seq_missing": 0,
        "seq_duplicates": 0,
        "late_deltas": 0,
        "duplicate_ai_end": 0,
        "text_mismatches": 0,
        "reset_frames": 0,
        "reconnect_frames": 0,
    }
    assert report["errors"] == {}
    # Every watcher (and every conversation's agent) gets exactly the user's deltas; tokens are the
    # answers' tokens.
    assert deltas["frames_watcher"] == deltas["frames_user"] * watchers
    assert deltas["tokens_watcher"] == deltas["tokens_user"] * watchers
    assert deltas["frames_agent"] == (deltas["frames_user"] if agents else 0)
    assert deltas["tokens_agent"] == (deltas["tokens_user"] if agents else 0)
    assert report["fanout"]["agent_pairs"] == deltas["frames_agent"]
    assert report["latency_ms"]["token_lag"]["count"] == deltas["tokens"]
    assert report["latency_ms"]["token_lag"]["negative"] == 0
    assert report["fanout"]["pairs"] == deltas["frames_watcher"]
    # Each started answer got one model stream, and its first delta carried a marker.
    model = report["model_server"]
    assert model["streams"] == answers["started"]
    assert report["ttft_added_source"] == {"marker": answers["started"], "configured_ttft": 0}
    assert report["latency_ms"]["ttft_total"]["count"] + answers["ttft_unattributed"] == answers["started"]
    # The gateway's CPU was read before and after.
    assert report["gateway_cpu"]["cpu_seconds"] > 0
    assert report["gateway_cpu"]["us_per_delta_frame"] > 0


def assert_takeovers_consistent(report: dict[str, Any], *, conversations: int, agents: int) -> None:
    """What a clean run with agents taking over must show: every conversation followed, every
    takeover the agents counted is a `taken_over` ai_end the users saw (each timed), every takeover
    handed back, and no delta of a taken-over answer after its end on any socket."""
    followed, takeovers = report["agents"], report["takeovers"]
    assert followed["opened"] == agents
    assert followed["conversations_followed"] == conversations
    assert followed["conversations_unfollowed"] == 0
    assert followed["follow_failures"] == {}
    assert followed["max_subscriptions"] >= 1
    assert followed["feed_frames"] > 0
    taken_over = report["answers"]["by_status"].get("taken_over", 0)
    assert takeovers["sent"] >= 1
    assert takeovers["done"] == takeovers["sent"]
    assert takeovers["cut_answers"] == taken_over
    assert report["latency_ms"]["takeover"]["count"] == taken_over
    assert report["latency_ms"]["takeover_agent"]["count"] == taken_over
    assert takeovers["handbacks_sent"] == takeovers["handbacks_done"] == takeovers["done"]
    assert takeovers["refused"] == takeovers["unanswered"] == takeovers["handbacks_refused"] == 0
    assert takeovers["held_at_end"] == 0
    assert takeovers["late_deltas"] == 0
    assert takeovers["errors"] == {}
