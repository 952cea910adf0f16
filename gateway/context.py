"""The objects one gateway process shares between its sessions and HTTP handlers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.broker import Broker
from core.conversation import ConversationService
from core.llm import LLMProvider
from core.store import Store
from gateway.auth import TokenIssuer
from gateway.backends import Check
from gateway.hub import Hub
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.presence import Presence
from gateway.settings import Settings


@dataclass(slots=True)
class Gateway:
    """Everything one process shares. `sessions` holds the open sockets' sessions (for the drain)."""

    settings: Settings
    store: Store
    broker: Broker
    llm: LLMProvider
    conversations: ConversationService
    hub: Hub
    tokens: TokenIssuer
    metrics: Metrics
    presence: Presence
    checks: dict[str, tuple[str, Check]]
    """Dependency name -> (backend name, readiness check), for /readyz and the start log."""
    limits: Limiter
    sessions: set[Any] = field(default_factory=set)
    draining: bool = False
    demo_api_key: str = ""
    """The demo business's admin API key, as every instance on the store shares it (set at start)."""
