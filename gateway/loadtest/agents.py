"""The load tool's agents: made over the HTTP API before the run (and disabled after it), then one
socket each that follows its share of the conversations (`subscribe`), checks every followed
conversation's stream, measures fan-out to itself and takes over and hands back as its
conversations' `TakeoverCycle`s decide."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from gateway.loadtest.clients import Conversation
from gateway.loadtest.config import LoadConfig, Target
from gateway.loadtest.plan import place_agents
from gateway.loadtest.sockets import OPEN_TIMEOUT_S, Run, SocketClient, now_ns
from gateway.loadtest.stats import StreamCheck
from gateway.loadtest.takeover import Phase, Send, Step, TakeoverCycle, Wait

_CREATING_AT_ONCE = 16


class AgentSetupError(RuntimeError):
    """The agents could not be made (the message names the URL and the gateway's answer)."""


@dataclass(frozen=True, slots=True)
class AgentPlan:
    """One agent of the run: made by the parent process, run by client process `process`."""

    index: int
    process: int
    url_index: int
    agent_id: str
    token: str


def create_agents(config: LoadConfig) -> list[AgentPlan]:
    """Make `config.agents` agents of the admin key's business, each on the URL it will connect to,
    and a token for each. Raises AgentSetupError at the first refusal."""
    return asyncio.run(_create_all(config))


async def _create_all(config: LoadConfig) -> list[AgentPlan]:
    run_id = uuid.uuid4().hex[:6]
    places = place_agents(config.agents, config.processes, len(config.targets))
    gate = asyncio.Semaphore(_CREATING_AT_ONCE)
    async with _admin_client(config) as http:

        async def one(index: int, process: int, url_index: int) -> AgentPlan:
            async with gate:
                base = config.targets[url_index].http
                body = await _post(http, f"{base}/v1/agents", {"name": f"loadtest {run_id} agent {index}"})
                agent_id = str(body["agent_id"])
                token = await _post(http, f"{base}/v1/agents/{agent_id}/tokens", None)
                return AgentPlan(index, process, url_index, agent_id, str(token["token"]))

        return list(await asyncio.gather(*(one(i, p, u) for i, (p, u) in enumerate(places))))


def disable_agents(config: LoadConfig, plans: list[AgentPlan]) -> list[str]:
    """Disable the run's agents (agents are never deleted); the problems, if any, as lines."""
    return asyncio.run(_disable_all(config, plans))


async def _disable_all(config: LoadConfig, plans: list[AgentPlan]) -> list[str]:
    gate = asyncio.Semaphore(_CREATING_AT_ONCE)
    async with _admin_client(config) as http:

        async def one(plan: AgentPlan) -> str | None:
            url = f"{config.targets[plan.url_index].http}/v1/agents/{plan.agent_id}"
            async with gate:
                try:
                    r = await http.patch(url, json={"disabled": True})
                except httpx.HTTPError as exc:
                    return f"PATCH {url}: {exc!r}"
            return None if r.status_code == 200 else f"PATCH {url}: HTTP {r.status_code}"

        return [p for p in await asyncio.gather(*(one(plan) for plan in plans)) if p is not None]


def _admin_client(config: LoadConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=OPEN_TIMEOUT_S, headers={"Authorization": f"Bearer {config.admin_key}"}, trust_env=False
    )


async def _post(http: httpx.AsyncClient, url: str, body: dict[str, Any] | None) -> dict[str, Any]:
    try:
        r = await http.post(url, json=body)
    except httpx.HTTPError as exc:
        raise AgentSetupError(f"cannot make the agents: POST {url}: {exc!r}") from None
    if r.status_code == 401:
        raise AgentSetupError(
            f"cannot make the agents: POST {url} refused the admin key (401): "
            "check --admin-key or $CHATGW_DEMO_API_KEY"
        )
    if r.status_code not in (200, 201):
        raise AgentSetupError(f"cannot make the agents: POST {url} answered {r.status_code}: {r.text[:200]}")
    answer: dict[str, Any] = r.json()
    return answer


class Followed:
    """A conversation an agent follows: its stream check (from `subscribed`) and its takeovers."""

    __slots__ = ("check", "conversation", "cycle", "subscribed", "timer")

    def __init__(self, conversation: Conversation, cycle: TakeoverCycle) -> None:
        self.conversation = conversation
        self.cycle = cycle
        self.check: StreamCheck | None = None
        # None once subscribed, or why the subscription failed
        self.subscribed: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.Task[None] | None = None


class AgentClient(SocketClient):
    """An agent's socket on its URL: `hello` with its token, `welcome` (checked to be of the
    business under test; it gives the most conversations one socket may follow), `snapshot`, then
    the business feed (counted, not checked) and the conversations it follows."""

    kind = "agent"

    def __init__(self, run: Run, plan: AgentPlan, target: Target) -> None:
        super().__init__(run, target)
        self.plan = plan
        self.cap = 0  # max_subscriptions, from the welcome
        self.followed: dict[str, Followed] = {}

    def hello(self) -> dict[str, Any]:
        return {"type": "hello", "token": self.plan.token}

    def welcome(self, frame: dict[str, Any]) -> str | None:
        failure = super().welcome(frame)
        if failure is not None:
            return failure
        if frame.get("business") != self.run.config.business:
            return "agent_other_business"  # the admin key is not the business's under test
        self.cap = int(frame.get("max_subscriptions") or 0)
        self.tally.keyed["agent_max_subscriptions"][str(self.cap)] += 1
        return None

    async def follow(self, conversation: Conversation) -> bool:
        """Subscribe to the conversation and wait for `subscribed`; False (counted) when refused."""
        config = self.run.config
        cycle = TakeoverCycle(
            self.tally.counts,
            self.plan.agent_id,
            within=config.takeover_within,
            hold=config.takeover_hold,
        )
        view = Followed(conversation, cycle)
        cid = conversation.conversation_id
        self.followed[cid] = view
        if await self.send({"type": "subscribe", "conversation_id": cid}):
            try:
                failure = await asyncio.wait_for(view.subscribed, OPEN_TIMEOUT_S)
            except TimeoutError:
                failure = "subscribe_timeout"
        else:
            failure = "subscribe_closed"
        if failure is not None:
            del self.followed[cid]
            self.tally.keyed["follow_failures"][failure] += 1
            return False
        counts = self.tally.counts
        counts["conversations_followed"] += 1
        counts["followed_cross_instance"] += self.plan.url_index != conversation.home_index
        return True

    def check_for(self, frame: dict[str, Any]) -> StreamCheck | None:
        view = self.followed.get(frame.get("conversation_id", ""))
        return None if view is None else view.check

    def checks(self) -> Iterable[StreamCheck]:
        return (view.check for view in self.followed.values() if view.check is not None)

    # -- frames ------------------------------------------------------------------------------------

    def on_other(self, frame: dict[str, Any], now: int) -> None:
        kind = frame.get("type")
        if kind == "feed":
            self.tally.counts["feed_frames"] += 1
        elif kind == "subscribed":
            view = self.followed.get(frame.get("conversation_id", ""))
            if view is not None and not view.subscribed.done():
                view.check = StreamCheck(int(frame["seq"]))
                view.subscribed.set_result(None)

    def on_error(self, frame: dict[str, Any]) -> None:
        view = self.followed.get(frame.get("conversation_id") or "")
        if view is None:
            return
        if not view.subscribed.done():
            view.subscribed.set_result(f"subscribe_{frame.get('code')}")
            return
        if view.cycle.phase in (Phase.SENT, Phase.HANDING_BACK):
            self.tally.keyed["takeover_errors"][str(frame.get("code"))] += 1
        self._step(view, view.cycle.error())

    def on_ai_start(self, frame: dict[str, Any], now: int) -> None:
        view = self.followed[frame["conversation_id"]]
        config, run = self.run.config, self.run
        picked = run.sending and config.takeover_rate > 0 and run.rng.random() < config.takeover_rate
        view.cycle.ai_start(frame["response_id"], picked=picked)

    def on_delta(self, frame: dict[str, Any], now: int, stamps: list[str]) -> None:
        view = self.followed[frame["conversation_id"]]
        if view.conversation.agent_pairer is not None:
            lag = view.conversation.agent_pairer.watcher(frame["seq"], now)
            if lag is not None:
                view.conversation.fanout(lag, "agent")
        self._step(view, view.cycle.delta(frame["response_id"], self.run.rng.random()))

    def on_ai_end(self, frame: dict[str, Any], now: int) -> None:
        view = self.followed[frame["conversation_id"]]
        status = str(frame.get("status"))
        if status == "taken_over":
            view.conversation.took_over(now, "takeover_agent")
        view.cycle.ai_end(frame["response_id"], status)

    def on_mode(self, frame: dict[str, Any], now: int) -> None:
        view = self.followed[frame["conversation_id"]]
        self._step(view, view.cycle.mode(str(frame.get("mode")), frame.get("agent_id")))

    # -- acting --------------------------------------------------------------------------------------

    def _step(self, view: Followed, step: Step) -> None:
        if isinstance(step, Wait):
            if view.timer is not None:
                view.timer.cancel()
            view.timer = asyncio.create_task(self._fire(view, step.seconds))
        elif isinstance(step, Send):
            view.conversation.spawn(self._send_action(view.conversation, step.kind))

    async def _send_action(self, conversation: Conversation, kind: str) -> None:
        if kind == "takeover":  # timed from here, as it goes out, to the ai_end it causes
            number = conversation.takeover[0] + 1 if conversation.takeover else 1
            conversation.takeover = (number, now_ns())
        await self.send({"type": kind, "conversation_id": conversation.conversation_id})

    async def _fire(self, view: Followed, seconds: float) -> None:
        await asyncio.sleep(seconds)
        view.timer = None
        self._step(view, view.cycle.fired())

    def idle(self) -> bool:
        return super().idle() and all(view.cycle.idle for view in self.followed.values())

    async def close(self) -> None:
        for view in self.followed.values():
            if view.timer is not None:
                view.timer.cancel()
            view.cycle.account_end()
        await super().close()
