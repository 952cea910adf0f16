"""A small protocol client over a real WebSocket (the `websockets` library)."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from typing import Any, Self

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.servers import GatewayProcess

RECV_TIMEOUT = 15.0


@dataclass
class Widget:
    """What `POST /v1/widget/sessions` returned."""

    token: str
    conversation_id: str


def new_widget(gw: GatewayProcess, business: str = "demo") -> Widget:
    r = httpx.post(f"{gw.http}/v1/widget/sessions", json={"business": business}, timeout=10)
    assert r.status_code == 201, r.text
    body = r.json()
    return Widget(body["token"], body["conversation_id"])


@dataclass
class Client:
    ws: ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    async def open(cls, gw: GatewayProcess, **kwargs: Any) -> Self:
        ws = await connect(gw.ws, open_timeout=10, max_size=2**22, **kwargs)
        return cls(ws)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame = orjson.loads(raw)
        assert isinstance(frame, dict)
        self.frames.append(frame)
        return frame

    async def recv_type(self, *types: str, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        """The next frame of one of `types`; frames skipped on the way stay in `frames`."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] in types:
                return frame

    async def hello(self, widget: Widget, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "hello", "token": widget.token, **extra})
        welcome = await self.recv()
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def ask_and_read(self, client_msg_id: str, text: str, deltas: int = 3) -> dict[str, Any]:
        """Send a message and read on until its answer started and `deltas` deltas came; return
        the `ai_start` frame (the answer is still streaming when this returns, on a slow model)."""
        await self.send({"type": "message", "client_msg_id": client_msg_id, "text": text})
        start = await self.recv_type("ai_start")
        for _ in range(deltas):
            await self.recv_type("delta")
        return start

    def last_seq(self) -> int:
        """The highest event seq this client received."""
        return int(sequenced(self.frames)[-1]["seq"])

    async def until_ai_end(self) -> list[dict[str, Any]]:
        """Frames up to and including the next ai_end (typing frames dropped)."""
        got = []
        while True:
            frame = await self.recv()
            if frame["type"] == "typing":
                continue
            got.append(frame)
            if frame["type"] == "ai_end":
                return got

    async def close(self) -> None:
        await self.ws.close()


def sequenced(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if "seq" in f and f["type"] not in ("welcome", "ack", "reset")]


def assert_contiguous(frames: list[dict[str, Any]], start: int) -> None:
    """Event seqs run start, start+1, ... with no gap and no duplicate."""
    seqs = [f["seq"] for f in sequenced(frames)]
    assert seqs == list(range(start, start + len(seqs))), seqs


def joined_deltas(frames: list[dict[str, Any]], response_id: str) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta" and f["response_id"] == response_id)


async def stored_history(gw: GatewayProcess, widget: Widget, count: int) -> list[dict[str, Any]]:
    """The conversation's history once it holds `count` messages. An answer is stored just after
    its ai_end goes out, so a client that saw the ai_end may have to wait a moment for it."""
    async with httpx.AsyncClient() as http:
        for _ in range(500):
            r = await http.get(
                f"{gw.http}/v1/conversations/{widget.conversation_id}/messages",
                params={"limit": 500},
                headers={"Authorization": f"Bearer {widget.token}"},
            )
            assert r.status_code == 200, r.text
            messages: list[dict[str, Any]] = r.json()["messages"]
            if len(messages) >= count:
                return messages
            await asyncio.sleep(0.01)
    raise AssertionError(f"history did not reach {count} messages: {messages}")


async def stalled_client(gw: GatewayProcess) -> Client:
    """A client whose socket buffers little (a 4 KiB receive buffer, one message queued): once the
    test stops reading, the server's writes to it soon find the socket full."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", gw.port))
    return Client(await connect(gw.ws, sock=raw, max_size=2**22, max_queue=1))
