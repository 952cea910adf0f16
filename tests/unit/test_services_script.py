"""scripts/services.py, against the real PostgreSQL and Redis of this machine.

The servers the test suite itself uses are TEST_DATABASE_URL / TEST_REDIS_URL when set (scripts/test
exports them), else the script's defaults. Throwaway servers the script starts here are stopped again.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "services.py"
EXPORT = re.compile(r"^export (TEST_DATABASE_URL|TEST_REDIS_URL|TEST_CHROMIUM)='([^']*)'$")
STARTED = re.compile(r"^chatgw-services: started (postgresql|redis) port=(\d+) dir=(.+)$", re.MULTILINE)
SCRUBBED = ("TEST_DATABASE_URL", "TEST_REDIS_URL", "TEST_CHROMIUM")

RunScript = Callable[[Mapping[str, str]], subprocess.CompletedProcess[str]]


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chatgw_services_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


services = _load_script()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def suite_database_url() -> str:
    return os.environ.get("TEST_DATABASE_URL") or str(services.DEFAULT_DATABASE_URL)


def suite_redis_url() -> str:
    return os.environ.get("TEST_REDIS_URL") or str(services.DEFAULT_REDIS_URL)


def stop_started_servers(stderr: str) -> None:
    """Stop every throwaway server announced in the script's stderr and remove its files."""
    for kind, port, directory in STARTED.findall(stderr):
        try:
            if kind == "postgresql":
                services.stop_postgres(Path(directory))
            else:
                services.stop_redis(f"redis://127.0.0.1:{port}/0")
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def exported(stdout: str) -> dict[str, str]:
    """The three export lines of stdout as a dict; fails unless stdout is exactly those three lines."""
    lines = stdout.splitlines()
    assert len(lines) == 3, stdout
    matches = [EXPORT.match(line) for line in lines]
    urls = {m.group(1): m.group(2) for m in matches if m is not None}
    assert list(urls) == ["TEST_DATABASE_URL", "TEST_REDIS_URL", "TEST_CHROMIUM"], stdout
    assert stdout == "".join(f"export {name}='{url}'\n" for name, url in urls.items())
    return urls


@pytest.fixture
def run_script() -> Iterator[RunScript]:
    """Run the script with TEST_* scrubbed from the environment plus the given variables."""
    results: list[subprocess.CompletedProcess[str]] = []

    def run(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
        full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        full_env.update(env)
        result = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=50,
            check=False,
        )
        results.append(result)
        return result

    yield run
    for result in results:
        stop_started_servers(result.stderr)


def test_answer_checks_see_the_running_servers() -> None:
    assert services.postgres_answers(suite_database_url())
    assert services.redis_answers(suite_redis_url())


def test_answer_checks_fail_on_a_closed_port() -> None:
    port = free_port()
    assert not services.postgres_answers(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert not services.redis_answers(f"redis://127.0.0.1:{port}/0")


def test_the_postgres_fallback_check_without_psql() -> None:
    """Without psql the script sends an SSLRequest: only a PostgreSQL server replies S or N."""
    assert services._pg_socket_problem(suite_database_url(), 3.0) is None
    closed = services._pg_socket_problem(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", 3.0)
    assert "ConnectionRefusedError" in str(closed)
    # Redis waits for the rest of what it takes for a command, so this one ends in a timeout.
    redis_port = urlsplit(suite_redis_url()).port or 6379
    assert (
        services._pg_socket_problem(f"postgresql://postgres@127.0.0.1:{redis_port}/postgres", 0.5) is not None
    )


def test_redis_check_reports_a_refused_auth() -> None:
    """A password the server does not accept is a failure, with the server's reply in the reason."""
    parts = urlsplit(suite_redis_url())
    wrong = f"redis://:not-the-password@{parts.hostname}:{parts.port or 6379}/0"
    assert "AUTH got -" in str(services.redis_problem(wrong))


def test_exports_survive_shell_quoting() -> None:
    value = "redis://:it's $HOME `x`@127.0.0.1:6379/0"
    line = services.shell_export("TEST_REDIS_URL", value)
    result = subprocess.run(
        ["bash", "-c", f'{line}\nprintf %s "$TEST_REDIS_URL"'], capture_output=True, text=True, check=True
    )
    assert result.stdout == value


def test_default_environment_prints_exports_that_answer(run_script: RunScript) -> None:
    result = run_script({})
    assert result.returncode == 0, result.stderr
    urls = exported(result.stdout)
    assert services.postgres_answers(urls["TEST_DATABASE_URL"])
    assert services.redis_answers(urls["TEST_REDIS_URL"])
    assert os.access(urls["TEST_CHROMIUM"], os.X_OK)
    if not STARTED.search(result.stderr):  # the defaults answered: they are what is printed
        assert urls == {
            "TEST_DATABASE_URL": services.DEFAULT_DATABASE_URL,
            "TEST_REDIS_URL": services.DEFAULT_REDIS_URL,
            "TEST_CHROMIUM": services.DEFAULT_CHROMIUM,
        }
        assert "PostgreSQL: using" in result.stderr
        assert "Redis: using" in result.stderr


def test_eval_in_a_shell_sets_the_variables() -> None:
    given = {"TEST_DATABASE_URL": suite_database_url(), "TEST_REDIS_URL": suite_redis_url()}
    shell = 'set -e; eval "$("$0" "$1")"; printf "%s\\n%s\\n" "$TEST_DATABASE_URL" "$TEST_REDIS_URL"'
    result = subprocess.run(
        ["bash", "-c", shell, sys.executable, str(SCRIPT)],
        env={**os.environ, **given},
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    stop_started_servers(result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [given["TEST_DATABASE_URL"], given["TEST_REDIS_URL"]]


def test_closed_ports_start_throwaway_servers(run_script: RunScript) -> None:
    closed_pg, closed_redis = free_port(), free_port()
    result = run_script(
        {
            "TEST_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{closed_pg}/postgres",
            "TEST_REDIS_URL": f"redis://127.0.0.1:{closed_redis}/0",
        }
    )
    assert result.returncode == 0, result.stderr
    urls = exported(result.stdout)
    started = {kind: (int(port), Path(directory)) for kind, port, directory in STARTED.findall(result.stderr)}
    assert set(started) == {"postgresql", "redis"}, result.stderr
    pg_port, pg_dir = started["postgresql"]
    redis_port, redis_dir = started["redis"]
    assert urls == {
        "TEST_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{pg_port}/postgres",
        "TEST_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "TEST_CHROMIUM": services.DEFAULT_CHROMIUM,
    }
    assert services.postgres_answers(urls["TEST_DATABASE_URL"])
    assert services.redis_answers(urls["TEST_REDIS_URL"])
    assert (pg_dir / "data" / "PG_VERSION").is_file()
    assert (redis_dir / "redis.log").is_file()
    if os.geteuid() == 0:  # PostgreSQL refuses root: the cluster belongs to the postgres OS user
        assert (pg_dir / "data").stat().st_uid == pwd.getpwnam("postgres").pw_uid


def test_missing_everything_fails_naming_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    monkeypatch.setenv("TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/postgres")
    monkeypatch.setenv("TEST_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setattr(services, "find_postgres_binaries", lambda: None)
    monkeypatch.setattr(services, "find_redis_server", lambda: None)
    monkeypatch.setattr(services, "can_apt_install", lambda: False)
    assert services.main([]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert f"PostgreSQL is not reachable at postgresql://postgres@127.0.0.1:{port}/postgres" in err
    assert "no initdb/pg_ctl binaries were found" in err
    assert "install the Debian package postgresql or set TEST_DATABASE_URL" in err
    assert f"Redis is not reachable at redis://127.0.0.1:{port}/0" in err
    assert "install the Debian package redis-server or set TEST_REDIS_URL" in err


def test_passwords_stay_out_of_messages() -> None:
    assert services.redact("redis://user:s3cret@127.0.0.1:6379/0") == "redis://user:***@127.0.0.1:6379/0"
    assert services.redact(services.DEFAULT_DATABASE_URL) == services.DEFAULT_DATABASE_URL


def test_a_missing_chromium_fails_saying_what_to_install(tmp_path: Path) -> None:
    """A Chromium that is not there is an error naming the Debian package, never a skip."""
    with pytest.raises(services.ServiceError, match="install the Debian package chromium"):
        services.ensure_chromium(str(tmp_path / "no-chromium"))
