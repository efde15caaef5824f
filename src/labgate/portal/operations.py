"""The portal's operations services: metrics, quotas' defaults, warm pools, the culler, visits.

The app's lifespan calls :func:`wire` once the instance manager exists (before
running instances are restored, so their launch times and environment are
right) and :func:`start_operations` after the restore; the returned
:class:`Operations` is closed on shut-down. Everything is also reachable from
``app.state`` (``metrics``, ``pools``, ``culler``) for the API and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI

from labgate.portal.metrics import LaunchTimer, Metrics
from labgate.portal.state import Portal
from labgate.portal.visits import VisitLog
from labgate.scheduler.culling import Culler
from labgate.scheduler.pools import PoolManager
from labgate.scheduler.quotas import default_limits


@dataclass
class Operations:
    """What runs in the background for operations, until :meth:`close`."""

    metrics: Metrics
    pools: PoolManager
    culler: Culler
    visits: VisitLog

    async def close(self) -> None:
        """Stop culling and refilling; instances keep running."""
        await self.culler.close()
        await self.pools.close()
        await self.visits.close()


def wire(app: FastAPI, portal: Portal) -> Metrics:
    """Give the new instance manager its limits, environment and launch timer."""
    settings, manager = portal.settings, portal.instances
    metrics = Metrics(portal)
    app.state.metrics = metrics
    manager.default_limits = default_limits(settings)
    # Where a tool reports "busy" (POST $LABGATE_API_URL/instances/<id>/activity).
    manager.extra_env = {"LABGATE_API_URL": f"{settings.effective_public_url}/api/v1"}
    manager.routes = LaunchTimer(manager.routes, metrics)
    return metrics


async def start_operations(app: FastAPI, portal: Portal, metrics: Metrics) -> Operations:
    """Start the warm pools and the culler (after running instances were restored)."""
    settings, manager = portal.settings, portal.instances
    pools = PoolManager(
        manager,
        settings.pools,
        default_site=portal.local_sites[0].name if portal.local_sites else "",
        interval=settings.pool_check_interval,
        metrics=metrics,
        leader=portal.leader,
    )
    manager.pools = pools
    metrics.pools = pools
    app.state.pools = pools
    await pools.start()
    culler = Culler(manager, portal.activity, settings, metrics, portal.leader)
    app.state.culler = culler
    culler.start()
    visits = VisitLog(portal)
    app.state.visits = visits
    visits.start()
    return Operations(metrics, pools, culler, visits)
