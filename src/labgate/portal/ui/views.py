"""The pages of the web UI: tool catalog, instances, launch progress, logs, account, tokens.

Each handler checks the session, gathers what the page shows first with the
same functions the REST API uses, and renders a template. Everything a page
does after that (launch, stop, live state, logs, tokens, password) is a
``fetch`` to ``/api/v1`` from the page's script with the session's CSRF
token, so the UI can do nothing the API does not offer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from labgate.backends.base import available_backends
from labgate.db.models import InstanceState, User
from labgate.errors import Unauthorized
from labgate.portal.accounts import user_out
from labgate.portal.api.catalog import catalog_out, last_params
from labgate.portal.api.choices import tool_sites
from labgate.portal.api.instances import instance_out, visible_instance
from labgate.portal.api.shares import SharingOut, routers_saw, sharing_out
from labgate.portal.api.snapshots import SnapshotOut, snapshots_of
from labgate.portal.auth import USER_SCOPES, Principal, optional_principal
from labgate.portal.schemas import InstanceOut, UserOut
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import error_page, render, to_login
from labgate.resolver.locality import BadUrlPath, clean_urlpath, open_url
from labgate.security import CSRF_FORM_FIELD, SCOPES

router = APIRouter(include_in_schema=False)

TOKEN_EXPIRIES: list[tuple[str, int | None]] = [
    ("30 days", 30 * 86400),
    ("7 days", 7 * 86400),
    ("1 day", 86400),
    ("90 days", 90 * 86400),
    ("1 year", 365 * 86400),
    ("Never", None),
]


def page_context(portal: Portal, caller: Principal, active: str, **extra: Any) -> dict[str, Any]:
    """What every signed-in page needs: who, the CSRF token, which nav item is current.

    ``others_open``: whether the browser may open other users' instances (as
    an admin, or shared): only on instance hosts, or when the operator opted
    in to it on the portal's origin (``share_on_portal_origin``); the router
    refuses it otherwise, so the pages offer no "Open" for them.
    """
    csrf = portal.signer.csrf_token(caller.session_id) if caller.session_id else ""
    return {
        "user": caller,
        "csrf": csrf,
        "csrf_field": CSRF_FORM_FIELD,
        "active": active,
        "others_open": others_open(portal),
        **extra,
    }


def others_open(portal: Portal) -> bool:
    """Whether a browser opens instances it does not own (see :func:`page_context`)."""
    settings = portal.settings
    return bool(settings.instance_host) or settings.share_on_portal_origin


def is_admin(caller: Principal) -> bool:
    """Whether the caller may see the admin pages."""
    return caller.is_admin and caller.has("admin")


async def signed_in(request: Request, *, admin: bool = False) -> Principal | Response:
    """The caller of a page; otherwise the way to sign in, or a 403 page for non-admins."""
    caller = await optional_principal(request)
    if caller is None:
        return to_login(request)
    if admin and not is_admin(caller):
        return error_page(request, 403, "forbidden", "This page is for administrators.")
    return caller


@router.get("/")
async def home(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The tool catalog as cards, each with a Launch button and a resources form (and, where
    sites offer them, a site and its launch choices)."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    last = await portal.run_db(lambda s: last_params(s, caller.user_id))
    tools = catalog_out(portal, last)
    sites = await portal.run_db(
        lambda s: {tool.name: tool_sites(portal, s, tool) for tool in portal.catalog}
    )
    context = page_context(
        portal,
        caller,
        "home",
        tools=tools,
        tool_sites=sites,
        max_instances=portal.settings.max_instances_per_user,
    )
    return render(request, "home.html", context)


@router.get("/instances")
async def my_instances(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The caller's instances with live state, open, stop and logs."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    return render(request, "instances.html", page_context(portal, caller, "instances"))


@router.get("/instances/{instance_id}")
async def instance_page(
    instance_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """One instance: launch progress from its event stream, then into the tool."""
    return await _instance_view(request, portal, instance_id, "instance.html")


@router.get("/instances/{instance_id}/logs")
async def instance_logs_page(
    instance_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """A live tail of an instance's output."""
    return await _instance_view(request, portal, instance_id, "logs.html")


async def _instance_view(
    request: Request, portal: Portal, instance_id: str, template: str
) -> Response:
    """Render a page about one instance the caller may see (404 otherwise)."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller

    def load(
        session: Session,
    ) -> tuple[InstanceOut, SharingOut | None, list[SnapshotOut] | None]:
        row = visible_instance(session, caller, instance_id, shared=True)
        out = instance_out(portal, row, caller, session)
        if out.access not in ("owner", "admin"):
            return out, None, None
        # Its snapshots are its owner's: an admin managing it sees them too.
        saved = snapshots_of(session, caller, everyone=True, source_instance=row.id)
        return out, sharing_out(session, row, seen), saved

    seen = routers_saw(portal, instance_id)
    instance, shares, saved = await portal.run_db(load)
    tool = portal.catalog.get(instance.tool)
    try:
        # From a launch link: open this path inside the tool once it is ready.
        opens = open_url(instance.url, clean_urlpath(request.query_params.get("urlpath", "")))
    except BadUrlPath:
        opens = instance.url
    context = page_context(
        portal,
        caller,
        "instances",
        instance=instance,
        sharing=shares,
        snapshots=saved,
        tool_title=tool.title if tool else instance.tool,
        open_url=opens,
    )
    return render(request, template, context)


@router.get("/account")
async def account_page(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The caller's account and the change-password form."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller

    def load(session: Session) -> UserOut:
        user = session.get(User, caller.user_id)
        if user is None:
            raise Unauthorized("your account no longer exists")
        return user_out(user)

    account = await portal.run_db(load)
    context = page_context(
        portal,
        caller,
        "account",
        account=account,
        password_min_length=portal.settings.password_min_length,
    )
    return render(request, "account.html", context)


@router.get("/tokens")
async def tokens_page(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """API tokens: create (shown once), list, revoke."""
    caller = await signed_in(request)
    if isinstance(caller, Response):
        return caller
    # Checked by default: what the API grants when no scopes are asked for.
    scopes = [
        (name, text, name in USER_SCOPES) for name, text in SCOPES.items() if caller.has(name)
    ]
    context = page_context(portal, caller, "tokens", scopes=scopes, expiries=TOKEN_EXPIRIES)
    return render(request, "tokens.html", context)


@router.get("/admin")
async def admin_home(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The admin pages start with the users."""
    return await admin_users(request, portal)


@router.get("/admin/users")
async def admin_users(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Every user: create, disable, make admin, reset password."""
    caller = await signed_in(request, admin=True)
    if isinstance(caller, Response):
        return caller
    return render(
        request, "admin_users.html", page_context(portal, caller, "admin", section="users")
    )


@router.get("/admin/instances")
async def admin_instances(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """Every instance, filtered by user, tool and state; stop any."""
    caller = await signed_in(request, admin=True)
    if isinstance(caller, Response):
        return caller
    context = page_context(
        portal,
        caller,
        "admin",
        section="instances",
        tools=[tool.name for tool in portal.catalog],
        states=[state.value for state in InstanceState],
    )
    return render(request, "admin_instances.html", context)


@router.get("/admin/sites")
async def admin_sites(request: Request, portal: Portal = Depends(get_portal)) -> Response:
    """The sites, their status, capacity and what they run; add and remove network sites."""
    caller = await signed_in(request, admin=True)
    if isinstance(caller, Response):
        return caller
    context = page_context(
        portal,
        caller,
        "admin",
        section="sites",
        backends=sorted(available_backends(), key=lambda name: (name != "process", name)),
        portal_url=portal.settings.effective_public_url,
    )
    return render(request, "admin_sites.html", context)
