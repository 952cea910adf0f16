"""The agent console's and the audit API's queries are served by their indexes on a database with
many businesses (PostgreSQL's own plans, on analysed tables), so their cost follows the page asked
for, not the size of the tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from core.types import AgentId, BusinessId, ConversationId
from gateway.backends.postgres_store import OPEN_CONVERSATIONS_SQL, audit_query
from gateway.migrate import Migrator
from tests.databases import create_database, drop_database, sync

BUSINESSES = 4
ROWS_EACH = 2000


@pytest.fixture(scope="module")
def populated() -> Iterator[tuple[str, BusinessId]]:
    """A migrated database with BUSINESSES businesses of ROWS_EACH conversations (three sequenced
    messages each) and audit records; one of the businesses."""
    url = sync(create_database("chatgw_plans"))
    try:
        business_ids = [uuid.uuid4() for _ in range(BUSINESSES)]
        sync(_fill(url, business_ids))
        yield url, BusinessId(str(business_ids[0]))
    finally:
        sync(drop_database(url))


async def _fill(url: str, business_ids: list[uuid.UUID]) -> None:
    await Migrator(url).up()
    conn = await asyncpg.connect(url)
    try:
        for bid in business_ids:
            await _populate(conn, bid)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _populate(conn: asyncpg.Connection, bid: uuid.UUID) -> None:
    user = uuid.uuid4()
    await conn.execute(
        "INSERT INTO businesses (business_id, public_id, name) VALUES ($1, $2, 'b')", bid, str(bid)
    )
    await conn.execute("INSERT INTO end_users (end_user_id, business_id) VALUES ($1, $2)", user, bid)
    await conn.execute(
        "INSERT INTO conversations (conversation_id, business_id, end_user_id, current_stage, updated_at)"
        " SELECT gen_random_uuid(), $1, $2, 'default', now() - g * interval '1 second'"
        " FROM generate_series(1, $3) AS g",
        bid,
        user,
        ROWS_EACH,
    )
    await conn.execute(
        "INSERT INTO messages (message_id, business_id, conversation_id, role, text, seq)"
        " SELECT gen_random_uuid(), business_id, conversation_id, 'user', 'hi', s"
        " FROM conversations, generate_series(1, 3) AS s WHERE business_id = $1",
        bid,
    )
    await conn.execute(
        "INSERT INTO audit_logs (log_id, business_id, actor_type, action_type, user_id, conversation_id,"
        " created_at) SELECT gen_random_uuid(), $1, 'agent', 'action.' || (g % 20),"
        " CASE WHEN g % 2 = 0 THEN gen_random_uuid() END, CASE WHEN g % 3 = 0 THEN gen_random_uuid() END,"
        " now() - g * interval '1 second' FROM generate_series(1, $2) AS g",
        bid,
        ROWS_EACH,
    )


async def plan(url: str, sql: str, *args: object) -> str:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"EXPLAIN {sql}", *args)
    finally:
        await conn.close()
    return "\n".join(r[0] for r in rows)


async def test_open_conversations_use_the_activity_index(populated: tuple[str, BusinessId]) -> None:
    url, bid = populated
    text = await plan(url, OPEN_CONVERSATIONS_SQL, uuid.UUID(bid), timedelta(minutes=10), 100)
    assert "conversations_business_updated" in text, text
    assert "messages_conversation_id_seq_key" in text, text
    assert "Seq Scan" not in text, text


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        ({}, "idx_audit_logs_business"),
        ({"conversation_id": ConversationId(str(uuid.uuid4()))}, "audit_logs_business_conversation"),
        ({"actor_id": AgentId(str(uuid.uuid4()))}, "audit_logs_business_actor"),
        ({"action_type": "action.7"}, "audit_logs_business_action"),
        ({"before": f"{datetime.now(UTC).isoformat()}|{uuid.uuid4()}"}, "idx_audit_logs_business"),
    ],
)
async def test_each_audit_filter_uses_its_index(
    populated: tuple[str, BusinessId], filters: dict[str, str], index: str
) -> None:
    url, bid = populated
    query = audit_query(bid, limit=51, **filters)  # type: ignore[arg-type]
    assert query is not None
    sql, args = query
    text = await plan(url, sql, *args)
    assert index in text, text
    assert "Seq Scan" not in text, text
