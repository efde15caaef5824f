"""The browsable API documentation at ``/api/v1/docs``, served wholly by labgate.

FastAPI's own docs page loads Swagger UI from a CDN, so on a machine without
Internet access (a cluster's login node, a laptop on a train) it is a blank
page. Here the page, its start-up script and Swagger UI's files all come from
labgate: the files from the ``swagger-ui-bundle-v2`` package (Swagger UI's
release as it is, Apache-2.0), read at the first request.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from labgate import __version__
from labgate.errors import LabgateError, NotFound

DOCS_PATH = "/api/v1/docs"
ASSETS_PATH = f"{DOCS_PATH}/assets"
OPENAPI_PATH = "/api/v1/openapi.json"
#: Swagger UI's files the page uses (the rest of the package, e.g. source maps, is not served).
ASSET_NAMES = ("swagger-ui-bundle.js", "swagger-ui.css")
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

#: Inline scripts stay forbidden: the start-up script is a file too. Swagger UI sets
#: style attributes, and shows the schema's images and data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)

#: Starts Swagger UI on the page (a file, so the page needs no inline script).
START_SCRIPT = f"""window.addEventListener("load", function () {{
  window.ui = SwaggerUIBundle({{
    url: "{OPENAPI_PATH}",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  }});
}});
"""


def _swagger_ui_dir() -> Traversable:
    """Swagger UI's release directory inside the installed package."""
    try:
        vendor = files("swagger_ui_bundle") / "vendor"
    except ModuleNotFoundError:
        raise LabgateError(
            "the API docs page needs the Python package swagger-ui-bundle-v2, a dependency "
            "of labgate: reinstall labgate (pip install -e .)",
            code="docs_unavailable",
        ) from None
    found = sorted(
        (entry for entry in vendor.iterdir() if entry.name.startswith("swagger-ui-")),
        key=lambda entry: entry.name,
    )
    if not found:
        raise LabgateError("swagger-ui-bundle-v2 ships no Swagger UI", code="docs_unavailable")
    return found[-1]


@functools.cache
def assets() -> dict[str, tuple[bytes, str]]:
    """Name → (content, media type) of every file the docs page loads; read once."""
    source = _swagger_ui_dir()
    loaded: dict[str, tuple[bytes, str]] = {}
    for name in ASSET_NAMES:
        suffix = name[name.rindex(".") :]
        loaded[name] = (source.joinpath(name).read_bytes(), MEDIA_TYPES[suffix])
    loaded["start.js"] = (START_SCRIPT.encode(), MEDIA_TYPES[".js"])
    return loaded


@functools.cache
def version() -> str:
    """Changes whenever Swagger UI or labgate does, so the files can be cached for good."""
    digests = "".join(hashlib.sha256(body).hexdigest() for body, _ in assets().values())
    return hashlib.sha256((__version__ + digests).encode()).hexdigest()[:12]


def _asset_url(name: str) -> str:
    return f"{ASSETS_PATH}/{name}?v={version()}"


def docs_page() -> str:
    """The HTML of the docs page: every URL in it is on this server."""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>labgate REST API</title>
<link rel="stylesheet" href="{_asset_url("swagger-ui.css")}">
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
</head>
<body>
<p><a href="/">← labgate</a> · <a href="{OPENAPI_PATH}">openapi.json</a></p>
<div id="swagger-ui"></div>
<script src="{_asset_url("swagger-ui-bundle.js")}"></script>
<script src="{_asset_url("start.js")}"></script>
</body>
</html>
"""


router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH)
async def docs() -> HTMLResponse:
    """The browsable API documentation (Swagger UI)."""
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
    }
    return HTMLResponse(docs_page(), headers=headers)


@router.get(f"{ASSETS_PATH}/{{name}}")
async def asset(name: str, v: str = "") -> Response:
    """One of Swagger UI's files, or the page's start-up script; cached for good when versioned."""
    found = assets().get(name)
    if found is None:
        raise NotFound(f"no API docs file {name!r}")
    body, media_type = found
    headers = {
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "public, max-age=31536000, immutable" if v == version() else "no-cache",
    }
    return Response(body, media_type=media_type, headers=headers)
