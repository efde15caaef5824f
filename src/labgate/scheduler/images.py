"""Launch-time choice of a container image, from an allowlist per tool and per group.

A tool's ``[container]`` table names its ``image`` and may allow others:
``images`` (anyone may choose them) and ``group_images`` (members of that
group only), like DockerSpawner's allowed images or Open OnDemand's app
form. A launch that names ``image`` is checked here, in the admission
transaction: the image must be one the user may choose, the tool must run in
containers, and the instance goes to a containers site. The site's backend
checks again that the image is among those the tool lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import Group, GroupMember, User
from labgate.errors import BadRequest, Conflict, Forbidden
from labgate.tools.catalog import ContainerSpec, Tool, ToolSectionError

if TYPE_CHECKING:
    from labgate.scheduler.placement import SiteView

#: The backend whose tools' ``[container]`` tables name images.
CONTAINERS = "containers"


def groups_of(session: Session, user: User) -> list[str]:
    """The names of the groups ``user`` belongs to."""
    return list(
        session.scalars(
            select(Group.name)
            .join(GroupMember, GroupMember.group_id == Group.id)
            .where(GroupMember.user_id == user.id)
        )
    )


def choices(session: Session, tool: Tool, user: User) -> list[str]:
    """The images ``user`` may launch ``tool`` with (the first is the tool's own); [] none."""
    try:
        section = tool.parsed("container", ContainerSpec)
    except ToolSectionError:
        return []
    if section is None:
        return []
    return section.allowed_images(groups_of(session, user))


def check_choice(session: Session, tool: Tool, user: User, image: str | None) -> None:
    """Refuse an image the user may not choose for ``tool`` (403 ``image_not_allowed``)."""
    if not image:
        return
    allowed = choices(session, tool, user)
    if not allowed:
        raise BadRequest(
            f"tool {tool.name!r} runs in no container, so it has no image to choose",
            code="image_not_allowed",
        )
    if image not in allowed:
        raise Forbidden(
            f"image {image!r} is not one you may choose for {tool.name}; "
            f"allowed: {', '.join(allowed)}",
            code="image_not_allowed",
        )


def sites_for_image(views: Sequence[SiteView], image: str | None) -> list[SiteView]:
    """The sites a launch with a chosen image may go to: containers sites only."""
    if not image:
        return list(views)
    fits = [view for view in views if view.backend == CONTAINERS]
    if not fits:
        raise Conflict(
            "an image was chosen, but no containers site is available", code="site_unavailable"
        )
    return fits
