"""`chatgw serve` as an operator runs it: a bad setting or flag is one line naming it and a non-zero
exit, a dependency it cannot use is one line naming its variable (no traceback), and "ready" is
printed only once the port accepts connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping

import pytest

from tests.databases import create_database, drop_database, sync
from tests.servers import ROOT, free_port

_SCRUBBED = ("DATABASE_URL", "REDIS_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL", "PORT")


def serve_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED and not k.startswith("CHATGW_")}
    return {**env, "PYTHONUNBUFFERED": "1", "CHATGW_LOG_FORMAT": "text", **extra}


def serve(args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        cwd=ROOT,
        env=serve_env(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CHATGW_LOG_LEVEL": "verbose"}, "CHATGW_LOG_LEVEL"),
        ({"CHATGW_LOG_FORMAT": "xml"}, "CHATGW_LOG_FORMAT"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:99999/0"}, "REDIS_URL"),
        ({"DATABASE_URL": "mysql://user:hunter2@db/chat"}, "DATABASE_URL"),
        ({"OPENAI_BASE_URL": "127.0.0.1:8080/v1"}, "OPENAI_BASE_URL"),
        ({"PORT": "70000"}, "PORT"),
        ({"CHATGW_MAX_FRAME_BYTES": "lots"}, "CHATGW_MAX_FRAME_BYTES"),
        ({"CHATGW_SECRET": "short"}, "CHATGW_SECRET"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(env: dict[str, str], named: str) -> None:
    done = serve(["--port", str(free_port())], env)
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"chatgw: {named} ")
    assert "hunter2" not in done.stderr  # a URL's password is never echoed


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "0"], "--port"),
        (["--port", "http"], "--port"),
        (["--host", "not a host"], "--host"),
        (["--host", "-bad-.example"], "--host"),
        (["--workers", "0"], "--workers"),
        (["--workers", "many"], "--workers"),
        (["--loop", "trio"], "--loop"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(args: list[str], named: str) -> None:
    done = serve(args, {})
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"chatgw serve: argument {named}")


@pytest.fixture
def empty_database() -> Iterator[str]:
    url = sync(create_database())
    yield url
    sync(drop_database(url))


def assert_one_line_failure(done: subprocess.CompletedProcess[str], named: str) -> str:
    """The run failed, without a traceback, with one error line that names `named`; that line."""
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert "chatgw is ready" not in output
    naming = [line for line in output.splitlines() if f"ERROR uvicorn.error: {named}: " in line]
    assert len(naming) == 1, output
    return naming[0]


def test_an_unmigrated_database_says_to_run_migrate_up(empty_database: str) -> None:
    done = serve(["--port", str(free_port())], {"DATABASE_URL": empty_database})
    line = assert_one_line_failure(done, "DATABASE_URL")
    assert "schema is at version 0" in line
    assert "run 'chatgw migrate up'" in line


def test_a_database_that_does_not_answer_is_one_line(empty_database: str) -> None:
    done = serve(
        ["--port", str(free_port())], {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    )
    line = assert_one_line_failure(done, "DATABASE_URL")
    assert "Connection refused" in line or "connect" in line


def test_a_redis_that_does_not_answer_is_one_line() -> None:
    done = serve(["--port", str(free_port())], {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    line = assert_one_line_failure(done, "REDIS_URL")
    assert "Connection refused" in line


def test_ready_is_printed_once_the_port_accepts_connections() -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
        cwd=ROOT,
        env=serve_env({}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.startswith(f"chatgw is ready: open http://127.0.0.1:{port}/"), first
            # Printed after the bind: the very first attempt connects.
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            key_line = process.stdout.readline()
            assert key_line.startswith("demo admin API key (random for this process;"), key_line
        finally:
            process.terminate()
            process.wait(15)
