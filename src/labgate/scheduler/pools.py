"""Warm pools: instances started ahead of time and handed to the next matching launch.

Each configured pool (``pools = [{tool, site, size}]``) keeps ``size``
instances of its tool started on its site, owned by the reserved, disabled
account ``_pool`` and marked with the pool's key (``tool@site``). A launch
that matches (same tool, that site or none named, the tool's default
resources, no dataset, snapshot or labels) claims one in the admission
transaction, after the user's quotas passed:

1. :meth:`PoolManager.take` (inside the admission lock) gives the oldest ready
   instance to the user, closes the pool's usage record and opens the user's;
   the route still belongs to ``_pool``, so nobody can reach it yet.
2. :meth:`PoolManager.bind` asks the site to hand it over
   (:mod:`labgate.backends.claim`: the user's workspace is mounted in, the
   tool is told), clears the pool mark and publishes the route to the user.
   When the site cannot, the instance is stopped (``claim_failed``) and the
   launch starts cold, as if there had been no pool.
3. The pool refills in the background, only into start room no queued user
   launch is waiting for (:mod:`labgate.scheduler.startqueue`).

A pool whose site cannot hand instances over (``claim_support``) is not
started: its launches are cold, and ``labgate doctor`` says why. A pool
whose instances keep failing to start backs off (5 s doubling to 5 min).
An instance still marked with a pool but owned by a user was interrupted
mid-claim (a restart): it is stopped at start-up, never shown half-claimed.

Each pool instance gets a number of its own when it is recorded, from the
database counter ``pool_uid`` (:mod:`labgate.db.counters`): never given twice,
across restarts and replicas. The process backend runs the instance as a uid
derived from it (:mod:`labgate.backends.identity`), before and after its claim,
so no two claimers, and no claimer and the next, ever share a uid (keyrings,
the right to ptrace or copy descriptors, per-uid limits). A pool instance
without a number (started by an older labgate, as the shared uid of ``_pool``)
is never handed to a user; the leader stops it when it tidies.

A claimed instance keeps the environment it started with: ``LABGATE_USER``
and ``USER`` still say ``_pool``. Tools learn their user from the router's
``X-Labgate-User`` header, or from their ``claim_path`` hook.

Among several portal replicas every replica hands pool instances to its
launches, but only the leader (:mod:`labgate.scheduler.leader`) refills,
shrinks and tidies the pools, each new pool instance recorded in a
transaction that checks the leader's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labgate.agent.link import live_sites
from labgate.aio import cancel_and_wait, wait_for
from labgate.backends.claim import Claim
from labgate.db import counters
from labgate.db.models import (
    ACTIVE_STATES,
    Group,
    Instance,
    InstanceEvent,
    InstanceState,
    Site,
    User,
    utcnow,
)
from labgate.errors import LabgateError
from labgate.scheduler import accounting
from labgate.scheduler.leader import Leadership, SoleLeader
from labgate.scheduler.placement import Placement, choose_site
from labgate.scheduler.sites import site_views
from labgate.scheduler.startqueue import pool_may_start
from labgate.security import new_id

if TYPE_CHECKING:
    from labgate.backends.base import Resources
    from labgate.config import PoolConfig
    from labgate.scheduler.control import InstanceControl
    from labgate.scheduler.launch import LaunchRequest
    from labgate.tools.catalog import Tool

log = logging.getLogger(__name__)

#: The reserved account that owns unclaimed pool instances (user names cannot start with _).
POOL_USER = "_pool"
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0


def pool_key(tool: str, site: str) -> str:
    """The mark of a pool's instances: ``tool@site``."""
    return f"{tool}@{site}"


class LaunchMetrics(Protocol):
    """Where launch times are recorded (``labgate.portal.metrics.Metrics``)."""

    def launch_seconds(self, tool: str, kind: str, seconds: float) -> None:
        """One launch became ready after ``seconds`` (kind: cold, warm or pool)."""


@dataclass
class Pool:
    """One configured pool and what is known about it."""

    tool: str
    site: str
    size: int
    #: Why the pool is not kept (None: it is).
    disabled: str | None = None

    @property
    def key(self) -> str:
        """``tool@site``."""
        return pool_key(self.tool, self.site)


def ensure_pool_user(session: Session) -> int:
    """The id of the ``_pool`` account, created (disabled, no password) when missing."""
    user = session.scalar(select(User).where(User.name == POOL_USER))
    if user is None:
        # "!" is no argon2 hash: no password can ever match it.
        user = User(name=POOL_USER, password_hash="!", disabled=True)  # noqa: S106
        session.add(user)
        session.flush()
    return user.id


class PoolManager:
    """Keeps the configured warm pools full and hands their instances to launches."""

    def __init__(
        self,
        manager: InstanceControl,
        configs: list[PoolConfig],
        *,
        default_site: str,
        interval: float = 10.0,
        metrics: LaunchMetrics | None = None,
        leader: Leadership | None = None,
    ) -> None:
        self.manager = manager
        self.interval = interval
        self.metrics = metrics
        #: Only the leader refills and tidies; ``labgate serve`` always leads.
        self.leader: Leadership = leader or SoleLeader()
        #: The leader's term this manager last tidied up in (None: never).
        self._tidied: int | None = None
        self.pools = [Pool(c.tool, c.site or default_site, c.size) for c in configs]
        self.user_id: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retry_at: dict[str, float] = {}

    @property
    def active(self) -> list[Pool]:
        """The pools being kept."""
        return [pool for pool in self.pools if pool.disabled is None and pool.size > 0]

    # --- start and stop ------------------------------------------------------------
    async def start(self) -> None:
        """Check the pools against catalog and sites, tidy up, and start refilling."""
        for pool in self.pools:
            pool.disabled = self._why_not(pool)
            if pool.disabled is not None:
                log.warning("warm pool %s is not kept: %s", pool.key, pool.disabled)
        try:
            self.user_id = await self.manager.run_db(ensure_pool_user)
        except IntegrityError:  # another replica made it at the same moment
            self.user_id = await self.manager.run_db(ensure_pool_user)
        if self.leader.leading:
            await self._tidy()
        if self.active:
            self._task = asyncio.create_task(self._run(), name="warm-pools")

    async def _tidy(self) -> None:
        """Stop the instances of pools no longer kept and claims a restart interrupted."""
        self._tidied = self.leader.term
        for instance_id in await self.manager.run_db(self._leftovers):
            with contextlib.suppress(LabgateError):
                await self.manager.stop(
                    instance_id,
                    reason="pool_removed",
                    message="no longer part of a warm pool",
                    fence=self.leader.fence,
                )

    def _why_not(self, pool: Pool) -> str | None:
        tool = self.manager.catalog.get(pool.tool)
        if tool is None:
            return f"no tool called {pool.tool!r}"
        link = self.manager.links.get(pool.site)
        if link is None:
            return f"no site called {pool.site!r}"
        reason = link.unavailable_reason(tool)
        return reason or link.claim_support(tool)

    def _leftovers(self, session: Session) -> list[str]:
        """Pool instances of pools no longer kept, claims a restart interrupted, and those
        of an older labgate (no number: they run as the uid every such instance shares)."""
        kept = {pool.key for pool in self.active}
        rows = session.execute(
            select(Instance.id, Instance.pool, Instance.owner_id, Instance.pool_uid).where(
                Instance.pool.is_not(None), Instance.state.in_(ACTIVE_STATES)
            )
        ).all()
        return [
            iid
            for iid, key, owner, number in rows
            if key not in kept or owner != self.user_id or number is None
        ]

    def poke(self) -> None:
        """Check the pools now rather than at the next interval."""
        self._wake.set()

    async def close(self) -> None:
        """Stop refilling; pool instances keep running (and are adopted after a restart)."""
        await cancel_and_wait(self._task)
        self._task = None

    # --- claiming --------------------------------------------------------------------
    def matches(self, tool: Tool, request: LaunchRequest, resources: Resources) -> bool:
        """Whether a launch could be served from a pool (one may still be empty)."""
        if request.dataset or request.snapshot or request.labels:
            return False
        if resources != tool.resources.default():
            return False
        return any(
            pool.tool == tool.name and request.site in (None, pool.site) for pool in self.active
        )

    def take(
        self, session: Session, user: User, tool: Tool, group: Group | None
    ) -> Instance | None:
        """Give the oldest ready pool instance of ``tool`` to ``user`` (in the admission lock)."""
        keys = [pool.key for pool in self.active if pool.tool == tool.name]
        instance = session.scalar(
            select(Instance)
            .where(
                Instance.pool.in_(keys),
                Instance.owner_id == self.user_id,
                Instance.state == InstanceState.running,
                # Its own uid: one without (an older labgate's) shares _pool's with the rest.
                Instance.pool_uid.is_not(None),
            )
            .order_by(Instance.ready_at, Instance.id)
            .limit(1)
            .with_for_update(skip_locked=True, of=Instance)
        )
        if instance is None:
            return None
        now = utcnow()
        key = instance.pool
        instance.owner_id = user.id
        instance.ready_at = now
        instance.last_activity_at = now
        accounting.close_records(session, instance.id, "claimed", now)
        session.flush()
        session.refresh(instance, ["owner", "site"])
        accounting.open_record(session, instance, user, group.name if group else "", now)
        session.add(
            InstanceEvent(
                instance=instance,
                kind="progress",
                state=InstanceState.running,
                message=f"taken from the warm pool {key} for {user.name}",
                data={"pool": key},
            )
        )
        session.flush()
        return instance

    async def bind(self, instance: Instance) -> Instance | None:
        """Finish a claim at the site; None (and the instance stopping) when it could not."""
        begun = time.monotonic()
        site = instance.site.name if instance.site is not None else ""
        link = self.manager.links.get(site)
        owner = instance.owner.name
        claim = Claim(instance.id, owner, Path(owner), instance.owner.id)
        try:
            if link is None:
                raise LabgateError(f"site {site} is not connected")
            state = await link.claim(instance.id, claim)
        except Exception as exc:
            detail = exc.detail if isinstance(exc, LabgateError) else repr(exc)
            log.warning("warm-pool claim of %s failed: %s", instance.id, detail)
            with contextlib.suppress(LabgateError):
                await self.manager.stop(
                    instance.id, reason="claim_failed", message=f"warm-pool claim failed: {detail}"
                )
            self.poke()
            return None
        bound = await self.manager.run_db(lambda s: self._bound(s, instance.id, state))
        self.manager.changed(bound)
        if self.metrics is not None:
            self.metrics.launch_seconds(bound.tool, "warm", time.monotonic() - begun)
        self.poke()
        return bound

    def _bound(self, session: Session, instance_id: str, state: dict[str, Any]) -> Instance:
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise LabgateError(f"pool instance {instance_id} is gone")
        instance.backend_state = state
        instance.pool = None
        session.add(
            InstanceEvent(
                instance=instance,
                kind="progress",
                state=instance.state,
                message=f"ready for {instance.owner.name} (from the warm pool)",
                data={"claimed": True},
            )
        )
        session.flush()
        session.refresh(instance, ["owner", "site"])
        return instance

    # --- refilling -------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self.refill()
            except Exception:
                log.exception("refilling the warm pools failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await wait_for(self._wake.wait(), self.interval)

    async def refill(self) -> None:
        """Start what each pool lacks; stop what it has too many of (the leader only)."""
        if not self.leader.leading:
            return
        if self._tidied != self.leader.term:
            await self._tidy()  # this replica just began leading
        counts, failures = await self.manager.run_db(self._census)
        now = time.monotonic()
        for pool in self.active:
            have = counts.get(pool.key, [])
            missing = pool.size - len(have)
            if missing < 0:
                for instance_id in have[missing:]:
                    with contextlib.suppress(LabgateError):
                        await self.manager.stop(
                            instance_id, reason="pool_shrunk", fence=self.leader.fence
                        )
                continue
            streak = failures.get(pool.key, 0)
            if streak:
                # Keep trying, one at a time and less often, while the tool fails to start.
                if now < self._retry_at.get(pool.key, 0.0):
                    continue
                self._retry_at[pool.key] = now + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (streak - 1))
                missing = min(missing, 1)
            for _ in range(missing):
                try:
                    instance_id = await self.manager.run_admission(partial(self._admit, pool=pool))
                except LabgateError as exc:
                    log.info("warm pool %s cannot grow now: %s", pool.key, exc.detail)
                    break
                self.manager.start_admitted(instance_id)

    def _census(self, session: Session) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Unclaimed instances per pool (oldest first), and each pool's streak of failures."""
        counts: dict[str, list[str]] = {}
        rows = session.execute(
            select(Instance.id, Instance.pool)
            .where(
                Instance.pool.is_not(None),
                Instance.owner_id == self.user_id,
                Instance.state.in_(ACTIVE_STATES),
            )
            .order_by(Instance.created_at)
        ).all()
        for instance_id, key in rows:
            counts.setdefault(str(key), []).append(instance_id)
        failures: dict[str, int] = {}
        for pool in self.active:
            recent = session.scalars(
                select(Instance.state)
                .where(Instance.pool == pool.key)
                .order_by(Instance.created_at.desc())
                .limit(8)
            ).all()
            streak = 0
            for state in recent:
                if state not in (InstanceState.failed, InstanceState.lost):
                    break
                streak += 1
            failures[pool.key] = streak
        return counts, failures

    def _admit(self, session: Session, pool: Pool) -> str:
        """Record a new pool instance on the pool's site (capacity permitting; leader only)."""
        self.leader.fence(session)
        tool = self.manager.catalog.get(pool.tool)
        if tool is None:
            raise LabgateError(f"pool {pool.key}: tool {pool.tool} is not in the catalog")
        if self.user_id is None:
            raise RuntimeError("the pool manager is not started (no pool account)")
        resources = tool.resources.default()
        # Called through run_admission, like user launches: capacity is counted and taken at once.
        views = site_views(session, live_sites(self.manager.links), self.manager.links)
        site = choose_site(views, Placement(tool=tool, resources=resources, wanted=pool.site))
        owner = session.get(User, self.user_id)
        if owner is None:
            raise RuntimeError(f"the pool account (user {self.user_id}) is gone")
        where = session.scalar(select(Site).where(Site.name == site))
        if where is not None and not pool_may_start(session, where, tool, self.manager.catalog):
            # Behind a burst: user launches wait for the room; the pool refills after them.
            raise LabgateError(f"site {site} has no start room to spare for the pool now")
        instance_id = new_id()
        instance = Instance(
            id=instance_id,
            owner_id=self.user_id,
            tool=tool.name,
            site=where,
            state=InstanceState.pending,
            resources=resources.as_json(),
            secret=self.manager.box.new_secret(instance_id),
            pool=pool.key,
            # Never given twice: the instance runs as a uid of its own (see the module's doc).
            pool_uid=counters.take(session, counters.POOL_UID),
        )
        session.add(instance)
        accounting.open_record(session, instance, owner)
        session.add(
            InstanceEvent(
                instance=instance,
                state=InstanceState.pending,
                message=f"started ahead of time for the warm pool {pool.key}",
                data={"site": site, "pool": pool.key},
            )
        )
        session.flush()
        return instance.id

    # --- reporting -------------------------------------------------------------------
    def status(self, session: Session) -> list[dict[str, Any]]:
        """Every configured pool: size, instances by state, and why it is off if it is."""
        rows = session.execute(
            select(Instance.pool, Instance.state, func.count())
            .where(Instance.pool.is_not(None), Instance.state.in_(ACTIVE_STATES))
            .group_by(Instance.pool, Instance.state)
        ).all()
        by_key: dict[str, dict[str, int]] = {}
        for key, state, count in rows:
            by_key.setdefault(str(key), {})[state.value] = count
        return [
            {
                "tool": pool.tool,
                "site": pool.site,
                "size": pool.size,
                "ready": by_key.get(pool.key, {}).get("running", 0),
                "starting": sum(
                    by_key.get(pool.key, {}).get(s, 0) for s in ("pending", "starting")
                ),
                "disabled": pool.disabled,
            }
            for pool in self.pools
        ]
