"""Where the load tool's agents go, decided purely: which client process and URL each agent is on,
and which agent follows each conversation."""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def place_agents(agents: int, processes: int, urls: int) -> list[tuple[int, int]]:
    """`(process, url index)` of each agent. Agent a belongs to process a mod P (a takeover is timed
    from the agent's send to the user's `ai_end`, so both sockets live in one process); a process's
    agents take the URLs in turn, starting one after its own index. Conversation i is on process
    i mod P and URL i mod n, so when P = n a process's conversations are all on one URL and its
    first agent is on the next one."""
    if agents and agents < processes:
        raise ValueError("every client process needs an agent")
    return [(a % processes, (a % processes + a // processes + 1) % urls) for a in range(agents)]


def assign_agents(homes: Sequence[int], agents: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each conversation (given by the index of its URL), the position in `agents` (each
    `(url index, cap)`) of the agent that follows it, or None when every agent is full.

    The least loaded agent on another URL than the conversation's with room takes it (so a
    takeover crosses instances where there are several); failing that, the least loaded one with
    room on its own URL; ties go to the first agent."""
    by_url: dict[int, list[tuple[int, int]]] = {}  # url -> heap of (load, agent)
    for position, (url, cap) in enumerate(agents):
        if cap > 0:
            by_url.setdefault(url, []).append((0, position))
    for heap in by_url.values():
        heapq.heapify(heap)
    caps = [cap for _, cap in agents]
    chosen: list[int | None] = []
    for home in homes:
        away = [heap[0] + (url,) for url, heap in by_url.items() if url != home and heap]
        candidates = away or ([by_url[home][0] + (home,)] if by_url.get(home) else [])
        if not candidates:
            chosen.append(None)
            continue
        load, position, url = min(candidates)
        heapq.heappop(by_url[url])
        if load + 1 < caps[position]:
            heapq.heappush(by_url[url], (load + 1, position))
        chosen.append(position)
    return chosen
