"""The portal's side of the route table: what routers must know, fed on every change.

Routers check every request in memory, so the portal tells them about
instances (routes), users (admin flag, disabled, session cut-off), API tokens
(by hash) and revoked sessions whenever these change, and hands a full
snapshot to any router that (re)connects.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import ApiToken, Instance, User

log = logging.getLogger(__name__)


class RouteFeedHub:
    """Turns portal changes into route-table updates for the routers."""

    def __init__(self) -> None:
        self.controls: list[Any] = []

    def instance_changed(self, instance: Instance) -> None:
        """An instance changed state, endpoint or access."""

    def user_changed(self, user: User) -> None:
        """A user was created or changed."""

    def user_removed(self, user_id: int) -> None:
        """A user was deleted."""

    def token_changed(self, token: ApiToken) -> None:
        """A token was created."""

    def token_removed(self, token_hash: str) -> None:
        """A token was revoked."""

    def session_revoked(self, session_id: str, expires_at: float) -> None:
        """A browser session ended before its cookie expired."""

    def load(self, session: Session) -> None:
        """Build the full state from the database (on start)."""
        for _ in session.scalars(select(Instance).limit(0)):
            pass
