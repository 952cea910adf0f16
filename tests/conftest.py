from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.databases import delete_redis_keys, drop_database, migrated_database, redis_url, sync
from tests.servers import GatewayProcess, load_services, start_gateway


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated PostgreSQL database of this test run's own, dropped at the end."""
    url = sync(migrated_database())
    yield url
    sync(drop_database(url))


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A Redis key prefix of this test run's own; its keys are deleted at the end."""
    prefix = f"chatgw-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    delete_redis_keys(prefix)


@pytest.fixture(scope="session", params=["memory", "postgres+redis"])
def backend_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that selects the backends every end-to-end test runs against: the embedded
    default, then PostgreSQL with the Redis state cache."""
    if request.param == "memory":
        return {}
    return {
        "DATABASE_URL": request.getfixturevalue("database_url"),
        "REDIS_URL": redis_url(),
        "CHATGW_REDIS_PREFIX": request.getfixturevalue("redis_prefix"),
    }


@pytest.fixture(scope="session")
def gateway_factory(
    tmp_path_factory: pytest.TempPathFactory, backend_env: dict[str, str]
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateway processes on the selected backends, with extra environment; all are stopped at
    the end of the run."""
    started: list[GatewayProcess] = []
    log_dir = tmp_path_factory.mktemp("gateways")

    def start(env: Mapping[str, str] | None = None, *, module: str = "gateway") -> GatewayProcess:
        gw = start_gateway(log_dir, {**backend_env, **(env or {})}, module=module)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A fast gateway: short answers streamed at 400 pieces a second."""
    return gateway_factory()


@pytest.fixture(scope="session")
def slow_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A gateway whose answers stream for several seconds, with a short hello deadline."""
    return gateway_factory(
        {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "240", "CHATGW_HELLO_TIMEOUT_S": "1"}
    )


@pytest.fixture(scope="session")
def tenant_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """A gateway serving two businesses: the demo one and `tests.tenant_gateway.OTHER_BUSINESS`."""
    return gateway_factory(module="tests.tenant_gateway")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent.name == "e2e":
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def services() -> Any:
    """scripts/services.py as a module: finding, starting and stopping PostgreSQL and Redis."""
    return load_services()


@pytest.fixture
def own_redis(services: Any) -> Iterator[str]:
    """A throwaway Redis server of this test's own (its configuration is changed freely, it may
    be stopped and started with `services`); its URL."""
    binary = services.find_redis_server()
    assert binary is not None, "redis-server is needed for this test (scripts/test installs it)"
    url: str = services.start_redis(binary)
    yield url
    if services.redis_answers(url):
        services.stop_redis(url)
