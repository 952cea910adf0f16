"""The `chatgw` console command (also `python -m gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.util
import ipaddress
import logging
import re
import socket
import sys
from collections.abc import Callable
from typing import NoReturn

import uvicorn
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.drain import DrainingServer
from gateway.logs import configure_logging
from gateway.settings import Settings, SettingsError
from gateway.transport import protocols

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line refused in one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _TOOLS:  # tools with their own options; they need no gateway settings
        return _tool(argv[0])(argv[1:])
    parser = _Parser(prog="chatgw", description="Real-time WebSocket chat gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", type=_host, default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="port, 1-65535 (default $PORT or 8000)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="processes serving the port (default 1); more than 1 needs DATABASE_URL and REDIS_URL",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default auto: uvloop when it is installed, else asyncio)",
    )
    migrate = commands.add_parser("migrate", help="apply or undo database migrations (needs DATABASE_URL)")
    steps = migrate.add_subparsers(dest="action", required=True)
    up = steps.add_parser("up", help="apply pending migrations")
    up.add_argument("steps", nargs="?", type=_steps, default=None, help="how many (default: all)")
    down = steps.add_parser("down", help="undo applied migrations, newest first")
    down.add_argument("steps", nargs="?", type=_steps, default=1, help="how many, or 'all' (default: 1)")
    steps.add_parser("status", help="list migrations and whether each is applied")
    for name, summary in _TOOLS.items():  # listed for --help; dispatched above
        commands.add_parser(name, help=summary, add_help=False)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatgw: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return serve_command(
            settings,
            host=args.host or settings.host,
            port=args.port or settings.port,
            workers=args.workers,
            loop=args.loop,
        )
    return migrate_command(settings, args.action, args.steps if args.action != "status" else None)


_TOOLS = {
    "loadtest": "load-test running gateways over many sockets (see: chatgw loadtest --help)",
    "model-server": "a local OpenAI-compatible streaming model for load tests (see: chatgw model-server --help)",
}


def _tool(name: str) -> Callable[[list[str]], int]:
    if name == "loadtest":
        from gateway.loadtest.cli import main as loadtest

        return loadtest
    from gateway.devtools.model_server import main as model_server

    return model_server


def _steps(value: str) -> int | None:
    if value == "all":
        return None
    try:
        steps = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number or 'all'") from None
    if steps < 1:
        raise argparse.ArgumentTypeError("expected a number >= 1 or 'all'")
    return steps


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _host(value: str) -> str:
    """An IP address or a host name (resolved when the server binds)."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if len(value) > 253 or not _HOSTNAME.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"expected an IP address or a host name, got {value!r}"
            ) from None
    return value


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {port}")
    return port


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of processes") from None
    if not 1 <= workers <= 256:
        raise argparse.ArgumentTypeError("expected a number from 1 to 256")
    return workers


def migrate_command(settings: Settings, action: str, steps: int | None) -> int:
    if not settings.database_url:
        print(
            "chatgw migrate: DATABASE_URL is not set (the embedded default keeps no schema)", file=sys.stderr
        )
        return 2
    import asyncpg

    from gateway.migrate import MigrationError, Migrator

    try:
        migrator = Migrator(settings.database_url)
        if action == "status":
            for state in asyncio.run(migrator.status()):
                when = state.applied_at.isoformat(timespec="seconds") if state.applied_at else "pending"
                print(f"{state.version:04d} {state.name:<32} {when}")
            return 0
        if action == "up":
            done = asyncio.run(migrator.up(steps))
            verb = "applied"
        else:
            done = asyncio.run(migrator.down(steps))
            verb = "undid"
    except (MigrationError, OSError, asyncpg.PostgresError) as exc:
        print(f"chatgw migrate: {exc}", file=sys.stderr)
        return 1
    for migration in done:
        print(f"{verb} {migration.version:04d} {migration.name}")
    if not done:
        print("nothing to do")
    return 0


def settle_heap(threshold: int) -> None:
    """Once started, set the youngest generation's threshold (`CHATGW_GC_THRESHOLD`; the older
    two keep Python's 10 and 10), then collect and freeze what is alive (modules, the app, its
    clients: about 150,000 objects) into the garbage collector's permanent generation. A full
    collection walks every object it tracks; with these left out, the full collections made while
    serving walk only what serving created, and stall the event loop for a fraction of the time
    (the tail of token lag: bench/README.md, "Garbage collection"). What is frozen is never
    collected as a cycle; startup objects live as long as the process anyway."""
    gc.set_threshold(threshold, 10, 10)
    gc.collect()
    gc.freeze()


def serve_command(settings: Settings, *, host: str, port: int, workers: int = 1, loop: str = "auto") -> int:
    if workers > 1 and not (settings.database_url and settings.redis_url):
        print(
            f"chatgw serve: --workers {workers} needs DATABASE_URL and REDIS_URL: on the embedded "
            "memory backends each worker would keep its own conversations",
            file=sys.stderr,
        )
        return 2
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    elif loop == "uvloop" and not importlib.util.find_spec("uvloop"):
        print("chatgw serve: --loop uvloop: uvloop is not installed", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    log.info("serving on %s:%d: %d worker(s), %s event loop", host, port, workers, loop)
    run = functools.partial(run_server, settings, host=host, port=port, loop=loop, workers=workers)
    if workers == 1:
        return run()
    from gateway.workers import Supervisor

    stop_timeout = settings.graceful_shutdown + 30  # a drain's own bounds, and some slack
    return Supervisor(run, host=host, port=port, workers=workers, stop_timeout=stop_timeout).run()


def run_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    loop: str,
    workers: int = 1,
    sockets: list[socket.socket] | None = None,
    on_ready: Callable[[], None] | None = None,
    announce: bool = True,
) -> int:
    """One gateway process: its app on uvicorn with the gateway's drain. `sockets` are the
    listening sockets a supervisor bound (one worker of several); otherwise it binds host:port."""
    if sockets is not None:  # a worker process: its logging is not set up yet
        configure_logging(settings.log_level, settings.log_format)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"

    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"chatgw: {exc}", file=sys.stderr)
        return 2
    gw = app.state.gateway

    def ready() -> None:  # the server listens: say so, never earlier
        settle_heap(settings.gc_threshold)
        if on_ready is not None:
            on_ready()
        if not announce:
            return
        processes = f" ({workers} workers)" if workers > 1 else ""
        print(
            f"chatgw is ready: open {base}/ (demo) - WebSocket ws://{shown}:{port}/ws{processes}", flush=True
        )
        if settings.demo_api_key_is_random:
            where = (
                "kept in the database for every instance on it"
                if settings.database_url
                else "random for this process"
            )
            print(
                f"demo admin API key ({where}; set CHATGW_DEMO_API_KEY to choose it): {gw.demo_api_key}",
                flush=True,
            )

    config = uvicorn_config(app, settings, host=host, port=port, loop=loop)
    server = DrainingServer(config, gw, on_ready=ready)
    server.run(sockets=sockets)
    return 0 if server.started else 1


def uvicorn_config(
    app: Starlette, settings: Settings, *, host: str, port: int, loop: str = "auto"
) -> uvicorn.Config:
    """How the gateway runs under uvicorn: on `loop` ("uvloop", "asyncio", or "auto": uvloop when
    installed), sans-I/O websockets (with write backpressure), keepalive pings on, per-message
    deflate off (memory and CPU per socket), frames capped at CHATGW_MAX_FRAME_BYTES (larger ones
    close with 1009), and a bounded graceful shutdown."""
    http_protocol, ws_protocol = protocols(settings.limits)  # websockets-sansio and httptools, with deadlines
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http=http_protocol,
        ws=ws_protocol,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=int(settings.graceful_shutdown) or None,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
    )
