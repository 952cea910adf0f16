"""`python -m tests.tenant_gateway serve --host H --port P`: the gateway exactly as `chatgw serve`
runs it, with two more businesses beside the demo one, for tests of isolation between businesses
and of a business's access settings.

The gateway only ever seeds the demo business; on the embedded default a test has no other way
into the process's memory, so this process seeds the second business itself, once the gateway's
own start-up is done and before it serves (on PostgreSQL the seed is idempotent).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from core.models import Business
from core.types import BusinessId
from gateway.app import create_app
from gateway.auth import hash_api_key
from gateway.cli import uvicorn_config
from gateway.context import Gateway
from gateway.drain import DrainingServer
from gateway.logs import configure_logging
from gateway.settings import Settings

OTHER_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-0000000000b2"),
    public_id="other-shop",
    name="Another Shop",
)
OTHER_API_KEY = "other-shop-admin-key-for-the-e2e-suite"
THIRD_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-0000000000b3"),
    public_id="third-shop",
    name="A Third Shop",
)
THIRD_API_KEY = "third-shop-admin-key-for-the-e2e-suite"
"""A business for tests that change its access settings (the others stay as seeded)."""
ROTATING_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-0000000000b4"),
    public_id="rotating-shop",
    name="A Shop Rotating Its Key",
)
ROTATING_API_KEY = "rotating-shop-admin-key-for-the-e2e-suite"
"""A business whose admin key a test rotates away: its key is set again at each start, so the
test runs on a gateway process of its own."""
SEEDED = (
    (OTHER_BUSINESS, OTHER_API_KEY),
    (THIRD_BUSINESS, THIRD_API_KEY),
    (ROTATING_BUSINESS, ROTATING_API_KEY),
)


async def seed_other_business(gw: Gateway) -> None:
    for business, key in SEEDED:
        stored = await gw.store.ensure_business(business)
        await gw.store.set_api_key(stored.business_id, hash_api_key(key))


def with_seed(app: Starlette, seed: Callable[[Gateway], Awaitable[None]]) -> Starlette:
    """`app`, whose start-up also runs `seed` once the gateway's own start-up is done."""
    startup = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with startup(app):
            await seed(app.state.gateway)
            yield

    app.router.lifespan_context = lifespan
    return app


def serve_seeded(argv: list[str], prog: str, seed: Callable[[Gateway], Awaitable[None]]) -> int:
    """`prog serve --host H --port P`: the gateway as `chatgw serve` runs it, seeded by `seed`."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    app = with_seed(create_app(settings), seed)
    server = DrainingServer(uvicorn_config(app, settings, host=args.host, port=args.port), app.state.gateway)
    server.run()
    return 0 if server.started else 1


def main(argv: list[str]) -> int:
    return serve_seeded(argv, "tests.tenant_gateway", seed_other_business)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
