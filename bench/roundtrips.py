"""Round trips per turn to PostgreSQL and Redis, counted on the wire.

The script puts two counting TCP forwarders in front of the servers, starts a real gateway
(`python -m gateway serve`, the scripted model at full speed) on them, has `--conversations`
sockets each send one warm-up message and then `--turns` messages one after another, and counts
what the gateway sent during the measured turns:

- PostgreSQL: round trips (each `Sync` or simple `Query` message: asyncpg waits for the server's
  `ReadyForQuery` after each) and statements (`Execute` or `Query` messages).
- Redis: commands (one RESP array each; commands run inside scripts are not counted) and round
  trips (a command sent on a connection with no reply outstanding starts one; the commands of a
  pipeline share it). The pub/sub connection's SUBSCRIBEs are counted apart.

A background rate (the lease sweeper, renewals) is measured over an idle window as long as the
measured one and subtracted. Figures are per turn.

    .venv/bin/python bench/roundtrips.py --conversations 1,50
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.backends import redis_broker  # noqa: E402
from tests.databases import drop_database, migrated_database, redis_url  # noqa: E402
from tests.e2e.client import Client, new_widget  # noqa: E402
from tests.servers import GatewayProcess, start_gateway  # noqa: E402

_SSL_REQUEST = 80877103
_GSS_REQUEST = 80877104


@dataclass
class Counts:
    pg_round_trips: int = 0
    pg_statements: int = 0
    redis_commands: int = 0
    redis_round_trips: int = 0
    subscribes: int = 0
    by_command: collections.Counter[str] = field(default_factory=collections.Counter)
    by_statement: collections.Counter[str] = field(default_factory=collections.Counter)

    def copy(self) -> Counts:
        return Counts(
            self.pg_round_trips,
            self.pg_statements,
            self.redis_commands,
            self.redis_round_trips,
            self.subscribes,
            collections.Counter(self.by_command),
            collections.Counter(self.by_statement),
        )

    def minus(self, other: Counts) -> Counts:
        return Counts(
            self.pg_round_trips - other.pg_round_trips,
            self.pg_statements - other.pg_statements,
            self.redis_commands - other.redis_commands,
            self.redis_round_trips - other.redis_round_trips,
            self.subscribes - other.subscribes,
            self.by_command - other.by_command,
            self.by_statement - other.by_statement,
        )


# -- wire parsers ---------------------------------------------------------------------------------


class PgFrontend:
    """Counts the messages a PostgreSQL client sends (protocol 3)."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._buffer = bytearray()
        self._started = False
        self._statements: dict[bytes, str] = {}
        self._bound = ""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if not self._started:
                if len(self._buffer) < 8:
                    return
                length, code = struct.unpack("!ii", self._buffer[:8])
                if len(self._buffer) < length:
                    return
                del self._buffer[:length]
                # After an SSL or GSS request the client sends its startup message again.
                self._started = code not in (_SSL_REQUEST, _GSS_REQUEST)
                continue
            if len(self._buffer) < 5:
                return
            kind = chr(self._buffer[0])
            (length,) = struct.unpack("!i", self._buffer[1:5])
            if len(self._buffer) < 1 + length:
                return
            body = bytes(self._buffer[5 : 1 + length])
            del self._buffer[: 1 + length]
            self._note(kind, body)

    def _note(self, kind: str, body: bytes) -> None:
        if kind in "SQ":
            self._counts.pg_round_trips += 1
        if kind == "P":  # Parse: statement name, then the query
            name, _, rest = body.partition(b"\0")
            self._statements[name] = _short(rest.partition(b"\0")[0])
            self._counts.by_statement["(prepare) " + self._statements[name]] += 1
        elif kind == "B":  # Bind: portal name, then the statement name
            _portal, _, rest = body.partition(b"\0")
            self._bound = self._statements.get(rest.partition(b"\0")[0], "?")
        elif kind == "E":
            self._counts.pg_statements += 1
            self._counts.by_statement[self._bound] += 1
        elif kind == "Q":
            self._counts.pg_statements += 1
            self._counts.by_statement[_short(body.rstrip(b"\0"))] += 1


def _short(query: bytes) -> str:
    return " ".join(query.decode(errors="replace").split())[:70]


class _Incomplete(Exception):
    pass


def _line(buffer: bytearray | bytes, at: int) -> tuple[bytes, int]:
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    return bytes(buffer[at:end]), end + 2


def _skip_reply(buffer: bytearray, at: int) -> tuple[bool, int]:
    """Skip one RESP2/RESP3 value; return (is_push, position after it)."""
    if at >= len(buffer):
        raise _Incomplete
    kind = chr(buffer[at])
    line, at = _line(buffer, at + 1)
    if kind in "$!=":
        size = int(line)
        if size < 0:
            return False, at
        if len(buffer) < at + size + 2:
            raise _Incomplete
        return False, at + size + 2
    if kind in "*~>%|":
        count = int(line)
        count = count * 2 if kind in "%|" else count
        for _ in range(max(count, 0)):
            _push, at = _skip_reply(buffer, at)
        if kind == "|":  # an attribute precedes the real reply
            return _skip_reply(buffer, at)
        return kind == ">", at
    return False, at  # + - : _ , # ( : one line


class RedisConnection:
    """Counts the commands a Redis client sends on one connection, and its round trips."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._sent = bytearray()
        self._replies = bytearray()
        self._outstanding = 0
        self._pubsub = False

    def client_data(self, data: bytes) -> None:
        self._sent += data
        while True:
            try:
                name, end = self._command()
            except _Incomplete:
                return
            del self._sent[:end]
            if name in ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "UNSUBSCRIBE"):
                self._pubsub = True
            if self._pubsub:
                self._counts.subscribes += 1
                continue
            self._counts.redis_commands += 1
            self._counts.by_command[name] += 1
            if self._outstanding == 0:
                self._counts.redis_round_trips += 1
            self._outstanding += 1

    def server_data(self, data: bytes) -> None:
        if self._pubsub:
            return
        self._replies += data
        while True:
            try:
                push, end = _skip_reply(self._replies, 0)
            except _Incomplete:
                return
            del self._replies[:end]
            if not push:
                self._outstanding = max(self._outstanding - 1, 0)

    def _command(self) -> tuple[str, int]:
        line, at = _line(self._sent, 0)
        if not line.startswith(b"*"):
            raise ValueError(f"not a RESP command: {line[:40]!r}")
        args: list[bytes] = []
        for _ in range(int(line[1:])):
            header, at = _line(self._sent, at)
            size = int(header[1:])
            if len(self._sent) < at + size + 2:
                raise _Incomplete
            args.append(bytes(self._sent[at : at + size]))
            at += size + 2
        return _name(args), at


def _name(args: list[bytes]) -> str:
    """The command's name; for the broker's scripts, the script's (and a publish's event type)."""
    name = args[0].decode().upper()
    if name != "EVALSHA" or len(args) < 3:
        return name
    script = _SCRIPTS.get(args[1].decode(), "script")
    if script == "publish":  # EVALSHA sha 3 meta log answer channel type ...
        return f"EVALSHA publish {args[7].decode()}"
    return f"EVALSHA {script}"


_SCRIPTS = {
    hashlib.sha1(source.encode()).hexdigest(): name
    for name, source in vars(redis_broker).items()
    if name.startswith("_") and name.isupper() and isinstance(source, str) and "redis.call" in source
    for name in [name.strip("_").lower()]
}


# -- forwarders -----------------------------------------------------------------------------------


class Forwarder:
    """A TCP forwarder to `target` that hands what passes each way to per-connection counters."""

    def __init__(self, target: tuple[str, int], counts: Counts, kind: str) -> None:
        self._target = target
        self._counts = counts
        self._kind = kind
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        if self._kind == "pg":
            frontend = PgFrontend(self._counts)
            to_server, to_client = frontend.feed, None
        else:
            connection = RedisConnection(self._counts)
            to_server, to_client = connection.client_data, connection.server_data
        await asyncio.gather(
            self._pipe(reader, up_writer, to_server), self._pipe(up_reader, writer, to_client)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: object) -> None:
        try:
            while data := await reader.read(65536):
                if callable(seen):
                    seen(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def via(url: str, port: int, query: str = "") -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc, query=query or parts.query))


# -- the measurement ------------------------------------------------------------------------------


async def turns(client: Client, label: str, count: int) -> None:
    for n in range(count):
        await client.send({"type": "message", "client_msg_id": f"{label}-{n}", "text": f"question {n}"})
        while (await client.recv(timeout=60))["type"] != "ai_end":
            pass
    client.frames.clear()


async def measure(gw: GatewayProcess, counts: Counts, conversations: int, count: int) -> tuple[Counts, float]:
    # In threads: the forwarders run on this loop (and so do the sockets' counterparts).
    widgets = [await asyncio.to_thread(new_widget, gw) for _ in range(conversations)]
    clients = [await Client.open(gw) for _ in widgets]
    for client, widget in zip(clients, widgets, strict=True):
        await client.hello(widget)
    await asyncio.gather(*(turns(c, "warm", 1) for c in clients))
    await asyncio.sleep(0.5)  # the warm-up's trailing writes (the answer is stored after ai_end)
    before = counts.copy()
    started = time.perf_counter()
    await asyncio.gather(*(turns(c, "turn", count) for c in clients))
    await asyncio.sleep(0.5)
    elapsed = time.perf_counter() - started
    measured = counts.copy().minus(before)
    idle_before = counts.copy()
    await asyncio.sleep(elapsed)
    idle = counts.copy().minus(idle_before)
    for client in clients:
        await client.close()
    return measured.minus(idle), elapsed


async def one(conversations: int, args: argparse.Namespace) -> Counts:
    counts = Counts()
    database = await migrated_database()
    pg_url = urlsplit(database)
    pg = Forwarder((pg_url.hostname or "127.0.0.1", pg_url.port or 5432), counts, "pg")
    rd_url = urlsplit(redis_url())
    rd = Forwarder((rd_url.hostname or "127.0.0.1", rd_url.port or 6379), counts, "redis")
    await pg.start()
    await rd.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                "DATABASE_URL": via(database, pg.port, "sslmode=disable"),
                "REDIS_URL": via(redis_url(), rd.port),
                "CHATGW_REDIS_PREFIX": f"bench-rt-{time.monotonic_ns()}:",
                "CHATGW_SCRIPTED_TPS": "0",
                "CHATGW_SCRIPTED_TOKENS": str(args.tokens),
                "CHATGW_LOG_LEVEL": "WARNING",
                "CHATGW_MAX_ACTIVE_ANSWERS": "0",  # capacity is measured here: no overload limit
            }
            # In a thread: the forwarders run on this loop, which must keep turning meanwhile.
            gw = await asyncio.to_thread(start_gateway, Path(tmp), env)
            try:
                measured, _elapsed = await measure(gw, counts, conversations, args.turns)
            finally:
                await asyncio.to_thread(gw.stop)
    finally:
        await pg.stop()
        await rd.stop()
        await drop_database(database)
    return measured


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", default="1,50", help="comma-separated: one measurement each")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    for conversations in (int(c) for c in args.conversations.split(",")):
        measured = await one(conversations, args)
        n = conversations * args.turns
        print(f"\n{conversations} conversations x {args.turns} turns, {args.tokens} pieces per answer")
        print(f"  PostgreSQL round trips per turn  {measured.pg_round_trips / n:6.2f}")
        print(f"  PostgreSQL statements per turn   {measured.pg_statements / n:6.2f}")
        print(f"  Redis commands per turn          {measured.redis_commands / n:6.2f}")
        print(f"  Redis round trips per turn       {measured.redis_round_trips / n:6.2f}")
        print("  Redis commands per turn:")
        for command, times in measured.by_command.most_common():
            print(f"    {times / n:5.2f}  {command}")
        print("  PostgreSQL statements per turn:")
        for statement, times in measured.by_statement.most_common():
            print(f"    {times / n:5.2f}  {statement}")


if __name__ == "__main__":
    asyncio.run(main())
