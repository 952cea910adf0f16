"""Schema migrations: numbered SQL files with an up and a down each, applied under an advisory lock.

`migrations/NNNN_name.up.sql` and `migrations/NNNN_name.down.sql`. Each migration runs in its own
transaction together with its row in `schema_migrations`, so a failed migration leaves nothing
behind. A PostgreSQL advisory lock serialises runners, so that instances starting together do not
race: the second waits, then finds nothing left to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from core.errors import Unavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# pg_advisory_lock key: "chatgw" in ASCII, as a 64-bit integer.
LOCK_KEY = int.from_bytes(b"chatgw", "big")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.(up|down)\.sql$")


class MigrationError(Exception):
    """The migration files or the database's migration history are inconsistent."""


class SchemaOutOfDate(Unavailable):
    """The database's schema is older than this gateway needs: `chatgw migrate up` fixes it."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    up_sql: str
    down_sql: str


@dataclass(frozen=True, slots=True)
class MigrationState:
    version: int
    name: str
    applied_at: datetime | None  # None: not applied


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in `directory`, by version; every up needs its down."""
    parts: dict[int, dict[str, str]] = {}
    names: dict[int, str] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: expected NNNN_name.up.sql or NNNN_name.down.sql")
        version, name, direction = int(match[1]), match[2], match[3]
        if names.setdefault(version, name) != name:
            raise MigrationError(f"version {version:04d} has two names: {names[version]} and {name}")
        parts.setdefault(version, {})[direction] = path.read_text()
    migrations = []
    for version in sorted(parts):
        missing = {"up", "down"} - parts[version].keys()
        if missing:
            raise MigrationError(f"{version:04d}_{names[version]} has no {missing.pop()}.sql")
        migrations.append(Migration(version, names[version], parts[version]["up"], parts[version]["down"]))
    return migrations


class Migrator:
    def __init__(self, dsn: str, *, directory: Path = MIGRATIONS_DIR) -> None:
        self.dsn = dsn
        self.migrations = load_migrations(directory)

    @property
    def latest(self) -> int:
        return self.migrations[-1].version if self.migrations else 0

    async def up(self, steps: int | None = None) -> list[Migration]:
        """Apply pending migrations in order (at most `steps`); return what was applied."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            try:
                applied = await self._applied(conn)
                pending = [m for m in self.migrations if m.version not in applied]
                done = []
                for migration in pending[:steps]:
                    async with conn.transaction():
                        await conn.execute(migration.up_sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            migration.version,
                            migration.name,
                        )
                    done.append(migration)
                return done
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        finally:
            await conn.close()

    async def down(self, steps: int | None = 1) -> list[Migration]:
        """Undo the latest applied migrations (`steps` of them; None: all); return what was undone."""
        by_version = {m.version: m for m in self.migrations}
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
            try:
                applied = sorted(await self._applied(conn), reverse=True)[:steps]
                done = []
                for version in applied:
                    migration = by_version.get(version)
                    if migration is None:
                        raise MigrationError(f"version {version:04d} is applied but its files are missing")
                    async with conn.transaction():
                        await conn.execute(migration.down_sql)
                        await conn.execute("DELETE FROM schema_migrations WHERE version = $1", version)
                    done.append(migration)
                return done
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
        finally:
            await conn.close()

    async def status(self) -> list[MigrationState]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT version, name, applied_at FROM schema_migrations"
                if await _has_table(conn)
                else "SELECT NULL::int AS version, NULL AS name, NULL::timestamptz AS applied_at WHERE false"
            )
        finally:
            await conn.close()
        applied = {r["version"]: (r["name"], r["applied_at"]) for r in rows}
        states = [
            MigrationState(m.version, m.name, applied.get(m.version, (None, None))[1])
            for m in self.migrations
        ]
        known = {m.version for m in self.migrations}
        states += [
            MigrationState(v, f"{name} (files missing)", at)
            for v, (name, at) in applied.items()
            if v not in known
        ]
        return sorted(states, key=lambda s: s.version)

    async def _applied(self, conn: asyncpg.Connection) -> set[int]:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        return {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}


async def _has_table(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"))


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest applied migration version (0 when none)."""
    if not await _has_table(conn):
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))
