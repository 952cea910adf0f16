"""Real gateway processes for end-to-end tests: `python -m gateway serve` on a free port."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-for-the-e2e-suite-only-0123456789"
DEMO_API_KEY = "demo-admin-key-for-the-e2e-suite"

# Variables that would switch backends or the model: the embedded default is tested here.
_SCRUBBED = ("DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_gateway(
    tmp_dir: Path,
    extra_env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    *,
    module: str = "gateway",
    cwd: Path = ROOT,
) -> GatewayProcess:
    """`python -m <module> serve` on a free port with `args` added to the command line (`module`:
    the gateway, or a test's launcher of it), from `cwd` (the checkout unless a test runs an
    installed copy), once it answers /healthz."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        {
            "CHATGW_SECRET": TEST_SECRET,
            "CHATGW_DEMO_API_KEY": DEMO_API_KEY,
            "CHATGW_SCRIPTED_TPS": "400",
            "CHATGW_SCRIPTED_TOKENS": "40",
            "CHATGW_LOG_FORMAT": "json",
            # Every test client connects from loopback, many of them in one session: per-address
            # limits apply to the addresses tests name with X-Forwarded-For (tests/e2e/test_limits.py).
            "CHATGW_LIMIT_EXEMPT_IPS": "127.0.0.1,::1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    log_path = tmp_dir / f"gateway-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    gw = GatewayProcess(port, process, log_path, env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited with {process.returncode}:\n{gw.log()}")
        try:
            if httpx.get(f"{gw.http}/healthz", timeout=1).status_code == 200:
                return gw
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    gw.stop()
    raise RuntimeError(f"gateway did not become healthy in 20 s:\n{gw.log()}")


def load_services() -> ModuleType:
    """scripts/services.py (not a package), for starting and stopping throwaway servers."""
    spec = importlib.util.spec_from_file_location("chatgw_services", ROOT / "scripts" / "services.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
