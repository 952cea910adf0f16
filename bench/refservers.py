"""Starting and stopping the reference servers (ref_*.py) as processes of their own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from clients import Proto
from workload import wait_for_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.databases import redis_url  # noqa: E402
from tests.servers import free_port  # noqa: E402

# name -> (script, client protocol, instances)
KINDS: dict[str, tuple[str, Proto, int]] = {
    "websockets": ("ref_websockets.py", "plain", 1),
    "starlette": ("ref_starlette.py", "plain", 1),
    "socketio": ("ref_socketio.py", "socketio", 1),
    "socketio-2": ("ref_socketio.py", "socketio", 2),
    "floor-2": ("ref_floor.py", "plain", 2),
    "floor-model-2": ("ref_floor.py", "plain", 2),
    "floor-model-2-local": ("ref_floor.py", "plain", 2),
}
WITH_REDIS = {"socketio", "socketio-2", "floor-2", "floor-model-2", "floor-model-2-local"}
WITH_MODEL = {"floor-model-2", "floor-model-2-local"}
LOCAL = {"floor-model-2-local"}  # ref_floor.py --local
# The model server's pace for the kinds that read a model: the workload's (workload.py), after
# the same time to first token as the gateway's benchmarks (token_lag.py's default).
MODEL_ARGS = ("--ttft-ms", "200", "--tokens-per-second", "20", "--tokens", "40")


@dataclass
class Running:
    kind: str
    proto: Proto
    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    redis: subprocess.Popen[bytes] | None = None
    """A Redis server of the benchmark's own (the kinds in WITH_REDIS, when redis-server is installed)."""
    model: subprocess.Popen[bytes] | None = None
    """`chatgw model-server`, for the kinds in WITH_MODEL."""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        """Stop the servers, then their Redis and model (so that they do not see those go first)."""
        for group in (self.processes, [p for p in (self.redis, self.model) if p]):
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def start_redis() -> tuple[str, subprocess.Popen[bytes] | None]:
    """A Redis server of our own on a free port, so that other users of the shared one neither
    slow the benchmark nor see it, and its CPU can be counted; the one at TEST_REDIS_URL when
    redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        return redis_url(), None
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return f"redis://127.0.0.1:{port}/0", process


def start(kind: str) -> Running:
    """Start `kind` (one of KINDS) on free ports; returns once every instance accepts connections.
    The instances of a kind in WITH_REDIS share a Redis channel (on a Redis server of their own,
    see start_redis); a kind in WITH_MODEL reads its pieces from a `chatgw model-server` started
    for it (MODEL_ARGS)."""
    script, proto, instances = KINDS[kind]
    channel = f"chatgw-bench-{uuid.uuid4().hex[:8]}"
    running = Running(kind, proto, [])
    url = model_url = ""
    if kind in WITH_REDIS:
        url, running.redis = start_redis()
    if kind in WITH_MODEL:
        model_port = free_port()
        running.model = subprocess.Popen(
            [sys.executable, "-m", "gateway", "model-server", "--port", str(model_port), *MODEL_ARGS],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_for_port(model_port)
        except RuntimeError:
            running.stop()
            raise
        model_url = f"http://127.0.0.1:{model_port}"
    for _ in range(instances):
        port = free_port()
        argv = [sys.executable, str(HERE / script), "--port", str(port)]
        if kind in WITH_REDIS:
            argv += ["--redis", url, "--channel", channel]
        if model_url:
            argv += ["--model", model_url]
        if kind in LOCAL:
            argv.append("--local")
        running.ports.append(port)
        running.processes.append(
            subprocess.Popen(argv, cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        )
    try:
        for port in running.ports:
            wait_for_port(port)
    except RuntimeError:
        running.stop()
        raise
    return running
