"""The gateway, with every garbage collection timed: a launcher for benchmarks.

`python -m gc_pauses serve ...` (with this directory on PYTHONPATH) runs `chatgw` exactly as
`python -m gateway` does, and appends one line per collection to the file named by
`CHATGW_BENCH_GC_LOG`: when it ended (Unix time), the generation, how long the collection held the
process (ms) and how many objects it freed. `token_lag.py --gc` runs its gateways this way and
adds `summarize()` of their logs to each report (`bench.gc`). The callbacks cost a few microseconds per collection.

A full collection (generation 2) walks every object the collector tracks and holds the event loop
meanwhile: a pause every frame in flight waits out. That is the number to watch.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path
from typing import Any


def install(path: str) -> None:
    log = open(path, "a", buffering=1)  # noqa: SIM115  # open for the process's whole life
    started = [0.0]

    def timed(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            held = (time.perf_counter() - started[0]) * 1000
            log.write(f"{time.time():.3f} {info['generation']} {held:.3f} {info.get('collected', 0)}\n")

    gc.callbacks.append(timed)


def summarize(paths: list[Path], since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
    """Per generation, over the logs of one or more gateways: collections and total pause (ms)
    summed, the longest pause kept; only the collections that ended between `since` and `until`
    (Unix time: a load's window, leaving out start-up)."""
    out: dict[str, Any] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            ended, generation, held, _ = line.split()
            if not since <= float(ended) <= until:
                continue
            cell = out.setdefault(f"gen{generation}", {"collections": 0, "total_ms": 0.0, "max_ms": 0.0})
            cell["collections"] += 1
            cell["total_ms"] = round(cell["total_ms"] + float(held), 3)
            cell["max_ms"] = max(cell["max_ms"], float(held))
    return out


if __name__ == "__main__":
    target = os.environ.get("CHATGW_BENCH_GC_LOG")
    if target:
        install(target)
    from gateway.cli import main

    sys.exit(main())
