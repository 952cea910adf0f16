"""`python -m tests.fuzz.launcher serve --host H --port P`: the gateway exactly as `chatgw serve` runs
it, with a business of the fuzz tests' own beside the demo one, so that fuzzing the admin API
changes no flow another test relies on (on PostgreSQL the test run's database is shared)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from core.models import Business
from core.types import BusinessId
from gateway.app import create_app
from gateway.auth import hash_api_key
from gateway.cli import uvicorn_config
from gateway.drain import DrainingServer
from gateway.logs import configure_logging
from gateway.settings import Settings

FUZZ_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-0000000000f2"),
    public_id="fuzz-shop",
    name="Fuzz Shop",
)
FUZZ_API_KEY = "fuzz-shop-admin-key-for-the-fuzz-tests"


def with_fuzz_business(app: Starlette) -> Starlette:
    startup = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with startup(app):
            gw = app.state.gateway
            business = await gw.store.ensure_business(FUZZ_BUSINESS)
            await gw.store.set_api_key(business.business_id, hash_api_key(FUZZ_API_KEY))
            yield

    app.router.lifespan_context = lifespan
    return app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tests.fuzz.launcher")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    app = with_fuzz_business(create_app(settings))
    server = DrainingServer(uvicorn_config(app, settings, host=args.host, port=args.port), app.state.gateway)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
