"""A non-editable install of the package serves the web faces: the package is built and installed
into a folder of its own (pip, no network), and a gateway started from there serves the installed
files, not the checkout's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ROOT, GatewayProcess, start_gateway

FACES = {
    "/widget.js": "widget.js",
    "/demo/": "demo/index.html",
    "/demo/demo.css": "demo/demo.css",
    "/console/": "console/index.html",
    "/console/console.js": "console/console.js",
    "/console/flow.js": "console/flow.js",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from a copy of the sources and installed with `pip install --target`."""
    base = tmp_path_factory.mktemp("installed")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("core", "gateway"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = base / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return target


@pytest.fixture(scope="module")
def installed_gateway(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    run_dir = tmp_path_factory.mktemp("run")  # not the checkout: `-m gateway` must not find it there
    gw = start_gateway(run_dir, {"PYTHONPATH": str(installed)}, cwd=run_dir)
    yield gw
    gw.stop()


def test_the_install_holds_the_web_files(installed: Path) -> None:
    for name in FACES.values():
        assert (installed / "gateway" / "web" / name).read_bytes() == (
            ROOT / "gateway" / "web" / name
        ).read_bytes()


def test_a_gateway_run_from_the_install_serves_them(
    installed: Path, installed_gateway: GatewayProcess
) -> None:
    where = subprocess.run(
        [sys.executable, "-c", "import gateway.static as s; print(s.web_files())"],
        env=installed_gateway.env, cwd=installed, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(where.stdout.strip()) == installed / "gateway" / "web"
    for path, name in FACES.items():
        r = httpx.get(installed_gateway.http + path, timeout=10)
        assert r.status_code == 200, path
        assert r.content == (installed / "gateway" / "web" / name).read_bytes()
    root = httpx.get(installed_gateway.http + "/", timeout=10)
    assert root.status_code == 307
    assert root.headers["location"] == "/demo/"
