"""Migrations: up, down all, up again gives a working schema; runners started together do not race."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from core.errors import Unavailable
from core.types import StageName
from gateway.backends.postgres_store import PostgresStore
from gateway.demo import DEMO_BUSINESS
from gateway.migrate import MigrationError, Migrator, load_migrations
from tests.databases import create_database, drop_database
from tests.servers import ROOT


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    url = await create_database("chatgw_migrations")
    yield url
    await drop_database(url)


async def tables(url: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


async def test_up_down_all_and_up_again_leaves_a_working_schema(empty_database: str) -> None:
    migrator = Migrator(empty_database)
    applied = await migrator.up()
    assert [m.version for m in applied] == [m.version for m in load_migrations()]
    expected = {
        "businesses",
        "agents",
        "end_users",
        "conversations",
        "messages",
        "stages",
        "stage_transitions",
        "templates",
        "extraction_rules",
        "audit_logs",
        "gateway_settings",
        "schema_migrations",
    }
    assert await tables(empty_database) == expected
    assert all(state.applied_at is not None for state in await migrator.status())
    assert await migrator.up() == []

    undone = await migrator.down(None)
    assert [m.version for m in undone] == sorted((m.version for m in applied), reverse=True)
    assert await tables(empty_database) == {"schema_migrations"}
    assert all(state.applied_at is None for state in await migrator.status())

    await migrator.up()
    store = PostgresStore(empty_database, pool_size=2)
    await store.connect()
    try:
        business = await store.ensure_business(DEMO_BUSINESS)
        user = await store.create_end_user(business.business_id, None)
        conv = await store.create_conversation(business.business_id, user, StageName("default"))
        message, created = await store.add_user_message(business.business_id, conv.conversation_id, "m", "hi")
        assert created
        assert message.text == "hi"
    finally:
        await store.close()


async def schema(url: str) -> set[tuple[str, ...]]:
    """Every column (with its type, nullability and default), index and constraint of the public
    schema, as comparable rows."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, '')"
            " FROM information_schema.columns WHERE table_schema = 'public'"
        )
        indexes = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'")
        constraints = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(c.oid) FROM pg_constraint c"
            " JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = 'public'"
        )
    finally:
        await conn.close()
    return (
        {("column", *map(str, r)) for r in columns}
        | {("index", *map(str, r)) for r in indexes}
        | {("constraint", *map(str, r)) for r in constraints}
    )


async def test_each_down_undoes_its_up(empty_database: str) -> None:
    """Every migration's down leaves the schema exactly as it was before its up."""
    migrator = Migrator(empty_database)
    await migrator.up(0)  # creates schema_migrations only
    for migration in load_migrations():
        before = await schema(empty_database)
        assert [m.version for m in await migrator.up(1)] == [migration.version]
        assert await schema(empty_database) != before, f"{migration.name} changed nothing"
        assert [m.version for m in await migrator.down(1)] == [migration.version]
        assert await schema(empty_database) == before, f"{migration.name}'s down left changes behind"
        await migrator.up(1)


async def test_agents_migration_adds_what_agents_need(empty_database: str) -> None:
    """0003: agents can be disabled, audit records name a conversation, and the agent console's
    and the audit API's queries have their indexes."""
    await Migrator(empty_database).up()
    rows = await schema(empty_database)
    columns = {(r[1], r[2]) for r in rows if r[0] == "column"}
    assert {("agents", "disabled"), ("audit_logs", "conversation_id")} <= columns
    indexes = {r[1] for r in rows if r[0] == "index"}
    assert {
        "conversations_business_updated",
        "audit_logs_business_conversation",
        "audit_logs_business_actor",
        "audit_logs_business_action",
        "agents_business_created",
    } <= indexes


async def test_the_guide_indexes_exist(empty_database: str) -> None:
    await Migrator(empty_database).up()
    conn = await asyncpg.connect(empty_database)
    try:
        names = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        }
    finally:
        await conn.close()
    assert {"idx_stage_transitions_business", "idx_audit_logs_business", "idx_audit_logs_user"} <= names


async def test_runners_started_together_apply_each_migration_once(empty_database: str) -> None:
    results = await asyncio.gather(*(Migrator(empty_database).up() for _ in range(4)))
    applied = [m.version for result in results for m in result]
    assert sorted(applied) == [m.version for m in load_migrations()]


async def test_a_store_on_an_unmigrated_database_says_what_to_do(empty_database: str) -> None:
    store = PostgresStore(empty_database)
    with pytest.raises(Unavailable, match="run 'chatgw migrate up'"):
        await store.connect()


def test_migration_files_need_both_directions(tmp_path: Path) -> None:
    (tmp_path / "0001_first.up.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"has no down\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "0001_first.down.sql").write_text("SELECT 1;")
    (tmp_path / "notes.sql").write_text("")
    with pytest.raises(MigrationError, match="expected NNNN_name"):
        load_migrations(tmp_path)


def chatgw(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_migrate_command(empty_database: str) -> None:
    """chatgw migrate up | status | down all, as an operator runs it."""
    up = chatgw(empty_database, "up")
    assert up.returncode == 0, up.stderr
    assert "applied 0001 initial" in up.stdout
    status = chatgw(empty_database, "status")
    assert status.returncode == 0
    assert "0001 initial" in status.stdout
    assert "pending" not in status.stdout
    assert "nothing to do" in chatgw(empty_database, "up").stdout
    down = chatgw(empty_database, "down", "all")
    assert down.returncode == 0, down.stderr
    assert "undid 0001 initial" in down.stdout
    assert "pending" in chatgw(empty_database, "status").stdout
    bad = chatgw(empty_database, "down", "zero")
    assert bad.returncode == 2
    assert "expected a number" in bad.stderr
    no_url = subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", "status"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_url.returncode == 2
    assert "DATABASE_URL is not set" in no_url.stderr
