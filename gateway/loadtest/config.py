"""The load tool's options: parsed, checked against their caps, and frozen."""

from __future__ import annotations

import argparse
import ipaddress
import os
import resource
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_CONVERSATIONS = 10_000
MAX_WATCHERS = 8
MAX_SOCKETS = 50_000
MAX_DURATION_S = 3600.0
MAX_PROCESSES = 64
MAX_AGENTS = 1000
ADMIN_KEY_ENV = "CHATGW_DEMO_API_KEY"


class ConfigError(ValueError):
    """An option the load tool cannot run with; the message names it."""


@dataclass(frozen=True, slots=True)
class Target:
    """One gateway: its HTTP base URL and its WebSocket endpoint."""

    http: str
    ws: str


@dataclass(frozen=True, slots=True)
class LoadConfig:
    targets: tuple[Target, ...]
    business: str = "demo"
    conversations: int = 10
    watchers_per_conversation: int = 1
    message_interval: float = 3.0
    duration: float = 30.0
    stop_rate: float = 0.0
    processes: int = 1
    connect_rate: float = 50.0
    drain_timeout: float = 10.0
    open_within: float = 60.0
    agents: int = 0
    takeover_rate: float = 0.0
    takeover_within: float = 1.0
    takeover_hold: float = 2.0
    admin_key: str | None = None  # never in the report
    model_server: str | None = None
    json_stdout: bool = False
    json_out: str | None = None
    quiet: bool = False

    @property
    def sockets(self) -> int:
        return self.conversations * (1 + self.watchers_per_conversation) + self.agents

    def public(self) -> dict[str, object]:
        """The options as the report shows them."""
        return {
            "urls": [t.http for t in self.targets],
            "business": self.business,
            "conversations": self.conversations,
            "watchers_per_conversation": self.watchers_per_conversation,
            "message_interval_s": self.message_interval,
            "duration_s": self.duration,
            "stop_rate": self.stop_rate,
            "processes": self.processes,
            "connect_rate": self.connect_rate,
            "drain_timeout_s": self.drain_timeout,
            "open_within_s": self.open_within,
            "agents": self.agents,
            "takeover_rate": self.takeover_rate,
            "takeover_within_s": self.takeover_within,
            "takeover_hold_s": self.takeover_hold,
            "model_server": self.model_server,
        }


def target(url: str, *, allow_remote: bool) -> Target:
    """A gateway's base URL (`http://host:port`; `ws://` and `https://` work too) as a Target.
    Hosts other than loopback addresses and `localhost` need `allow_remote`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ConfigError(f"--url {url!r}: expected a base URL such as http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ConfigError(f"--url {url!r}: the port is not a number between 0 and 65535") from None
    check_loopback(parts.hostname, f"--url {url!r}", allow_remote=allow_remote)
    secure = parts.scheme in ("https", "wss")
    base = f"{parts.netloc}{parts.path.rstrip('/')}"
    if base.endswith("/ws"):
        base = base[: -len("/ws")]
    return Target(
        http=f"{'https' if secure else 'http'}://{base}", ws=f"{'wss' if secure else 'ws'}://{base}/ws"
    )


def check_loopback(host: str, what: str, *, allow_remote: bool) -> None:
    if allow_remote or host.lower() == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"{what}: {host} is not a loopback address (127.0.0.0/8, ::1, localhost); "
            "pass --allow-remote to load-test another host"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatgw loadtest",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    add = parser.add_argument
    add(
        "--url",
        action="append",
        metavar="URL",
        help="a gateway's base URL; repeat for several instances "
        "(conversations are created round-robin; watchers connect to the next URL) (default http://127.0.0.1:8000)",
    )
    add("--allow-remote", action="store_true", help="allow targets that are not loopback addresses")
    add(
        "--business",
        default="demo",
        help="public id of the business whose widget sessions are created (default demo)",
    )
    add(
        "--conversations",
        type=int,
        default=10,
        help=f"conversations, one user socket each (default 10, at most {MAX_CONVERSATIONS})",
    )
    add(
        "--watchers-per-conversation",
        type=int,
        default=1,
        metavar="N",
        help=f"extra sockets per conversation with the user's token, on the next URL (default 1, at most {MAX_WATCHERS})",
    )
    add(
        "--message-interval",
        type=float,
        default=3.0,
        metavar="S",
        help="each user sends a message every S seconds (default 3)",
    )
    add(
        "--duration",
        type=float,
        default=30.0,
        metavar="S",
        help=f"how long users send messages (default 30, at most {MAX_DURATION_S:.0f})",
    )
    add(
        "--stop-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of answers the user stops at their first delta (default 0)",
    )
    add(
        "--processes",
        type=int,
        default=1,
        help="client processes the conversations are split over (default 1)",
    )
    add(
        "--connect-rate",
        type=float,
        default=50.0,
        metavar="N",
        help="conversations opened per second, all processes together (default 50)",
    )
    add(
        "--drain-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="after the last message, wait at most S seconds for answers to end (default 10)",
    )
    add(
        "--open-within",
        type=float,
        default=60.0,
        metavar="S",
        help="a widget session or socket refused with a retry hint (503 or 429, or an `unavailable` or "
        "`rate_limited` answer to hello) is tried again after the hinted wait, until S seconds after its "
        "first try (default 60; 0: never tried again)",
    )
    add(
        "--agents",
        type=int,
        default=0,
        metavar="N",
        help="agent sockets, spread over the URLs, each following a share of the conversations "
        f"(default 0, at most {MAX_AGENTS}; at least --processes when not 0)",
    )
    add(
        "--takeover-rate",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the answers of followed conversations that their agent takes over (default 0)",
    )
    add(
        "--takeover-within",
        type=float,
        default=1.0,
        metavar="S",
        help="an agent takes over at a random time from 0 to S seconds after the answer's first delta (default 1)",
    )
    add(
        "--takeover-hold",
        type=float,
        default=2.0,
        metavar="S",
        help="an agent hands the conversation back S seconds after its takeover (default 2)",
    )
    add(
        "--admin-key",
        metavar="KEY",
        help=f"the business's admin API key, to create the agents (default ${ADMIN_KEY_ENV})",
    )
    add(
        "--model-server",
        metavar="URL",
        help="base URL of `chatgw model-server`: its /stats are read before and after the run",
    )
    add("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    add("--json-out", metavar="FILE", help="also write the JSON report to FILE")
    add("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def parse(argv: list[str]) -> LoadConfig:
    """Parse and check the options; bad values raise ConfigError naming the option."""
    args = build_parser().parse_args(argv)
    targets = tuple(
        target(u, allow_remote=args.allow_remote) for u in (args.url or ["http://127.0.0.1:8000"])
    )
    model_server = None
    if args.model_server:
        model_server = target(args.model_server, allow_remote=args.allow_remote).http
    config = LoadConfig(
        targets=targets,
        business=args.business,
        conversations=args.conversations,
        watchers_per_conversation=args.watchers_per_conversation,
        message_interval=args.message_interval,
        duration=args.duration,
        stop_rate=args.stop_rate,
        processes=args.processes,
        connect_rate=args.connect_rate,
        drain_timeout=args.drain_timeout,
        open_within=args.open_within,
        agents=args.agents,
        takeover_rate=args.takeover_rate,
        takeover_within=args.takeover_within,
        takeover_hold=args.takeover_hold,
        admin_key=args.admin_key or os.environ.get(ADMIN_KEY_ENV) or None,
        model_server=model_server,
        json_stdout=args.json,
        json_out=args.json_out,
        quiet=args.quiet,
    )
    validate(config)
    return config


def validate(c: LoadConfig) -> None:
    _between("--conversations", c.conversations, 1, MAX_CONVERSATIONS)
    _between("--watchers-per-conversation", c.watchers_per_conversation, 0, MAX_WATCHERS)
    _between("--message-interval", c.message_interval, 0.1, 3600)
    _between("--duration", c.duration, 1, MAX_DURATION_S)
    _between("--stop-rate", c.stop_rate, 0, 1)
    _between("--processes", c.processes, 1, min(MAX_PROCESSES, c.conversations))
    _between("--connect-rate", c.connect_rate, 1, 10_000)
    _between("--drain-timeout", c.drain_timeout, 0, 600)
    _between("--open-within", c.open_within, 0, 3600)
    _validate_agents(c)
    if not c.business.strip():
        raise ConfigError("--business must not be empty")
    if c.sockets > MAX_SOCKETS:
        raise ConfigError(
            f"{c.sockets} sockets (conversations x (1 + watchers) + agents) is over the cap of {MAX_SOCKETS}"
        )
    per_process = -(-c.sockets // c.processes) + 64
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and per_process > hard:
        raise ConfigError(
            f"each client process would need {per_process} open files but the limit is {hard}: "
            "use more --processes or raise the limit (ulimit -Hn)"
        )


def _validate_agents(c: LoadConfig) -> None:
    _between("--agents", c.agents, 0, MAX_AGENTS)
    _between("--takeover-rate", c.takeover_rate, 0, 1)
    _between("--takeover-within", c.takeover_within, 0, 600)
    _between("--takeover-hold", c.takeover_hold, 0, 600)
    if c.takeover_rate and not c.agents:
        raise ConfigError("--takeover-rate needs agents to take over: add --agents N")
    if not c.agents:
        return
    if c.agents < c.processes:
        # A takeover is timed from the agent's send to the user's ai_end on one process's clock.
        raise ConfigError(
            f"--agents {c.agents} is fewer than --processes {c.processes}: each client process "
            "needs an agent of its own for its conversations"
        )
    if not c.admin_key:
        raise ConfigError(
            f"--agents needs the business's admin API key to create them: --admin-key KEY or ${ADMIN_KEY_ENV}"
        )


def _between(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


_DESCRIPTION = """\
Load-test running chatgw gateways over many WebSockets, speaking the wire protocol (docs/protocol.md).

Each conversation is a widget session (POST /v1/widget/sessions) with one user socket that sends a
message every --message-interval seconds and reads the streamed answers, and --watchers-per-conversation
more sockets with the same token on the next --url (so that fan-out across instances is measured).
With --agents, agents are created with the business's admin key (POST /v1/agents) and their
sockets follow the conversations (subscribe), each conversation by one agent, on another URL when
one has room; with --takeover-rate an agent takes over that fraction of the answers at a random
point (up to --takeover-within seconds after the answer's first delta) and hands back
--takeover-hold seconds later. The agents are disabled at the end (agents are never deleted).
Sockets open at --connect-rate; then users send for --duration seconds; then the tool waits up to
--drain-timeout for answers to end and agents to hand back, closes every socket and reports.

For per-token lag, point the gateway at `chatgw model-server` (OPENAI_API_KEY=any,
OPENAI_BASE_URL=http://127.0.0.1:8100/v1): its tokens carry their send time. Raise the gateway's
model limits for the business under test (CHATGW_LLM_CONCURRENCY, CHATGW_LLM_REQUESTS_PER_MINUTE),
or they, not the gateway, set the pace. Every user comes from this machine: start the gateway with
CHATGW_LIMIT_EXEMPT_IPS=127.0.0.1,::1 and CHATGW_LIMIT_BUSINESS_ANSWERS=off, or its per-address and
per-business limits refuse them (errors session_http_429, rate_limited; docs/limits.md). Targets
must be loopback addresses unless --allow-remote."""

_EPILOG = """\
Report (a table, or JSON with --json / --json-out; schema "chatgw.loadtest/1" in bench/README.md):
connections made and failed, close codes, acks/s, delta frames and tokens per second, latency
percentiles (ack, time to first token total and added by the gateway, per-token lag, fan-out lag
to watchers and agents, takeover to ai_end), takeovers and handbacks, late deltas, seq gaps and
duplicates, errors by code, the gateways' CPU per delivered delta.

A message refused with `unavailable` or `rate_limited` and a `retry_after_ms` (the gateway did not
take it, for example because it answers as many conversations as it may) is sent again after that
time, as the widget does, together with the messages the user wrote meanwhile (held until then);
the report counts the refusals by code, the messages sent again and held, and times the ack from
when the message was written. Likewise a widget session refused with 503 or 429 (the instance is
overloaded, or a limit was reached) and a socket whose `hello` is refused with `unavailable` or
`rate_limited` (then closed with 1013) are tried again after the hinted wait, within --open-within:
the report counts those refusals by reason (connections.refusals_by_reason), and only what never
opened counts as failed.

Exit status: 0 the run completed with no integrity problem; 1 it completed but saw seq gaps,
duplicates, late deltas, unacknowledged messages, unfinished answers or unanswered takeovers, or a
client process failed (its counts are missing); 2 bad options; 3 it could not run (no socket
opened, no client process finished, the agents could not be created). Ctrl-C ends the sending
early and still reports; a second Ctrl-C stops at once (130)."""
