"""Fuzzing live gateways: one gateway process per backend for the whole fuzz set, a bounded and
reproducible number of examples per test, and checks that nothing went wrong inside the server.

Budget: the examples each test runs are multiplied by CHATGW_FUZZ_SCALE (default 1: the whole set
takes a minute or two). Examples are derandomized (the same ones every run, for CI); set
CHATGW_FUZZ_RANDOM=1 for fresh random ones, e.g. `CHATGW_FUZZ_SCALE=50 CHATGW_FUZZ_RANDOM=1`.
A failing example is reported as found: shrinking it against a live server can take many minutes,
so it is done only with CHATGW_FUZZ_SHRINK=1.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.e2e.client import Widget, new_widget
from tests.servers import DEMO_API_KEY, GatewayProcess

# Log records that mean the server failed on what it was sent (rather than refusing it).
_FAILURE_MARKS = ("Traceback", "internal error", "request failed", "frame handling failed", "reader failed")


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings for one fuzz test of `examples` examples (times CHATGW_FUZZ_SCALE)."""
    scale = float(os.environ.get("CHATGW_FUZZ_SCALE") or 1)
    phases = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
    if _on("CHATGW_FUZZ_SHRINK"):
        phases.append(Phase.shrink)
    return settings(
        max_examples=max(1, int(examples * scale)),
        phases=phases,
        deadline=None,
        derandomize=not _on("CHATGW_FUZZ_RANDOM"),
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,
        ],
    )


def _on(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


@pytest.fixture(scope="session")
def fuzz_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A gateway of the fuzz tests' own (tests.fuzz.launcher: with the `fuzz-shop` business)."""
    return gateway_factory({"CHATGW_HELLO_TIMEOUT_S": "2"}, module="tests.fuzz.launcher")


@pytest.fixture
def healthy(fuzz_gateway: GatewayProcess) -> Iterator[GatewayProcess]:
    """The fuzz gateway; after the test, it must still run, answer /healthz, serve a bystander's chat
    and have logged no failure of its own since the test began."""
    start = len(fuzz_gateway.log())
    with Bystander(fuzz_gateway) as bystander:
        yield fuzz_gateway
        bystander.chat("still there?")
    assert fuzz_gateway.process.poll() is None, fuzz_gateway.log()[start:]
    assert httpx.get(f"{fuzz_gateway.http}/healthz", timeout=10).status_code == 200
    failures = [
        line for line in fuzz_gateway.log()[start:].splitlines() if any(m in line for m in _FAILURE_MARKS)
    ]
    assert failures == []


class Bystander:
    """A widget user connected for the whole test, who chats successfully at the end."""

    def __init__(self, gw: GatewayProcess) -> None:
        from tests.fuzz.wire import open_socket

        self.widget: Widget = new_widget(gw)
        self.ws = open_socket(gw)
        self.ws.send(orjson.dumps({"type": "hello", "token": self.widget.token}).decode())
        assert self.recv()["type"] == "welcome"

    def recv(self) -> dict[str, Any]:
        frame = orjson.loads(self.ws.recv(timeout=15))
        assert isinstance(frame, dict)
        return frame

    def chat(self, text: str) -> None:
        msg_id = f"bystander-{time.monotonic_ns()}"
        self.ws.send(orjson.dumps({"type": "message", "client_msg_id": msg_id, "text": text}).decode())
        seen: list[dict[str, Any]] = []
        while not (seen and seen[-1]["type"] == "ai_end"):
            seen.append(self.recv())
        assert any(f["type"] == "ack" and f["client_msg_id"] == msg_id for f in seen), seen
        assert seen[-1]["status"] == "complete", seen
        assert seen[-1]["text"]

    def __enter__(self) -> Bystander:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ws.close()


def admin_headers(key: str = DEMO_API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
