"""Where a gateway's event loop spent its time, by group, from a py-spy profile in raw format.

Each sample of the event loop's thread is counted once, under the first group (in the order
below) whose functions appear in its stack; samples waiting in the selector (record with
`chatgw serve --loop asyncio`) and the worker threads' are left out. `profile_raw.py` gives the
per-function view of the same file.

    py-spy record --pid <gateway pid> --duration 20 --rate 200 --format raw --output gw.raw
    .venv/bin/python bench/profile_groups.py gw.raw
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Redis publish (the publish script, pipelines)",
        ("RedisBroker.publish", "AsyncScript", "AutoPipeline", "Commands."),
    ),
    ("Redis pub/sub receive and delivery", ("RedisBroker._pump", "PubSub.", "SubscribedConnection.")),
    ("PostgreSQL (asyncpg)", ("asyncpg",)),
    ("opening model requests", ("OpenAILLM._request_stream", "OpenAILLM._complete_once")),
    ("reading the model's stream", ("OpenAIStream._pieces", "ChunkReader")),
    ("writing frames to sockets", ("Connection._write", "Connection.enqueue")),
    ("fan-out (hub, subscriptions)", ("Hub.on_event", "Subscription.")),
    # The core's event log publishes through whichever broker runs: on Redis the broker's own
    # frames are counted above (its group comes first), so what lands here is the log's own work,
    # and the memory broker's.
    (
        "publishing events (the core's event log; the memory broker)",
        ("MemoryBroker.publish", "EventLog.publish"),
    ),
    ("the answer's bookkeeping", ("AnswerRunner",)),
    ("reading and handling client frames", ("Connection._read", "Connection._handle")),
    ("rate limits", ("limits/",)),
    ("socket reads", ("_read_ready",)),
    ("other redis-py work", ("redis/",)),
    ("the event loop's own scheduling", ("_run_once", "Handle._run")),
]
IDLE = ("selectors.py", "select (")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in args.profile.read_text().splitlines():
        stack, _, number = line.rstrip().rpartition(" ")
        if not number.isdigit() or "Thread._bootstrap" in stack:
            continue
        if all(part in stack for part in IDLE):
            continue
        samples = int(number)
        total += samples
        frames = stack.split(";")
        for name, keys in GROUPS:
            if any(key in frame for frame in frames for key in keys):
                counts[name] += samples
                break
        else:
            counts["other"] += samples
    print(f"{total} busy samples of the event loop's thread")
    for name, samples in counts.most_common():
        print(f"{100 * samples / max(total, 1):5.1f} %  {name}")


if __name__ == "__main__":
    main()
