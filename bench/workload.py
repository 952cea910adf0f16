"""The fan-out workload shared by the reference servers, and small utilities the drivers share.

Workload (per room = one conversation, two sockets: a user and a watcher): every
`ANSWER_EVERY_S` seconds an "answer" of `PIECES` pieces paced at `PIECES_PER_S`, each piece a
JSON object carrying its send time (`t`, wall clock, `time.time()`), delivered to both sockets of
the room. The first answer of a room starts at a random offset within the first period so that
rooms do not all stream in step. A room delivers 2 * PIECES / ANSWER_EVERY_S = 26.7 frames/s.

A piece as a reference server sends it (about the size of a gateway `delta` frame):

    {"type": "delta", "room": "r17", "seq": 123, "text": " word", "t": 1764640000.123456}

Client frames to a reference server: `{"type": "join", "room": "r17", "role": "user"}` (the
user's join starts the room's publisher; a `watcher` only listens). Nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ANSWER_EVERY_S = 3.0
PIECES = 40
PIECES_PER_S = 20.0
FRAMES_PER_ROOM_PER_S = 2 * PIECES / ANSWER_EVERY_S
PIECE_TEXT = " word"

Emit = Callable[[str, dict[str, object]], Awaitable[None]]


async def publish_answers(room: str, emit: Emit) -> None:
    """A room's publisher: answers of PIECES pieces at PIECES_PER_S every ANSWER_EVERY_S, for ever
    (cancel it). Pieces are due on a fixed schedule; a late loop sends the overdue ones at once
    (catching up), so delivered frames/s stays the workload's and the delay shows up as lag."""
    loop = asyncio.get_running_loop()
    start = loop.time() + random.uniform(0, ANSWER_EVERY_S)
    seq = 0
    while True:
        for i in range(PIECES):
            delay = start + i / PIECES_PER_S - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            seq += 1
            await emit(
                room, {"type": "delta", "room": room, "seq": seq, "text": PIECE_TEXT, "t": time.time()}
            )
        start += ANSWER_EVERY_S


def encode(piece: dict[str, object]) -> str:
    return json.dumps(piece, separators=(",", ":"))


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy since boot (/proc/stat: all but idle
    and iowait), to tell how much else ran beside a benchmark."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(f) for f in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICKS


def wait_for_quiet(below_cores: float, max_wait: float, sample: float = 2.0) -> float:
    """On a shared machine: wait (at most max_wait seconds) until the machine's busy cores,
    averaged over `sample` seconds, fall below `below_cores`; returns the last average. Call it
    while nothing of the benchmark's own runs."""
    deadline = time.monotonic() + max_wait
    while True:
        start = machine_busy_seconds()
        time.sleep(sample)
        busy = (machine_busy_seconds() - start) / sample
        if busy < below_cores or time.monotonic() >= deadline:
            return busy


def rss_bytes(pid: int) -> int:
    """Resident set size of the process now (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(ordered: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of an already sorted list."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")
