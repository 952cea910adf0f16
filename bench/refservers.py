"""Starting and stopping the reference servers (ref_*.py) as processes of their own."""

from __future__ import annotations

import os
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
}


@dataclass
class Running:
    kind: str
    proto: Proto
    ports: list[int]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start(kind: str) -> Running:
    """Start `kind` (one of KINDS) on free ports; returns once every instance accepts connections.
    The socket.io instances share a Redis channel of their own (TEST_REDIS_URL)."""
    script, proto, instances = KINDS[kind]
    channel = f"chatgw-bench-{uuid.uuid4().hex[:8]}"
    running = Running(kind, proto, [])
    for _ in range(instances):
        port = free_port()
        argv = [sys.executable, str(HERE / script), "--port", str(port)]
        if proto == "socketio":
            argv += ["--redis", redis_url(), "--channel", channel]
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
