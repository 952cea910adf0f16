"""Where a gateway's time went, from a py-spy speedscope profile (bench/gateway_stream.py --profile).

Takes the main thread's samples, leaves out those where the event loop waits for I/O, and sorts
the rest into a few kinds of work by the first marker found in the stack. Profile a gateway run
with `--loop asyncio` for this: its wait is a Python frame (the selector), whereas py-spy shows a
uvloop process waiting in C as the last Python frame that ran, so that a lightly loaded uvloop
gateway seems busy everywhere.

    .venv/bin/python bench/profile_summary.py before.json after.json
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

# (kind, marker): a sample is of the first kind one of whose markers appears in a frame of its
# stack ("name" or "file" of the frame). Order matters: the more specific first.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("openai: a pydantic object per chunk", ("_process_response_data", "construct_type")),
    ("HTTP client transport: reading the body", ("Response.aiter_raw", "Response.aiter_bytes", "httpcore2")),
    ("openai: SSE decoder (str per line, event objects)", ("openai/_streaming.py",)),
    ("chatgw: SSE decoder + orjson (core/openai_sse.py)", ("core/openai_sse.py",)),
    ("HTTP client transport: reading the body", ("aiohttp",)),
    (
        "opening model requests (openai client, per answer)",
        ("AsyncAPIClient", "_open_stream", "_request_stream"),
    ),
    ("asyncio.timeout per chunk", ("asyncio/timeouts.py",)),
    ("WebSocket frames out (uvicorn, websockets)", ("websockets", "uvicorn/protocols")),
    ("hub, sessions, delta pump, broker", ("gateway/session.py", "gateway/hub.py", "delta_pump", "broker")),
    ("HTTP API (widget sessions, hello)", ("starlette", "http_api", "auth.py", "jwt")),
    (
        "conversation service, flow, templates",
        ("core/conversation.py", "core/pipeline.py", "jinja2", "celpy"),
    ),
]
# The loop waiting for I/O: asyncio's selector, or the runner itself (uvloop waits in C below it).
WAITING = ("selectors.py", "runners.py")


def kind_of(stack: list[dict[str, str]]) -> str:
    if not stack or any(marker in stack[-1].get("file", "") for marker in WAITING):
        return "waiting"
    text = [f"{frame['name']} {frame.get('file', '')}" for frame in stack]
    for kind, markers in KINDS:
        if any(marker in line for line in text for marker in markers):
            return kind
    return "other"


def summarise(path: Path) -> None:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    main = next(p for p in data["profiles"] if "MainThread" in p["name"])
    kinds: collections.Counter[str] = collections.Counter()
    for sample, weight in zip(main["samples"], main["weights"], strict=True):
        kinds[kind_of([frames[i] for i in sample])] += weight
    busy = sum(kinds.values()) - kinds["waiting"]
    print(f"{path.name}: {busy:.1f} s of work sampled in the main thread")
    for kind, seconds in kinds.most_common():
        if kind != "waiting":
            print(f"  {100 * seconds / busy:5.1f}%  {kind}")


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        summarise(Path(argument))
