"""Where a gateway's time went, from a py-spy profile in its raw (collapsed stacks) format.

Prints the share of the busy samples spent inside each function (inclusive) and in each function
itself (self), leaving out samples where the event loop waited for I/O. Record with `--loop
asyncio` on the gateway (`chatgw serve --loop asyncio`): asyncio waits in a Python frame (the
selector), whereas a uvloop process waiting in C shows as the last Python frame that ran.

    py-spy record --pid <gateway pid> --duration 25 --rate 200 --format raw --output gw.raw
    .venv/bin/python bench/profile_raw.py gw.raw --top 40
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

WAITING = ("selectors.py", "select (")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = waiting = 0
    for line in args.profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if any(marker in frames[-1] for marker in WAITING):
            waiting += samples
            continue
        busy += samples
        for frame in set(frames):
            inclusive[frame] += samples
        own[frames[-1]] += samples
    print(f"{busy} busy samples, {waiting} waiting for I/O")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"-- {title}")
        for frame, samples in counter.most_common(args.top):
            print(f"{100 * samples / busy:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
