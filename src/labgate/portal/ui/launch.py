"""Launch links in the browser: ``/launch``, launch badges, the Dataverse integration.

``/launch?dataset=<id>&tool=<name>`` is what a badge, a resolve answer or a
repository's "Explore" button links to:

1. without a session it sends the browser to sign in and back here;
2. when the user already has that tool running (or starting) on that
   dataset, it goes straight there;
3. otherwise it shows what will happen (the dataset, the tool, where it will
   run) with one **Launch** button: a form POST carrying the session's CSRF
   token. A GET never launches, so a link on another site cannot spend a
   user's quota behind their back (the page also refuses to be framed);
4. ``POST /launch`` launches through the same manager as the API and sends
   the browser to the instance's progress page (``/instances/<id>``), which
   follows the event stream and opens the tool when it is ready.

The Dataverse external-tool manifest (``/dataverse/manifest.json``) points
Dataverse's "Explore" button at ``/launch/dataverse/<tool>``, which turns
Dataverse's ``datasetPid`` into the ``/launch`` link above.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.agent.link import live_sites
from labgate.db.models import ACTIVE_STATES, Instance, InstanceState
from labgate.errors import LabgateError
from labgate.portal.api.datasets import locator
from labgate.portal.auth import Principal, optional_principal
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import error_page, render, to_login
from labgate.portal.ui.views import page_context
from labgate.resolver.identifiers import InvalidIdentifier, normalize
from labgate.resolver.locality import (
    BadUrlPath,
    Resolution,
    clean_urlpath,
    launch_url,
    open_url,
)
from labgate.scheduler.launch import LaunchRequest

router = APIRouter(include_in_schema=False)

BADGE_ALT = "Launch in labgate"
# Shields-style, 148 by 20; text in the system sans-serif, no external fonts or scripts.
BADGE_SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="148" height="20" role="img" \
aria-label="launch: labgate"><title>Launch in labgate</title>\
<linearGradient id="s" x2="0" y2="100%"><stop offset="0" stop-color="#bbb" stop-opacity=".1"/>\
<stop offset="1" stop-opacity=".1"/></linearGradient>\
<clipPath id="r"><rect width="148" height="20" rx="3" fill="#fff"/></clipPath>\
<g clip-path="url(#r)"><rect width="58" height="20" fill="#555"/>\
<rect x="58" width="90" height="20" fill="#1f6feb"/>\
<rect width="148" height="20" fill="url(#s)"/></g>\
<g fill="#fff" text-anchor="middle" font-family="Verdana,Geneva,DejaVu Sans,sans-serif" \
font-size="11"><text x="29" y="14">launch</text>\
<text x="103" y="14">\xe2\x97\x86 labgate</text></g></svg>
"""


def _default_tool(portal: Portal) -> str:
    names = [tool.name for tool in portal.catalog]
    return "jupyterlab" if "jupyterlab" in names else (names[0] if names else "")


def runnable_tools(portal: Portal) -> list[str]:
    """The tools some configured site can run now, in catalog order."""
    links = list(portal.links.values())
    return [
        tool.name
        for tool in portal.catalog
        if any(link.unavailable_reason(tool) is None for link in links)
    ]


def _existing(session: Session, user_id: int, tool: str, dataset_id: int) -> Instance | None:
    """The user's newest unfinished instance of ``tool`` on the dataset, to reuse."""
    return session.scalar(
        select(Instance)
        .where(
            Instance.owner_id == user_id,
            Instance.tool == tool,
            Instance.dataset_id == dataset_id,
            Instance.state.in_(ACTIVE_STATES),
        )
        .order_by(Instance.created_at.desc())
        .limit(1)
    )


def _go_to(portal: Portal, instance: Instance, urlpath: str = "") -> RedirectResponse:
    """Into a running instance (at ``urlpath``), or to the progress page of one starting.

    ``urlpath`` is checked and has its ``{dataset}`` filled in already.
    """
    if instance.state == InstanceState.running:
        base = portal.settings.instance_url(instance.id)
        return RedirectResponse(open_url(base, urlpath), status_code=303)
    return RedirectResponse(_progress_page(instance.id, urlpath), status_code=303)


def _progress_page(instance_id: str, urlpath: str) -> str:
    page = f"/instances/{quote(instance_id)}"
    return f"{page}?{urlencode({'urlpath': urlpath})}" if urlpath else page


def _urlpath(text: str, dataset_name: str) -> str:
    """A checked ``urlpath`` with ``{dataset}`` filled in; BadUrlPath when it is refused."""
    return open_url("", clean_urlpath(text), dataset_name) if text else ""


def _where(resolution: Resolution, tool_sites: list[str]) -> str:
    if resolution.live:
        sites = ", ".join(tool_sites) or ", ".join(r.site for r in resolution.live)
        return f"on site {sites}, where a copy of the data is"
    return "on a site with room; the data is downloaded into its cache first"


@router.get("/launch")
async def launch_page(
    request: Request,
    portal: Portal = Depends(get_portal),
    dataset: str = Query("", max_length=2048),
    tool: str = Query("", max_length=64),
    urlpath: str = Query("", max_length=2048),
) -> Response:
    """Sign in, reuse or confirm: see the module docstring."""
    if not dataset or not tool:
        return error_page(
            request, 400, "bad_request", "A launch link needs ?dataset=<identifier>&tool=<name>."
        )
    try:
        caller = await optional_principal(request)
    except LabgateError:
        caller = None
    if caller is None:
        return to_login(request)
    found = portal.catalog.get(tool)
    if found is None:
        return error_page(request, 404, "unknown_tool", f"There is no tool called {tool!r} here.")

    def look(session: Session) -> tuple[Resolution, Instance | None]:
        resolution = locator(portal).resolve(session, dataset, live_sites(portal.links))
        existing = _existing(session, caller.user_id, tool, resolution.dataset.id)
        return resolution, existing

    try:
        resolution, existing = await portal.run_db(look)
        opens = _urlpath(urlpath, resolution.dataset.name)
    except LabgateError as exc:
        return error_page(request, exc.status, exc.code, exc.detail)
    except BadUrlPath as exc:
        return error_page(request, 400, "bad_urlpath", f"{exc}.")
    if existing is not None:
        return _go_to(portal, existing, opens)

    sites = {name: link.placement_reason for name, link in portal.links.items()}
    links = locator(portal).launch_links(
        resolution, portal.catalog, sites, portal.settings.effective_public_url
    )
    offer = next((link for link in links if link.tool == tool), None)
    problem = None
    if offer is None:
        if not resolution.live and resolution.fetch_refusal is not None:
            problem = resolution.explain()
        else:
            problem = f"{found.title} cannot run on any site that can reach this dataset."
    context = page_context(
        portal,
        caller,
        "home",
        dataset=locator(portal).dataset_out(resolution),
        tool=found,
        where=_where(resolution, offer.sites if offer else []),
        problem=problem,
        others=[link for link in links if link.tool != tool],
        urlpath=urlpath,
        opens=opens,
    )
    return render(request, "launch.html", context, status=409 if problem else 200)


@router.post("/launch")
async def launch_submit(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Launch from the confirmation form, then follow it on the progress page."""
    form = await request.form()
    dataset, tool = str(form.get("dataset") or ""), str(form.get("tool") or "")
    urlpath = str(form.get("urlpath") or "")
    try:
        caller: Principal | None = await optional_principal(request)  # checks the CSRF token
    except LabgateError as exc:
        return error_page(request, exc.status, exc.code, exc.detail)
    if caller is None:
        return RedirectResponse(
            "/login?"
            + urlencode(
                {
                    "next": "/launch?"
                    + urlencode({"dataset": dataset, "tool": tool, "urlpath": urlpath})
                }
            ),
            status_code=303,
        )
    if not dataset or not tool:
        return error_page(request, 400, "bad_request", "The form lacks the dataset or the tool.")

    def reuse(session: Session) -> tuple[Instance | None, str]:
        resolution = locator(portal).resolve(session, dataset, live_sites(portal.links))
        existing = _existing(session, caller.user_id, tool, resolution.dataset.id)
        return existing, resolution.dataset.name

    try:
        existing, name = await portal.run_db(reuse)
        opens = _urlpath(urlpath, name)
        if existing is not None:  # a second click, or a second tab
            return _go_to(portal, existing, opens)
        caller.require("instances:write")
        instance = await portal.instances.launch(
            caller.user_id, LaunchRequest(tool=tool, dataset=dataset)
        )
    except LabgateError as exc:
        return error_page(request, exc.status, exc.code, exc.detail)
    except BadUrlPath as exc:
        return error_page(request, 400, "bad_urlpath", f"{exc}.")
    return RedirectResponse(_progress_page(instance.id, opens), status_code=303)


# --- badges --------------------------------------------------------------------------


@router.get("/badge.svg")
async def badge_svg() -> Response:
    """The "launch in labgate" badge image."""
    return Response(
        BADGE_SVG,
        media_type="image/svg+xml",
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def badge_snippets(
    public_url: str, identifier: str, tool: str, urlpath: str = ""
) -> dict[str, str]:
    """The launch link, and the Markdown and HTML that show it as a badge."""
    link = launch_url(public_url, identifier, tool, urlpath)
    image = f"{public_url}/badge.svg"
    return {
        "link": link,
        "markdown": f"[![{BADGE_ALT}]({image})]({link})",
        "html": f'<a href="{link.replace("&", "&amp;")}"><img src="{image}" alt="{BADGE_ALT}"></a>',
    }


@router.get("/badge")
async def badge_page(
    request: Request,
    portal: Portal = Depends(get_portal),
    dataset: str = Query("", max_length=2048),
    tool: str = Query("", max_length=64),
    urlpath: str = Query("", max_length=2048),
) -> Response:
    """Build a launch link and the Markdown or HTML of its badge."""
    caller = await optional_principal(request)
    if caller is None:
        return to_login(request)
    context: dict[str, Any] = page_context(
        portal,
        caller,
        "home",
        tools=list(portal.catalog),
        dataset=dataset,
        tool=tool or _default_tool(portal),
        urlpath=urlpath,
        snippets=None,
        error=None,
        registered=None,
    )
    if dataset:
        try:
            identifier = normalize(dataset)
        except InvalidIdentifier as exc:
            context["error"] = f"That is not an identifier labgate accepts: {exc.reason}."
            return render(request, "badge.html", context, status=400)
        if portal.catalog.get(context["tool"]) is None:
            context["error"] = f"There is no tool called {context['tool']!r}."
            return render(request, "badge.html", context, status=400)
        try:
            urlpath = clean_urlpath(urlpath)
        except BadUrlPath as exc:
            context["error"] = f"That path inside the tool is refused: {exc}."
            return render(request, "badge.html", context, status=400)
        context["dataset"] = identifier.canonical
        context["snippets"] = badge_snippets(
            portal.settings.effective_public_url, identifier.canonical, context["tool"], urlpath
        )
        context["registered"] = await portal.run_db(
            lambda s: locator(portal).is_registered(s, identifier.canonical)
        )
    return render(request, "badge.html", context)


# --- Dataverse --------------------------------------------------------------------------


def dataverse_manifest(public_url: str, tool: str, title: str, urlpath: str = "") -> dict[str, Any]:
    """A Dataverse external-tool manifest: an "Explore" button on every dataset page.

    With ``urlpath`` the button opens that path inside the tool (``{dataset}``:
    the dataset's name), carried in the tool URL's path: Dataverse adds its own
    query string.
    """
    tool_url = f"{public_url}/launch/dataverse/{quote(tool)}"
    if urlpath:
        tool_url += f"/open/{quote(urlpath, safe='/{}')}"
    return {
        "displayName": f"labgate: {title}",
        "description": f"Open this dataset in {title} on labgate, next to the data.",
        "toolName": f"labgate-{tool}",
        "scope": "dataset",
        "types": ["explore"],
        "toolUrl": tool_url,
        "toolParameters": {
            "queryParameters": [{"datasetPid": "{datasetPid}"}, {"siteUrl": "{siteUrl}"}]
        },
    }


@router.get("/dataverse/manifest.json")
async def dataverse_manifest_json(
    portal: Portal = Depends(get_portal),
    tool: str = Query("", max_length=64),
    urlpath: str = Query("", max_length=2048),
) -> Response:
    """The manifest a Dataverse admin registers (``POST /api/admin/externalTools``).

    Only for a tool some site can run: a button that always ends on an error
    page is worse than none. Without ``tool``: ``jupyterlab`` when a site runs
    it, else the first tool of the catalog that a site runs.
    """
    runnable = runnable_tools(portal)
    name = tool or ("jupyterlab" if "jupyterlab" in runnable else next(iter(runnable), ""))
    found = portal.catalog.get(name) if name else None
    if found is None:
        detail = f"no tool called {name!r}" if name else "no site can run any tool"
        return JSONResponse({"error": "unknown_tool", "detail": detail}, status_code=404)
    if found.name not in runnable:
        detail = (
            f"no site can run the tool {found.name!r}, so its Explore button would only end "
            f"on an error page; tools some site runs: {', '.join(runnable) or 'none'}"
        )
        return JSONResponse({"error": "tool_unavailable", "detail": detail}, status_code=409)
    try:
        urlpath = clean_urlpath(urlpath)
    except BadUrlPath as exc:
        return JSONResponse({"error": "bad_urlpath", "detail": str(exc)}, status_code=400)
    return JSONResponse(
        dataverse_manifest(portal.settings.effective_public_url, found.name, found.title, urlpath)
    )


@router.get("/launch/dataverse/{tool}")
@router.get("/launch/dataverse/{tool}/open/{urlpath:path}")
async def dataverse_launch(
    request: Request,
    tool: str,
    urlpath: str = "",
    datasetPid: str = Query("", max_length=2048),  # Dataverse's parameter names
    siteUrl: str = Query("", max_length=2048),
) -> Response:
    """Where Dataverse's "Explore" button lands: on to ``/launch`` for the dataset's PID."""
    if not datasetPid:
        return error_page(
            request, 400, "bad_request", "Dataverse did not send the dataset's PID (datasetPid)."
        )
    wanted = {"dataset": datasetPid, "tool": tool}
    query = urlencode({**wanted, "urlpath": urlpath} if urlpath else wanted)
    return RedirectResponse(f"/launch?{query}", status_code=303)
