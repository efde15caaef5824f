"""Placement: which site an instance runs on.

:func:`choose_site` is pure: it gets a :class:`SiteView` per site (backend,
liveness, labels, capacity, current use) and a :class:`Placement` (tool,
resources, and optionally a wanted site, required labels and the sites holding
a live replica of the launch's dataset) and returns a site name, or raises with
every site and why it was passed over.

The rule, in order:

1. a site named by the launch is the only candidate (an unknown name is a 400);
2. the site must be live, able to run the tool, carry every required label,
   and, for a launch with a dataset, hold a live replica of it;
3. it must have room: CPU, memory and instance count after the launch within
   its capacity (0 means unlimited);
4. among those left, the least loaded wins: the lowest fraction of its
   fullest capacity after the launch, then the fewest instances, then the name
   (so the choice is deterministic).

When nothing is left, the error's code names the last step that removed a
candidate: ``site_unavailable``, ``tool_unavailable``, ``no_matching_site``,
``dataset_unavailable`` or ``no_capacity`` (all 409).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labgate.backends.base import Resources
from labgate.backends.registry import tool_unavailable_reason
from labgate.errors import BadRequest, Conflict

if TYPE_CHECKING:
    from labgate.tools.catalog import Tool


@dataclass(frozen=True)
class Usage:
    """CPU cores, memory bytes and instances: in use, or allowed (0 = unlimited)."""

    cpu: float = 0.0
    memory: int = 0
    instances: int = 0

    def plus(self, resources: Resources) -> Usage:
        """This use with one more instance of ``resources``."""
        return Usage(self.cpu + resources.cpu, self.memory + resources.memory, self.instances + 1)


@dataclass(frozen=True)
class SiteView:
    """What placement knows of one site."""

    name: str
    backend: str
    live: bool = True
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Usage = field(default_factory=Usage)
    used: Usage = field(default_factory=Usage)
    #: Why a tool cannot run here, as the site says (its link); None: from the backend alone.
    unavailable: Callable[[Tool], str | None] | None = None

    def tool_reason(self, tool: Tool) -> str | None:
        """Why ``tool`` cannot run here (a missing program, an image it cannot get), or None."""
        if self.unavailable is not None:
            return self.unavailable(tool)
        return tool_unavailable_reason(tool, self.backend)

    def shortage(self, resources: Resources) -> str | None:
        """Why ``resources`` do not fit on this site now, or None when they do."""
        after, cap = self.used.plus(resources), self.capacity
        if cap.instances and after.instances > cap.instances:
            return f"full ({self.used.instances} of {cap.instances} instances)"
        if cap.cpu and after.cpu > cap.cpu + 1e-9:
            return (
                f"not enough CPU ({self.used.cpu:g} of {cap.cpu:g} in use, {resources.cpu:g} asked)"
            )
        if cap.memory and after.memory > cap.memory:
            return (
                f"not enough memory ({_gib(self.used.memory)} of {_gib(cap.memory)} in use, "
                f"{_gib(resources.memory)} asked)"
            )
        return None

    def load_after(self, resources: Resources) -> float:
        """The fraction of this site's fullest capacity in use once ``resources`` run here."""
        after, cap = self.used.plus(resources), self.capacity
        fractions = [
            after.cpu / cap.cpu if cap.cpu else 0.0,
            after.memory / cap.memory if cap.memory else 0.0,
            after.instances / cap.instances if cap.instances else 0.0,
        ]
        return max(fractions)


@dataclass(frozen=True)
class Placement:
    """What a launch asks of its site."""

    tool: Tool
    resources: Resources
    wanted: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Sites holding a live replica of the launch's dataset; None for a launch without one.
    holders: Collection[str] | None = None


def choose_site(sites: Sequence[SiteView], placement: Placement) -> str:
    """The name of the site that will run the launch; see the module docstring."""
    by_name = {site.name: site for site in sites}
    if placement.wanted is not None:
        if placement.wanted not in by_name:
            raise BadRequest(f"no site called {placement.wanted!r}", code="unknown_site")
        candidates = [by_name[placement.wanted]]
    else:
        candidates = sorted(sites, key=lambda site: site.name)

    steps: list[tuple[str, Callable[[SiteView], str | None]]] = [
        ("site_unavailable", lambda s: None if s.live else "not reachable"),
        ("tool_unavailable", lambda s: s.tool_reason(placement.tool)),
        ("no_matching_site", lambda s: _missing_labels(s, placement.labels)),
        ("dataset_unavailable", lambda s: _no_replica(s, placement.holders)),
        ("no_capacity", lambda s: s.shortage(placement.resources)),
    ]
    reasons: list[str] = []
    code = "tool_unavailable"
    for step_code, check in steps:
        kept = []
        for site in candidates:
            reason = check(site)
            if reason is None:
                kept.append(site)
            else:
                reasons.append(f"{site.name}: {reason}")
        if candidates and not kept:
            code = step_code
        candidates = kept
    if candidates:
        best = min(
            candidates,
            key=lambda s: (s.load_after(placement.resources), s.used.instances, s.name),
        )
        return best.name
    raise Conflict(
        f"no site can run {placement.tool.name!r} now ({'; '.join(reasons) or 'no sites'})",
        code=code,
    )


def _missing_labels(site: SiteView, wanted: Mapping[str, str]) -> str | None:
    missing = [f"{k}={v}" for k, v in sorted(wanted.items()) if site.labels.get(k) != v]
    return f"lacks the labels {', '.join(missing)}" if missing else None


def _no_replica(site: SiteView, holders: Collection[str] | None) -> str | None:
    if holders is None or site.name in holders:
        return None
    return "holds no live replica of the dataset"


def _gib(size: int) -> str:
    return f"{size / 1024**3:.3g}G"
