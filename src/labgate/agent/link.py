"""Site links: the only way the portal talks to a site.

A link carries commands to a site agent (launch, stop, adopt, logs) and
brings back :class:`~labgate.wire.site.Report` objects (state changes and
progress). :class:`LocalSiteLink` holds the agent in the portal's process.
Every method is async and everything crossing a link is plain data
(:mod:`labgate.wire`), so the portal never depends on where the agent runs.
"""

from __future__ import annotations

import abc
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from labgate.agent.site import Adoption, SiteAgent
from labgate.errors import Conflict

if TYPE_CHECKING:
    from labgate.agent.fetch import Fetched
    from labgate.backends.base import LaunchSpec, SnapshotRef, SnapshotRequest, SnapshotResult
    from labgate.backends.claim import Claim
    from labgate.tools.catalog import Tool
    from labgate.wire.launch import FetchRequest
    from labgate.wire.runs import TaskSpec

__all__ = ["Adoption", "LocalSiteLink", "SiteLink", "live_sites"]


def live_sites(links: dict[str, SiteLink]) -> set[str]:
    """The names of the sites that can take commands now (placement picks among them)."""
    return {name for name, link in links.items() if link.reachable}


class SiteLink(abc.ABC):
    """Commands to one site; reports come back through the reporter callback.

    Every command is async. What the site can run (:meth:`unavailable_reason`,
    :meth:`claim_support`) is answered at once from what the site said of
    itself (its backend in process, its agent's hello over the network), so
    placement never waits on a site.
    """

    #: Whether the site's agent runs apart from the portal (it may be away while its
    #: tasks run on: their executors then tell the portal themselves).
    remote = False

    def __init__(self, site: str, backend: str, snapshot_kind: str = "") -> None:
        self.site = site
        #: Short name of the site's backend (``process``, ``containers``, ...).
        self.backend = backend
        #: What the backend's snapshots are (``image``, ``archive``); empty: it takes none.
        self.snapshot_kind = snapshot_kind

    @property
    def live(self) -> bool:
        """Whether the site can take commands now (a network site: its agent is connected)."""
        return True

    @property
    def reachable(self) -> bool:
        """Whether commands reach the site now, from here or relayed through another portal."""
        return self.live

    async def health(self) -> str | None:
        """What keeps the site from working now (agent away, engine down), or None."""
        return None if self.live else f"the agent of site {self.site} is not connected"

    @abc.abstractmethod
    def unavailable_reason(self, tool: Tool) -> str | None:
        """Why ``tool`` cannot run on this site (None: it can), as the site says."""

    def placement_reason(self, tool: Tool) -> str | None:
        """Why launches of ``tool`` must not come here (None: they may), for placement
        and the tools page: the site's own answer (:meth:`unavailable_reason`)."""
        return self.unavailable_reason(tool)

    @abc.abstractmethod
    async def launch(self, spec: LaunchSpec) -> None:
        """Start an instance; progress and the outcome arrive as reports."""

    @abc.abstractmethod
    async def stop(self, instance_id: str, backend_state: dict[str, Any]) -> None:
        """Stop an instance; a ``stopped`` report follows."""

    @abc.abstractmethod
    async def adopt(self, adoption: Adoption) -> None:
        """Take an instance back under watch after a portal restart."""

    @abc.abstractmethod
    async def logs(self, instance_id: str, backend_state: dict[str, Any], lines: int) -> str:
        """The last lines of an instance's output."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop watching; running instances are left running."""

    @abc.abstractmethod
    async def snapshot(
        self, instance_id: str, backend_state: dict[str, Any], request: SnapshotRequest
    ) -> SnapshotResult:
        """Save an instance (image or workspace archive); progress arrives as reports."""

    @abc.abstractmethod
    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """Look for a stored snapshot at the site (:meth:`SiteAgent.find_snapshot`)."""

    @abc.abstractmethod
    async def collect_snapshots(self, known: set[str]) -> list[str]:
        """Remove the site's stored snapshots whose ids are not in ``known``."""

    @abc.abstractmethod
    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Remove a snapshot's stored data at the site."""

    @abc.abstractmethod
    async def reconcile(self, known: set[str]) -> list[str]:
        """Let the site remove instances the portal does not know (ids not in ``known``)."""

    @abc.abstractmethod
    async def fetch_dataset(self, request: FetchRequest) -> Fetched:
        """Have the site fetch a URL dataset into its own cache (or find it there)."""

    @abc.abstractmethod
    def claim_support(self, tool: Tool) -> str | None:
        """Why the site cannot hand running instances of ``tool`` to users (None: it can)."""

    @abc.abstractmethod
    async def claim(self, instance_id: str, claim: Claim) -> dict[str, Any]:
        """Hand a running warm-pool instance to a user; returns its new backend state."""

    # --- batch tasks (labgate.agent.tasks); a link without them refuses each -------
    async def run_task(self, spec: TaskSpec) -> None:
        """Start a task attempt; ``running`` and how it ended arrive as task reports."""
        raise Conflict(f"site {self.site} cannot run batch tasks")

    async def cancel_task(self, attempt_id: str) -> None:
        """Stop a task attempt; a ``cancelled`` report follows."""
        raise Conflict(f"site {self.site} cannot run batch tasks")

    async def adopt_task(self, attempt_id: str) -> None:
        """Watch a task attempt again after a portal restart."""
        raise Conflict(f"site {self.site} cannot run batch tasks")

    async def task_logs(self, attempt_id: str, lines: int) -> str:
        """The last lines of a task attempt's output."""
        raise Conflict(f"site {self.site} cannot run batch tasks")

    async def task_results(self, attempt_id: str) -> bytes:
        """A task attempt's results directory, as a gzipped tar."""
        raise Conflict(f"site {self.site} cannot run batch tasks")

    async def forget_task(self, attempt_id: str) -> None:
        """Remove a task attempt's files at the site."""
        raise Conflict(f"site {self.site} cannot run batch tasks")


class LocalSiteLink(SiteLink):
    """A link to an agent running in the portal's own process."""

    def __init__(self, agent: SiteAgent) -> None:
        super().__init__(agent.site, agent.backend.name, agent.snapshot_kind)
        self.agent = agent

    def unavailable_reason(self, tool: Tool) -> str | None:
        """Ask the in-process agent's backend."""
        return self.agent.unavailable_reason(tool)

    async def health(self) -> str | None:
        """Ask the in-process agent (its backend's engine)."""
        return await self.agent.health()

    async def launch(self, spec: LaunchSpec) -> None:
        """Hand the launch to the in-process agent.

        The router runs on this host: a tool that can listen on a Unix socket
        does, where no other local account can connect to it (a loopback port
        is open to all of them).
        """
        self.agent.launch(replace(spec, on_socket=True))

    async def stop(self, instance_id: str, backend_state: dict[str, Any]) -> None:
        """Stop through the in-process agent."""
        await self.agent.stop(instance_id, backend_state)

    async def adopt(self, adoption: Adoption) -> None:
        """Re-attach through the in-process agent."""
        await self.agent.adopt(adoption)

    async def logs(self, instance_id: str, backend_state: dict[str, Any], lines: int) -> str:
        """Read logs through the in-process agent."""
        return await self.agent.logs(backend_state, lines)

    async def close(self) -> None:
        """Stop the agent's watch loops."""
        await self.agent.close()

    async def snapshot(
        self, instance_id: str, backend_state: dict[str, Any], request: SnapshotRequest
    ) -> SnapshotResult:
        """Save an instance through the in-process agent."""
        return await self.agent.snapshot(backend_state, request)

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """Look for a stored snapshot through the in-process agent."""
        return await self.agent.find_snapshot(request, reference)

    async def collect_snapshots(self, known: set[str]) -> list[str]:
        """Collect through the in-process agent."""
        return await self.agent.collect_snapshots(known)

    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Delete a snapshot's data through the in-process agent."""
        await self.agent.delete_snapshot(ref)

    async def reconcile(self, known: set[str]) -> list[str]:
        """Reconcile through the in-process agent."""
        return await self.agent.reconcile(known)

    async def fetch_dataset(self, request: FetchRequest) -> Fetched:
        """Fetch through the in-process agent."""
        return await self.agent.fetch_dataset(request)

    def claim_support(self, tool: Tool) -> str | None:
        """Ask the in-process agent's backend."""
        return self.agent.claim_support(tool)

    async def claim(self, instance_id: str, claim: Claim) -> dict[str, Any]:
        """Claim through the in-process agent."""
        return await self.agent.claim(instance_id, claim)

    async def run_task(self, spec: TaskSpec) -> None:
        """Start a task attempt in the in-process agent."""
        await self.agent.tasks.run(spec)

    async def cancel_task(self, attempt_id: str) -> None:
        """Stop a task attempt in the in-process agent."""
        await self.agent.tasks.cancel(attempt_id)

    async def adopt_task(self, attempt_id: str) -> None:
        """Watch a task attempt again."""
        await self.agent.tasks.adopt(attempt_id)

    async def task_logs(self, attempt_id: str, lines: int) -> str:
        """A task attempt's output."""
        return await self.agent.tasks.logs(attempt_id, lines)

    async def task_results(self, attempt_id: str) -> bytes:
        """A task attempt's results archive."""
        return await self.agent.tasks.results(attempt_id)

    async def forget_task(self, attempt_id: str) -> None:
        """Remove a task attempt's files."""
        await self.agent.tasks.forget(attempt_id)
