"""The browser side of the portal: every page, its static files, and ``/healthz``.

:data:`router` gathers the pages of :mod:`labgate.portal.ui`:

- ``render.py``  templates, static files, security headers, error pages
- ``signin.py``  ``/login`` and ``/logout`` (the router sends browsers
  without a session to ``/login?next=<path>``)
- ``federated.py`` sign-in through another site (OpenID Connect providers)
- ``sharelinks.py`` ``/share/<token>``: taking up a share link
- ``views.py``   catalog, instances, launch progress, logs, account,
  tokens, admin
- ``launch.py``  ``/launch`` links, launch badges, the Dataverse integration
- ``usage.py``   the admin usage page (``/admin/usage``)
- ``runs.py``    batch runs (``/runs``, ``/runs/<id>``: the graph of a run)
- ``snapshots.py`` ``/snapshots``: list, share, delete, launch saved instances
- here: ``/healthz``, and ``/hub/home``, ``/hub/spawn…`` (JupyterLab's Hub menu)

Every template extends ``base.html``; :data:`templates` is the UI's Jinja
environment.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

from labgate import __version__
from labgate.portal.ui import (
    federated,
    launch,
    render,
    runs,
    sharelinks,
    signin,
    snapshots,
    usage,
    views,
)
from labgate.portal.ui.render import templates
from labgate.portal.ui.signin import safe_next

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the portal answers."""
    return {"status": "ok", "version": __version__}


# JupyterLab's Hub menu (labgate.tools.jupyter_pageconfig sets its prefix to /hub/):
# "Hub Control Panel" opens /hub/home, the "server unavailable" dialog /hub/spawn/...
# Both lead back to the user's instances, as JupyterHub's control panel does.
@router.get("/hub/home")
@router.get("/hub/spawn")
@router.get("/hub/spawn/{rest:path}")
async def hub_links() -> RedirectResponse:
    """JupyterHub's control panel links: to the user's instances."""
    return RedirectResponse("/instances", status_code=303)


router.include_router(render.static_router)
router.include_router(signin.router)
router.include_router(federated.router)
router.include_router(sharelinks.router)
router.include_router(views.router)
router.include_router(launch.router)
router.include_router(usage.router)
router.include_router(runs.router)
router.include_router(snapshots.router)

__all__ = ["router", "safe_next", "templates"]
