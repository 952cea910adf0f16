"""`python -m tests.fuzz.launcher serve --host H --port P`: the gateway exactly as `chatgw serve` runs
it, with a business of the fuzz tests' own beside the demo one, so that fuzzing the admin API
changes no flow another test relies on (on PostgreSQL the test run's database is shared)."""

from __future__ import annotations

import sys

from core.models import Business
from core.types import BusinessId
from gateway.auth import hash_api_key
from gateway.context import Gateway
from tests.tenant_gateway import serve_seeded

FUZZ_BUSINESS = Business(
    business_id=BusinessId("00000000-0000-4000-8000-0000000000f2"),
    public_id="fuzz-shop",
    name="Fuzz Shop",
)
FUZZ_API_KEY = "fuzz-shop-admin-key-for-the-fuzz-tests"


async def seed_fuzz_business(gw: Gateway) -> None:
    business = await gw.store.ensure_business(FUZZ_BUSINESS)
    await gw.store.set_api_key(business.business_id, hash_api_key(FUZZ_API_KEY))


def main(argv: list[str]) -> int:
    return serve_seeded(argv, "tests.fuzz.launcher", seed_fuzz_business)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
