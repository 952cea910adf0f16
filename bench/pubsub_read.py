"""CPU per pub/sub message received, by way of reading the subscription connection.

A publisher process sends PUBLISHes of an event-sized payload (a delta event in the broker's
pub/sub form, about 170 bytes) to one channel at a fixed rate, in small pipelines (one per
millisecond); the subscriber, in this process, reads N messages one of these ways and reports its
CPU time (`time.process_time`) per message:

- `get_message`: redis-py's `PubSub.get_message(timeout=1.0)` per message, as the broker read
  until this benchmark;
- `chunks`: a connection's stream read a chunk at a time (all that arrived) and its pub/sub
  replies split out of it (`gateway.backends.redis_wire.SubscribedConnection`, the broker's way now).

    .venv/bin/python bench/pubsub_read.py --messages 50000 --rate 6000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import redis
import redis.asyncio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.backends.redis_wire import Reply, SubscribedConnection  # noqa: E402
from tests.databases import redis_url  # noqa: E402

PAYLOAD = (
    b"1234\nai_delta\n\n17\n"
    + b'{"response_id":"r_0123456789abcdef","message_id":"r_0123456789abcdef","text":" word","index":12,'
    + b'"sent_at":1733145600.123456}'
)


def publish(url: str, channel: str, messages: int, rate: float, ready: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    client = redis.Redis.from_url(url)
    ready.wait()  # type: ignore[attr-defined]
    time.sleep(0.2)
    per_ms = rate / 1000
    sent = 0
    owed = 0.0
    start = time.perf_counter()
    while sent < messages:
        owed += per_ms
        batch = min(int(owed), messages - sent)
        if batch:
            pipe = client.pipeline(transaction=False)
            for _ in range(batch):
                pipe.publish(channel, PAYLOAD)
            pipe.execute()
            sent += batch
            owed -= batch
        wake = start + (sent + 1) / rate
        delay = wake - time.perf_counter()
        if delay > 0:
            time.sleep(min(delay, 0.001))
    client.close()


async def receive(url: str, channel: str, way: str, messages: int, ready: multiprocessing.Event) -> float:  # type: ignore[valid-type]
    client = redis.asyncio.Redis.from_url(url, socket_timeout=5)
    if way == "chunks":
        return await receive_chunks(client, channel, messages, ready)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    while (await pubsub.get_message(timeout=1.0)) is None:  # the subscribe confirmation
        pass
    ready.set()  # type: ignore[attr-defined]
    first = await pubsub.get_message(timeout=5.0)  # CPU counted from the first message on
    assert first is not None
    seen = 1
    began = time.process_time()
    total = len(PAYLOAD)
    while seen < messages:
        message = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
        if message is not None and message["type"] == "message":
            total += len(message["data"])
            seen += 1
    spent = time.process_time() - began
    assert total == messages * len(PAYLOAD)
    await pubsub.aclose()
    await client.aclose()
    return spent / messages * 1e6


async def receive_chunks(
    client: redis.asyncio.Redis,
    channel: str,
    messages: int,
    ready: multiprocessing.Event,  # type: ignore[valid-type]
) -> float:
    subscription = await SubscribedConnection.open(client.connection_pool)
    await subscription.send("SUBSCRIBE", channel)
    pending: list[Reply] = []
    while not pending:
        pending = await subscription.read()  # the subscribe confirmation
    ready.set()  # type: ignore[attr-defined]
    seen = total = 0
    began = None
    while seen < messages:
        for reply in pending:
            if isinstance(reply, list) and reply[0] == b"message":
                data = reply[2]
                assert isinstance(data, bytes)
                total += len(data)
                seen += 1
        if began is None and seen:
            began = time.process_time()  # CPU counted from the first message's chunk on
        if seen < messages:
            pending = await subscription.read()
    assert began is not None
    spent = time.process_time() - began
    assert total == messages * len(PAYLOAD)
    await subscription.close()
    await client.aclose()
    return spent / messages * 1e6


def one(url: str, way: str, messages: int, rate: float) -> float:
    channel = f"chatgw-bench-pubsub:{os.getpid()}:{time.monotonic_ns()}"
    ready = multiprocessing.Event()
    publisher = multiprocessing.Process(target=publish, args=(url, channel, messages, rate, ready))
    publisher.start()
    try:
        return asyncio.run(receive(url, channel, way, messages, ready))
    finally:
        publisher.join(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=6000.0, help="messages a second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ways", default="get_message,chunks")
    args = parser.parse_args()
    url = redis_url()
    ways = args.ways.split(",")
    results: dict[str, list[float]] = {way: [] for way in ways}
    for run in range(1, args.runs + 1):
        for way in ways:
            cost = one(url, way, args.messages, args.rate)
            results[way].append(cost)
            print(
                f"run {run} {way}: {cost:.2f} µs per message (load avg {os.getloadavg()[0]:.1f})", flush=True
            )
    print(
        f"\n{args.messages} messages at {args.rate:.0f}/s, {args.runs} runs: median (lowest-highest) µs of CPU per message"
    )
    for way, costs in results.items():
        print(f"  {way:14} {statistics.median(costs):6.2f} ({min(costs):.2f}-{max(costs):.2f})")


if __name__ == "__main__":
    main()
