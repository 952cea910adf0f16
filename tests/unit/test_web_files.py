"""The web faces are package data: found through importlib.resources, and every file of them is
named by the package-data globs in pyproject.toml (a file the globs miss would be left out of an
installed package)."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from gateway.static import web_files
from tests.servers import ROOT

FACES = [
    "widget.js",
    "demo/index.html",
    "demo/demo.css",
    "demo/demo.js",
    "console/index.html",
    "console/console.css",
    "console/console.js",
    "console/pane.js",
    "console/flow.js",
    "console/link.js",
    "console/dom.js",
]


def test_the_web_faces_are_found_through_importlib_resources() -> None:
    folder = web_files()
    for name in FACES:
        resource = folder.joinpath(*name.split("/"))
        assert resource.is_file(), name
        assert resource.read_bytes() == (ROOT / "gateway" / "web" / name).read_bytes()


def test_every_web_file_is_named_by_the_package_data_globs() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs: list[str] = config["tool"]["setuptools"]["package-data"]["gateway"]
    package = ROOT / "gateway"
    files = [p.relative_to(package).as_posix() for p in (package / "web").rglob("*") if p.is_file()]
    assert {f"web/{name}" for name in FACES} <= set(files)
    missed = [f for f in files if not any(fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert missed == [], f"add globs for these to [tool.setuptools.package-data]: {missed}"


def test_the_sample_page_embeds_the_widget_with_one_tag() -> None:
    page = (Path(str(web_files())) / "demo" / "index.html").read_text()
    assert '<script src="/widget.js" data-business="demo"' in page


def test_the_console_loads_only_its_own_modules() -> None:
    """The console's modules import one another by relative path, and nothing else (no build step,
    no bundler, nothing fetched from elsewhere)."""
    folder = Path(str(web_files())) / "console"
    modules = {p.name for p in folder.glob("*.js")}
    for module in modules:
        source = (folder / module).read_text()
        imported = set(re.findall(r'^import .* from "\./([\w.]+)";$', source, flags=re.M))
        assert imported <= modules, (module, imported - modules)
        assert not re.search(r"^import .* from \"(?!\./)", source, flags=re.M), module
    page = (folder / "index.html").read_text()
    assert '<script type="module" src="console.js"></script>' in page
