"""A socket whose broker link loses an event still sees every seq once, in order: the gap is filled
from the replay log, or answered with reset when the log no longer has it.

Runs the real app in process (Starlette's test client) because the loss has to be injected into
the broker; everything else is the production code path.
"""

from __future__ import annotations

from typing import Any

from starlette.testclient import TestClient

from core.models import Event
from gateway.app import create_app
from gateway.backends.memory_broker import MemoryBroker
from gateway.settings import Settings

SECRET = "unit-test-secret-for-gap-tests-0123456789"


class LossyBroker(MemoryBroker):
    """Simulates a pub/sub link that drops deliveries: events whose seq is in `lose` are logged
    (replayable) but never handed to this instance's listener."""

    def __init__(self, lose: set[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lose = lose

    def _deliver(self, event: Event) -> None:
        if event.seq not in self.lose:
            super()._deliver(event)


def run_turn(broker: LossyBroker, window: int) -> list[dict[str, Any]]:
    settings = Settings.from_env(
        {
            "CHATGW_SECRET": SECRET,
            "CHATGW_SCRIPTED_TPS": "0",
            "CHATGW_SCRIPTED_TOKENS": "30",
            "CHATGW_DELTA_MAX_CHARS": "1",
            "CHATGW_REPLAY_WINDOW": str(window),
        }
    )
    frames: list[dict[str, Any]] = []
    with TestClient(create_app(settings, broker=broker)) as client:
        session = client.post("/v1/widget/sessions", json={"business": "demo"}).json()
        with client.websocket_connect("/ws") as ws:
            ws.send_json({"type": "hello", "token": session["token"]})
            frames.append(ws.receive_json())
            ws.send_json({"type": "message", "client_msg_id": "g-1", "text": "mind the gap"})
            while not frames or frames[-1]["type"] != "ai_end":
                frames.append(ws.receive_json())
    return frames


def test_a_lost_event_is_filled_from_the_replay_log() -> None:
    frames = run_turn(LossyBroker({3, 7}, replay_window=1000), window=1000)
    seqs = [f["seq"] for f in frames if f["type"] in ("message", "ai_start", "delta", "ai_end")]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not [f for f in frames if f["type"] == "reset"]
    text = "".join(f["text"] for f in frames if f["type"] == "delta")
    assert text == frames[-1]["text"]


def test_a_gap_the_log_cannot_fill_is_answered_with_reset() -> None:
    frames = run_turn(LossyBroker({3}, replay_window=1), window=1)
    resets = [f for f in frames if f["type"] == "reset"]
    assert len(resets) == 1
    assert resets[0]["reason"] == "gap"
    after = [f["seq"] for f in frames[frames.index(resets[0]) + 1 :] if "seq" in f and f["type"] != "ack"]
    assert after, "the answer must continue after the reset"
    assert after == list(range(resets[0]["seq"] + 1, resets[0]["seq"] + 1 + len(after)))
