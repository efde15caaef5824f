"""``/share/<token>``: taking up a share link in the browser.

Opening the link shows whose instance it is and asks; only the form's POST
(CSRF-checked like every cookie-authenticated change) shares it. A page of
another site therefore cannot make a visitor take up a link behind their
back. Without a session the router's usual way applies: sign in, then back.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Instance, ShareLink, utcnow
from labgate.errors import NotFound
from labgate.portal.api.shares import redeem
from labgate.portal.auth import optional_principal
from labgate.portal.state import Portal, get_portal
from labgate.portal.ui.render import error_page, render, to_login
from labgate.portal.ui.views import page_context
from labgate.security import hash_token

router = APIRouter(include_in_schema=False)


def _offer(session: Session, token: str) -> tuple[str, str, str] | None:
    link = session.scalar(select(ShareLink).where(ShareLink.token_hash == hash_token(token)))
    if link is None or link.expires_at <= utcnow():
        return None
    instance = session.get(Instance, link.instance_id)
    if instance is None or instance.state.terminal:
        return None
    return instance.id, instance.tool, instance.owner.name


@router.get("/share/{token}")
async def share_page(
    token: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """Whose instance the link shares, and a button to take it up."""
    caller = await optional_principal(request)
    if caller is None:
        return to_login(request)
    offer = await portal.run_db(lambda s: _offer(s, token))
    if offer is None:
        return error_page(
            request, 404, "bad_link", "This share link is not valid: revoked, expired or mistyped."
        )
    instance_id, tool, owner = offer
    context = page_context(
        portal, caller, "instances", token=token, instance_id=instance_id, tool=tool, owner=owner
    )
    return render(request, "share.html", context)


@router.post("/share/{token}")
async def take_share(
    token: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """Take up the link (CSRF-checked), then go to the instance."""
    caller = await optional_principal(request)
    if caller is None:
        return to_login(request)
    try:
        taken = await redeem(portal, caller, token)
    except NotFound as exc:
        return error_page(request, 404, exc.code, exc.detail)
    return RedirectResponse(f"/instances/{taken.instance}", status_code=303)
