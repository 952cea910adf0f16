"""The web faces: `/widget.js` (the embeddable widget), `/demo/` (a sample host page) and
`/console/` (the agent console), served from the package's `web/` folder.

They are package data, so an installed (non-editable) package serves them as well as a checkout.
"""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

WEB_PACKAGE = "gateway"
WEB_FOLDER = "web"


def web_files() -> Traversable:
    """The folder the web faces are served from."""
    return files(WEB_PACKAGE) / WEB_FOLDER


class _Revalidated(StaticFiles):
    """Static files that browsers revalidate on every use (a cheap 304 by ETag): the widget is
    embedded on other sites, which must get a new version as soon as the gateway has it."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


async def _to_demo(request: Request) -> Response:
    return RedirectResponse("/demo/", status_code=307)


def routes() -> list[BaseRoute]:
    """`/` redirects to the demo page; everything not routed before these is a file or a 404."""
    return [
        Route("/", _to_demo, methods=["GET", "HEAD"]),
        Mount("/", _Revalidated(packages=[(WEB_PACKAGE, WEB_FOLDER)], html=True), name="web"),
    ]
