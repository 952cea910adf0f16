#!/usr/bin/env python3
"""Make sure a PostgreSQL server and a Redis server answer for the test suite, and print their URLs;
make sure Chromium is installed for the browser tests, and print its path.

Usage (from scripts/test):

    eval "$(python3 scripts/services.py)"

On success stdout carries exactly three lines and nothing else:

    export TEST_DATABASE_URL='postgresql://...'
    export TEST_REDIS_URL='redis://...'
    export TEST_CHROMIUM='/usr/bin/chromium'

Every progress or diagnostic message goes to stderr, prefixed with "chatgw-services: ".

For each service, in order:

1. Take the URL from TEST_DATABASE_URL / TEST_REDIS_URL, or the defaults
   postgresql://postgres@127.0.0.1:5432/postgres and redis://127.0.0.1:6379/0.
   If a server answers there, use it.
2. Otherwise start a throwaway server from the installed binaries (initdb + pg_ctl on PATH or under
   /usr/lib/postgresql/<version>/bin, redis-server) on a free port of 127.0.0.1, with its files in a
   fresh temporary directory. PostgreSQL refuses to run as root, so as root it runs as the "postgres"
   OS user. The server is left running for the test session and announced on stderr with a line
   that tools can parse:

       chatgw-services: started postgresql port=PORT dir=DIR   (data directory DIR/data)
       chatgw-services: started redis port=PORT dir=DIR

   stop_postgres(DIR) and stop_redis(URL) in this file stop them again.
3. If the binaries are missing, and this runs as root on a system with apt-get, install the Debian
   package (postgresql, redis-server), check the URL again (the package may start its own server),
   and otherwise go to step 2.
4. Otherwise fail: exit status 1 and a message on stderr naming what is missing and how to provide it.

Chromium (for the browser tests, driven by Playwright; no test tool downloads a browser): the
executable at TEST_CHROMIUM, or /usr/bin/chromium; when it is missing, as root with apt-get, the
Debian package chromium is installed; otherwise it fails saying so.

Nothing is ever skipped: either both services answer and Chromium is there and the exit status is 0,
or it is 1.
This file uses the Python standard library only: it runs before any dependency is installed.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shlex
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
PG_OS_USER = "postgres"
DEBIAN_PG_ROOT = Path("/usr/lib/postgresql")
START_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
PREFIX = "chatgw-services: "
# sun_path holds 108 bytes on Linux; PostgreSQL appends "/.s.PGSQL.NNNNN.lock" to the socket directory.
_MAX_SOCKET_DIR_LEN = 80

_apt_updated = False


class ServiceError(Exception):
    """A service cannot be made to answer; the message says what is missing and how to provide it."""


def log(message: str) -> None:
    print(PREFIX + message, file=sys.stderr, flush=True)


def redact(url: str) -> str:
    """The URL with its password (if any) replaced, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def shell_export(name: str, value: str) -> str:
    """`export NAME='value'`, single-quoted so that eval in a POSIX shell gives back value exactly."""
    return f"export {name}='" + value.replace("'", "'\"'\"'") + "'"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def _output_tail(result: subprocess.CompletedProcess[str], lines: int = 30) -> str:
    text = (result.stdout or "") + (result.stderr or "")
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


# ---------------------------------------------------------------------------------------------------
# Redis


def _resp_command(*args: str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _redis_connect(url: str, timeout: float) -> socket.socket:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"unsupported scheme {parts.scheme!r} (expected redis:// or rediss://)")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 6379
    sock = socket.create_connection((host, port), timeout=timeout)
    if parts.scheme == "rediss":
        try:
            return ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    return sock


def _redis_auth_commands(url: str) -> list[tuple[str, ...]]:
    """AUTH (when the URL has a password) and SELECT (when it names a database other than 0)."""
    parts = urlsplit(url)
    commands: list[tuple[str, ...]] = []
    if parts.password is not None:
        password = unquote(parts.password)
        if parts.username:
            commands.append(("AUTH", unquote(parts.username), password))
        else:
            commands.append(("AUTH", password))
    db = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
    if db not in ("", "0"):
        commands.append(("SELECT", db))
    return commands


def redis_problem(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the Redis server at url answers PING with PONG (after AUTH/SELECT); else why not."""
    try:
        with _redis_connect(url, timeout) as sock, sock.makefile("rb") as reader:
            for command in [*_redis_auth_commands(url), ("PING",)]:
                sock.sendall(_resp_command(*command))
                reply = reader.readline().rstrip(b"\r\n").decode(errors="replace")
                expected = "+PONG" if command[0] == "PING" else "+OK"
                if reply != expected:
                    shown = reply or "nothing (connection closed)"
                    return f"{command[0]} got {shown}, expected {expected}"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def redis_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    return redis_problem(url, timeout) is None


def stop_redis(url: str) -> None:
    """SHUTDOWN NOSAVE the Redis server at url (for throwaway servers started by this script)."""
    with _redis_connect(url, PROBE_TIMEOUT_S) as sock, sock.makefile("rb") as reader:
        for command in _redis_auth_commands(url):
            if command[0] == "AUTH":
                sock.sendall(_resp_command(*command))
                reader.readline()
        sock.sendall(_resp_command("SHUTDOWN", "NOSAVE"))
        try:
            reply = reader.readline()  # the server closes the connection when it goes down
        except OSError:
            reply = b""
    if reply.startswith(b"-"):
        raise ServiceError(
            f"SHUTDOWN NOSAVE at {redact(url)} failed: {reply.decode(errors='replace').strip()}"
        )


def find_redis_server() -> Path | None:
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    for candidate in (Path("/usr/bin/redis-server"), Path("/usr/sbin/redis-server")):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_redis(redis_server: Path, port: int | None = None) -> str:
    """Start a throwaway redis-server on a free port (or `port`); return its URL once it answers."""
    base = Path(tempfile.mkdtemp(prefix="chatgw-test-redis-"))
    port = port or free_port()
    log_path = base / "redis.log"
    command = [
        str(redis_server),
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no"),
        *("--daemonize", "yes", "--dir", str(base)),
        *("--logfile", str(log_path), "--pidfile", str(base / "redis.pid")),
    ]
    # --daemonize points the server's stdio at /dev/null, so capturing the output cannot hang.
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"{redis_server} exited with status {result.returncode} in {base}:\n"
            f"{_output_tail(result)}\n--- {log_path}:\n{_tail(log_path)}"
        )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + START_TIMEOUT_S
    while (problem := redis_problem(url)) is not None:
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the throwaway Redis server on port {port} (files in {base}) did not answer within "
                f"{START_TIMEOUT_S:.0f} s ({problem}); last lines of {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.1)
    log(f"Redis: started a throwaway server on port {port} in {base} (log {log_path})")
    log(f"started redis port={port} dir={base}")
    return url


# ---------------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_socket_problem(url: str, timeout: float) -> str | None:
    """Fallback when psql is absent: connect and send an SSLRequest; a PostgreSQL server replies
    with one byte, S or N. This proves that PostgreSQL listens there, not that the user and
    database in the URL are accepted (a full startup and authentication exchange is not worth it
    here: the test suite reports those errors clearly itself)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    # libpq would use its compiled-in Unix socket directory when no host is given; the URLs this
    # script deals with name a host, so "localhost" is a good enough stand-in for the fallback.
    host = parts.hostname or query.get("host", ["localhost"])[0]
    try:
        port = parts.port or int(query.get("port", ["5432"])[0])
        if host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(f"{host}/.s.PGSQL.{port}")
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
        with sock:
            sock.sendall(struct.pack("!ii", 8, 80877103))
            reply = sock.recv(1)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if reply not in (b"S", b"N"):
        return f"the server at {host}:{port} did not reply to an SSLRequest like PostgreSQL ({reply!r})"
    return None


def postgres_problem(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when the PostgreSQL server at url answers `select 1`; otherwise a description why not.

    Uses psql when it is on PATH, else the SSLRequest check of _pg_socket_problem."""
    psql = shutil.which("psql")
    if psql is None:
        return _pg_socket_problem(url, timeout)
    env = {**os.environ, "PGCONNECT_TIMEOUT": str(max(2, int(timeout)))}
    try:
        result = subprocess.run(
            # -X: no ~/.psqlrc; -w: never prompt for a password.
            [psql, "-X", "-w", "-At", "-c", "select 1", "-d", url],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if result.returncode == 0 and result.stdout.strip() == "1":
        return None
    message = " ".join(line.strip() for line in _output_tail(result, 3).splitlines())
    return f"psql exited with status {result.returncode}: {message}"


def postgres_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    return postgres_problem(url, timeout) is None


def _version_key(path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(piece) for piece in path.name.split("."))
    except ValueError:
        return (-1,)


def find_postgres_binaries() -> tuple[Path, Path] | None:
    """(initdb, pg_ctl): from PATH, else from the highest /usr/lib/postgresql/<version>/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return Path(initdb), Path(pg_ctl)
    versions = sorted(DEBIAN_PG_ROOT.glob("*/bin"), key=lambda b: _version_key(b.parent), reverse=True)
    for bindir in versions:
        tools = bindir / "initdb", bindir / "pg_ctl"
        if all(tool.is_file() and os.access(tool, os.X_OK) for tool in tools):
            return tools
    return None


def _postgres_os_user() -> pwd.struct_passwd | None:
    """The OS account to run the server as: None (this process) unless running as root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        raise ServiceError(
            f"PostgreSQL refuses to run as root and there is no {PG_OS_USER!r} OS user to run it as; "
            f"create one (for example: useradd --system --create-home {PG_OS_USER}), install the "
            "Debian package postgresql (which creates it), or set TEST_DATABASE_URL"
        ) from None


def _run_as(
    account: pwd.struct_passwd | None, command: Sequence[str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run command as account (when running as root) or as this process, capturing its output."""
    if account is None:
        return subprocess.run(
            list(command),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    env: Mapping[str, str] = {
        **os.environ,
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
    }
    return subprocess.run(
        list(command),
        cwd=cwd,
        env=env,
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _traversable_by(path: Path, account: pwd.struct_passwd) -> bool:
    """Whether account may enter path and every directory above it (owner/group/other x bits)."""
    groups = {account.pw_gid} | {g.gr_gid for g in grp.getgrall() if account.pw_name in g.gr_mem}
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == account.pw_uid:
            bit = 0o100
        elif st.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def _pg_temp_parent(account: pwd.struct_passwd | None) -> Path:
    default = Path(tempfile.gettempdir()).resolve()
    if account is None:
        return default
    for candidate in (default, Path("/tmp")):
        if candidate.is_dir() and _traversable_by(candidate, account):
            return candidate
    raise ServiceError(
        f"neither {default} nor /tmp can be entered by the {account.pw_name!r} OS user, which must own "
        "the throwaway PostgreSQL data directory; set TMPDIR to a directory it can reach, or set "
        "TEST_DATABASE_URL"
    )


def start_postgres(initdb: Path, pg_ctl: Path) -> str:
    """initdb + pg_ctl start a throwaway cluster on a free port; return its URL once it answers."""
    return start_postgres_cluster(initdb, pg_ctl)[0]


def start_postgres_cluster(initdb: Path, pg_ctl: Path) -> tuple[str, Path]:
    """Like start_postgres, and also return the cluster's base directory (for stop/restart)."""
    account = _postgres_os_user()
    base = Path(tempfile.mkdtemp(prefix="chatgw-test-pg-", dir=_pg_temp_parent(account)))
    if account is not None:
        shutil.chown(base, user=account.pw_uid, group=account.pw_gid)
    data = base / "data"
    log_path = base / "postgresql.log"
    port = free_port()

    result = _run_as(
        account,
        [
            str(initdb),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        cwd=base,
        timeout=120,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"{initdb} failed with status {result.returncode} (data directory {data}):\n"
            + _output_tail(result)
        )

    socket_dir = shlex.quote(str(base)) if len(str(base)) <= _MAX_SOCKET_DIR_LEN else "''"
    options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
    # -l sends the server's output to the log file, so capturing pg_ctl's own output cannot hang.
    result = _run_as(
        account,
        [str(pg_ctl), "-D", str(data), "-o", options, "-l", str(log_path), "-w", "-t", "30", "start"],
        cwd=base,
        timeout=START_TIMEOUT_S + 15,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"{pg_ctl} start failed with status {result.returncode} (data directory {data}):\n"
            f"{_output_tail(result)}\n--- {log_path}:\n{_tail(log_path)}"
        )

    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    deadline = time.monotonic() + START_TIMEOUT_S
    while (problem := postgres_problem(url)) is not None:
        if time.monotonic() > deadline:
            raise ServiceError(
                f"the throwaway PostgreSQL server on port {port} (data directory {data}) did not answer "
                f"within {START_TIMEOUT_S:.0f} s ({problem}); last lines of {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(0.2)
    owner = f" as the {account.pw_name!r} OS user" if account is not None else ""
    log(
        f"PostgreSQL: started a throwaway server{owner} on port {port} in {base} "
        f"(data directory {data}, log {log_path})"
    )
    log(f"started postgresql port={port} dir={base}")
    return url, base


def stop_postgres(base: Path, mode: str = "immediate") -> None:
    """Stop a throwaway server started by start_postgres; base is the dir= of its "started" line."""
    _pg_ctl(base, "-m", mode, "-w", "stop")


def restart_stopped_postgres(base: Path) -> None:
    """Start a stopped throwaway server again, on its old port and options (postmaster.opts)."""
    opts = (base / "data" / "postmaster.opts").read_text().split(None, 1)
    options = opts[1].strip() if len(opts) > 1 else ""
    _pg_ctl(
        base,
        "-o",
        options.replace('"-D" "' + str(base / "data") + '"', ""),
        "-l",
        str(base / "postgresql.log"),
        "-w",
        "start",
    )


def _pg_ctl(base: Path, *args: str) -> None:
    binaries = find_postgres_binaries()
    if binaries is None:
        raise ServiceError("no pg_ctl found on PATH or under /usr/lib/postgresql/*/bin")
    result = _run_as(
        _postgres_os_user(),
        [str(binaries[1]), "-D", str(base / "data"), *args],
        cwd=base,
        timeout=60,
    )
    if result.returncode != 0:
        raise ServiceError(
            f"pg_ctl {' '.join(args)} in {base} failed with status {result.returncode}: {_output_tail(result)}"
        )


# ---------------------------------------------------------------------------------------------------
# Installing Debian packages


def can_apt_install() -> bool:
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def apt_install(package: str) -> None:
    """apt-get update (once) and install package; all output goes to stderr."""
    global _apt_updated
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    commands = [] if _apt_updated else [["apt-get", "update"]]
    commands.append(["apt-get", "install", "-y", "--no-install-recommends", package])
    for command in commands:
        log("running " + " ".join(command))
        sys.stderr.flush()
        status = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
        if status.returncode != 0:
            raise ServiceError(
                f"`{' '.join(command)}` failed with status {status.returncode}; "
                f"install the Debian package {package} yourself"
            )
    _apt_updated = True


# ---------------------------------------------------------------------------------------------------
# The two services


def ensure_postgres(url: str) -> str:
    """A URL of a PostgreSQL server that answers: url itself, or a throwaway server's."""
    problem = postgres_problem(url)
    if problem is None:
        log(f"PostgreSQL: using {redact(url)} (answered)")
        return url
    log(f"PostgreSQL: {redact(url)} did not answer ({problem})")
    binaries = find_postgres_binaries()
    installed = ""
    if binaries is None and can_apt_install():
        log("PostgreSQL: no initdb/pg_ctl binaries found; installing the Debian package postgresql")
        apt_install("postgresql")
        installed = " even after installing the Debian package postgresql"
        if postgres_answers(url):
            log(f"PostgreSQL: using {redact(url)} (answered after installing the package)")
            return url
        binaries = find_postgres_binaries()
    if binaries is None:
        raise ServiceError(
            f"PostgreSQL is not reachable at {redact(url)} ({problem}) and no initdb/pg_ctl binaries were "
            f"found on PATH or under {DEBIAN_PG_ROOT}/*/bin{installed}; "
            "install the Debian package postgresql or set TEST_DATABASE_URL to a server that answers"
        )
    log(f"PostgreSQL: starting a throwaway server with {binaries[0]} and {binaries[1]}")
    return start_postgres(*binaries)


def ensure_redis(url: str) -> str:
    """A URL of a Redis server that answers: url itself, or a throwaway server's."""
    problem = redis_problem(url)
    if problem is None:
        log(f"Redis: using {redact(url)} (answered)")
        return url
    log(f"Redis: {redact(url)} did not answer ({problem})")
    redis_server = find_redis_server()
    installed = ""
    if redis_server is None and can_apt_install():
        log("Redis: no redis-server binary found; installing the Debian package redis-server")
        apt_install("redis-server")
        installed = " even after installing the Debian package redis-server"
        if redis_answers(url):
            log(f"Redis: using {redact(url)} (answered after installing the package)")
            return url
        redis_server = find_redis_server()
    if redis_server is None:
        raise ServiceError(
            f"Redis is not reachable at {redact(url)} ({problem}) and no redis-server binary was found "
            f"on PATH{installed}; "
            "install the Debian package redis-server or set TEST_REDIS_URL to a server that answers"
        )
    log(f"Redis: starting a throwaway server with {redis_server}")
    return start_redis(redis_server)


DEFAULT_CHROMIUM = "/usr/bin/chromium"


def ensure_chromium(path: str) -> str:
    """The path of a Chromium executable for the browser tests: path itself, installed if need be."""
    if os.access(path, os.X_OK):
        log(f"Chromium: using {path}")
        return path
    if path == DEFAULT_CHROMIUM and can_apt_install():
        log(f"Chromium: {path} is missing; installing the Debian package chromium")
        apt_install("chromium")
        if os.access(path, os.X_OK):
            return path
    raise ServiceError(
        f"Chromium is not installed at {path}; the browser tests need it: install the Debian package "
        "chromium (apt-get install chromium) or set TEST_CHROMIUM to a Chromium executable"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Environment: TEST_DATABASE_URL, TEST_REDIS_URL (optional).",
    )
    parser.parse_args(argv)
    database_url = os.environ.get("TEST_DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("TEST_REDIS_URL") or DEFAULT_REDIS_URL
    chromium = os.environ.get("TEST_CHROMIUM") or DEFAULT_CHROMIUM
    errors: list[str] = []
    found: dict[str, str] = {}
    for name, label, ensure, url in (
        ("TEST_DATABASE_URL", "PostgreSQL", ensure_postgres, database_url),
        ("TEST_REDIS_URL", "Redis", ensure_redis, redis_url),
        ("TEST_CHROMIUM", "Chromium", ensure_chromium, chromium),
    ):
        try:
            found[name] = ensure(url)
        except (ServiceError, OSError, subprocess.SubprocessError) as exc:
            message = str(exc)
            errors.append(message if message.startswith(label) else f"{label}: {message}")
    if errors:
        for error in errors:
            log(f"error: {error}")
        return 1
    for name, url in found.items():
        print(shell_export(name, url))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
