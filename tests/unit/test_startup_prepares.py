"""What the gateway prepares while it starts, so that the first message does not wait for it."""

from __future__ import annotations

from core import conditions
from core.flow_models import FlowContext
from gateway.app import create_app
from gateway.settings import Settings


async def test_startup_builds_the_condition_environment() -> None:
    """The CEL environment (its grammar's parser) is built during startup, not when the first
    message's stage selection compiles a condition; the first condition then uses it."""
    conditions._environment.cache_clear()
    app = create_app(Settings.from_env({}))
    async with app.router.lifespan_context(app):
        assert conditions._environment.cache_info().currsize == 1
        condition = conditions.compile_condition("turns > 1 && stage == 'greeting'")
        assert condition.evaluate(FlowContext(message="hi", stage="greeting", turns=2))
    assert conditions._environment.cache_info().misses == 1  # built once, at startup
