"""Browser tests: Playwright for Python driving the system's Chromium against real gateway processes.

No test tool downloads a browser: Chromium is the Debian package (scripts/test installs it when it is
missing and exports its path as TEST_CHROMIUM). Screenshots of each step are kept under
`test-artifacts/screenshots/<test>/` (ignored by git; CHATGW_TEST_ARTIFACTS moves it).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from tests.multi import conftest as multi
from tests.servers import ROOT, GatewayProcess, start_gateway

# The flags this machine's Chromium needs headless: no sandbox as root, and nothing that calls home
# (the network is closed, and each refused connection costs time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEFAULT_CHROMIUM = "/usr/bin/chromium"


def artifacts_dir() -> Path:
    return Path(os.environ.get("CHATGW_TEST_ARTIFACTS") or ROOT / "test-artifacts")


class Screenshots:
    """Numbered screenshots of a test's steps: 01-opened.png, 02-streaming.png, ..."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def take(self, page: Page, step: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{step}.png"
        page.screenshot(path=str(path))
        return path


@pytest.fixture
def shots(request: pytest.FixtureRequest) -> Screenshots:
    folder = artifacts_dir() / "screenshots" / re.sub(r"[^\w.-]+", "_", request.node.name).strip("_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return Screenshots(folder)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (the sync Playwright loop is closed before other
    modules' asyncio tests run)."""
    path = os.environ.get("TEST_CHROMIUM") or DEFAULT_CHROMIUM
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"Chromium is not installed at {path}: run the tests with scripts/test (it installs the Debian "
            "package chromium) or set TEST_CHROMIUM to a Chromium executable"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def new_context(browser: Browser) -> Iterator[Callable[..., BrowserContext]]:
    """Fresh browser contexts (own storage, like separate browsers); closed after the test."""
    contexts: list[BrowserContext] = []

    def make(**options: object) -> BrowserContext:
        context = browser.new_context(**options)  # type: ignore[arg-type]
        context.set_default_timeout(20_000)
        contexts.append(context)
        return context

    yield make
    for context in contexts:
        context.close()


@pytest.fixture(scope="session")
def web_gateway(gateway_factory: Callable[..., GatewayProcess]) -> GatewayProcess:
    """On each backend, a gateway whose answers stream for about three seconds (60 pieces at 20 a
    second): slow enough to watch them grow, reload in the middle of one, or cut the network under it."""
    return gateway_factory(SLOW)


@pytest.fixture(scope="session")
def page_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """On the embedded default only, for what the page does whatever the backend: answers of
    about 1.5 s (60 pieces at 40 a second)."""
    gw = start_gateway(tmp_path_factory.mktemp("page-gateway"), QUICKER)
    yield gw
    gw.stop()


SLOW = {"CHATGW_SCRIPTED_TPS": "20", "CHATGW_SCRIPTED_TOKENS": "60"}
QUICKER = {"CHATGW_SCRIPTED_TPS": "40", "CHATGW_SCRIPTED_TOKENS": "60"}


# Several gateway processes on one PostgreSQL database and one Redis (the console across instances).
cluster = multi.cluster
