from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.servers import GatewayProcess, start_gateway


@pytest.fixture(scope="session")
def gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateway processes with extra environment; all are stopped at the end of the run."""
    started: list[GatewayProcess] = []
    log_dir = tmp_path_factory.mktemp("gateways")

    def start(env: Mapping[str, str] | None = None) -> GatewayProcess:
        gw = start_gateway(log_dir, env)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent.name == "e2e":
            item.add_marker(pytest.mark.e2e)
