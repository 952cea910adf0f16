"""core/ stays free of the edges: no ASGI, sockets, Redis, database drivers or gateway imports."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"
FORBIDDEN = {
    "starlette",
    "uvicorn",
    "websockets",
    "wsproto",
    "h11",
    "socket",
    "redis",
    "asyncpg",
    "prometheus_client",
    "httpx",
    "gateway",
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_imports_nothing_from_the_edges() -> None:
    files = sorted(CORE.rglob("*.py"))
    assert files, "core/ has no modules"
    offenders = {
        str(f.relative_to(CORE)): sorted(imported_roots(f) & FORBIDDEN)
        for f in files
        if imported_roots(f) & FORBIDDEN
    }
    assert offenders == {}


def test_the_layering_check_sees_imports(tmp_path: Path) -> None:
    """The check itself finds both import forms (so the test above can fail)."""
    sample = tmp_path / "sample.py"
    sample.write_text("import redis.asyncio\nfrom starlette.websockets import WebSocket\nfrom . import x\n")
    assert imported_roots(sample) == {"redis", "starlette"}
