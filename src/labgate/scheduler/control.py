"""What the scheduler's helpers may ask of the instance manager.

The culler, the warm pools and the launch pipeline work next to
:class:`~labgate.scheduler.instances.InstanceManager`; they take it as an
:class:`InstanceControl` (a structural type), so none of them imports the
manager module and no import of the scheduler goes in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from labgate.agent.link import SiteLink
    from labgate.db.models import Instance
    from labgate.security import SecretBox
    from labgate.tools.catalog import Catalog
    from labgate.wire.site import Report

T = TypeVar("T")


class InstanceControl(Protocol):
    """The instance manager, as the culler and the warm pools see it."""

    catalog: Catalog
    links: dict[str, SiteLink]
    box: SecretBox

    async def run_db(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction in a worker thread."""
        ...

    async def run_admission(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in a transaction holding the admission lock."""
        ...

    def start_admitted(self, instance_id: str) -> None:
        """Start an admitted (``pending``) instance in the background."""

    def enqueued(self, instance: Instance) -> None:
        """A launch was admitted ``queued``: its site's start queue starts it in turn."""

    async def stop(
        self,
        instance_id: str,
        *,
        reason: str = "stopped",
        message: str = "stop requested",
        fence: Callable[[Session], None] | None = None,
    ) -> Instance:
        """Ask the instance's site to stop it (``fence`` may refuse, in the same transaction)."""
        ...

    async def apply(self, report: Report) -> None:
        """Record what a site reported."""

    def changed(self, instance: Instance) -> None:
        """Tell the routers and the event streams that an instance changed."""
