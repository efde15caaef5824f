"""Prometheus metrics of one portal (``GET /metrics``, prometheus-client).

Counted as things happen: launch durations (``cold``: from the API call to
ready; ``warm``: a warm-pool claim until the route is the user's; ``pool``: a
pool instance warming up) and culls by reason. Read at scrape
time: instances by state, site and kind (user or pool) from the database,
pending launches, warm-pool fill, and the routers' requests, latency, bytes
and open WebSockets.

Each app has its own registry (tests build many apps in one process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from labgate import __version__
from labgate.db.models import Instance, InstanceState, Site
from labgate.wire.stats import LATENCY_BOUNDS

if TYPE_CHECKING:
    from labgate.portal.state import Portal
    from labgate.scheduler.instances import RouteFeed
    from labgate.scheduler.pools import PoolManager

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAUNCH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: States an instance is counted in (finished ones only grow, and are in usage records).
LIVE_STATES = (
    InstanceState.queued,
    InstanceState.pending,
    InstanceState.starting,
    InstanceState.running,
    InstanceState.unreachable,
    InstanceState.stopping,
)

#: A user launch admitted but not ready yet.
WAITING_STATES = (InstanceState.queued, InstanceState.pending, InstanceState.starting)


class Metrics:
    """The portal's metrics registry and the counters the scheduler bumps."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.pools: PoolManager | None = None
        #: Each site's health as the scrape found it (``ok`` or the problem).
        self.site_health: dict[str, str] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.launches = Histogram(
            "labgate_launch_duration_seconds",
            "Seconds from a launch request until the instance is ready for its user.",
            ["tool", "kind"],
            buckets=LAUNCH_BUCKETS,
            registry=self.registry,
        )
        self.culls = Counter(
            "labgate_culls",
            "Instances stopped by the culler, by reason (idle, lifetime).",
            ["reason"],
            registry=self.registry,
        )
        self._bytes = RouterBytes()
        self.registry.register(_ScrapeTime(self))

    def launch_seconds(self, tool: str, kind: str, seconds: float) -> None:
        """One launch became ready after ``seconds`` (kind: cold, warm or pool)."""
        self.launches.labels(tool=tool, kind=kind).observe(seconds)

    def culled(self, reason: str) -> None:
        """The culler stopped an instance."""
        self.culls.labels(reason=reason).inc()

    def render(self) -> bytes:
        """The text exposition (reads the database: call it off the event loop)."""
        return generate_latest(self.registry)


class RouterBytes:
    """Monotonic byte totals from per-instance counters that come and go."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, int]] = {}
        self.total_in = 0
        self.total_out = 0

    def update(self, current: dict[str, tuple[int, int]]) -> tuple[int, int]:
        """Add what grew since the last scrape; a counter that shrank restarted."""
        for instance_id, (now_in, now_out) in current.items():
            was_in, was_out = self.seen.get(instance_id, (0, 0))
            self.total_in += now_in - was_in if now_in >= was_in else now_in
            self.total_out += now_out - was_out if now_out >= was_out else now_out
        self.seen = dict(current)
        return self.total_in, self.total_out


class _ScrapeTime(Collector):
    """Gauges read from the database and the routers at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        portal = self.metrics.portal
        yield GaugeMetricFamily("labgate_up", "1 while the portal serves.", value=1)
        info = GaugeMetricFamily("labgate_build_info", "labgate's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        status = portal.leader.status()
        leader = GaugeMetricFamily(
            "labgate_leader",
            "1 while this portal process leads (runs culling, warm pools, reconciles), else 0.",
            labels=["replica"],
        )
        leader.add_metric([status.replica], 1 if status.leading else 0)
        yield leader
        yield GaugeMetricFamily(
            "labgate_leader_term",
            "The leader lease's term this process leads in (0: it does not lead, or never elects).",
            value=status.term,
        )
        yield from self._instances(portal)
        yield from self._sites()
        yield from self._router(portal)

    def _sites(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "labgate_site_up",
            "1 while a site can run instances (its engine answers, its agent is connected).",
            labels=["site"],
        )
        for name, health in sorted(self.metrics.site_health.items()):
            up.add_metric([name], 1 if health == "ok" else 0)
        yield up

    def _instances(self, portal: Portal) -> Iterator[Metric]:
        with portal.db.session() as session:
            rows = session.execute(
                select(
                    Instance.state, Site.name, Instance.pool.is_not(None), func.count(Instance.id)
                )
                .join(Site, Site.id == Instance.site_id, isouter=True)
                .where(Instance.state.in_(LIVE_STATES))
                .group_by(Instance.state, Site.name, Instance.pool.is_not(None))
            ).all()
            pools = self.metrics.pools.status(session) if self.metrics.pools else []
        gauge = GaugeMetricFamily(
            "labgate_instances",
            "Instances by state, site and kind (user, or pool: unclaimed warm-pool instances).",
            labels=["state", "site", "kind"],
        )
        pending = 0
        seen: set[tuple[str, str, str]] = set()
        for state, site, pooled, count in rows:
            key = (state.value, site or "", "pool" if pooled else "user")
            seen.add(key)
            gauge.add_metric(list(key), count)
            if not pooled and state in WAITING_STATES:
                pending += count
        for site_name in portal.links:
            for state in LIVE_STATES:
                for kind in ("user", "pool"):
                    if (state.value, site_name, kind) not in seen:
                        gauge.add_metric([state.value, site_name, kind], 0)
        yield gauge
        yield GaugeMetricFamily(
            "labgate_pending_launches",
            "User launches admitted but not ready yet (queued, pending or starting).",
            value=pending,
        )
        size = GaugeMetricFamily(
            "labgate_pool_size", "Configured size of each warm pool.", labels=["tool", "site"]
        )
        ready = GaugeMetricFamily(
            "labgate_pool_ready",
            "Warm-pool instances ready to be claimed.",
            labels=["tool", "site"],
        )
        for pool in pools:
            size.add_metric([pool["tool"], pool["site"]], pool["size"])
            ready.add_metric([pool["tool"], pool["site"]], pool["ready"])
        yield size
        yield ready

    def _router(self, portal: Portal) -> Iterator[Metric]:
        stats = portal.activity.stats()
        yield CounterMetricFamily(
            "labgate_router_requests",
            "Requests the routers passed to instances.",
            value=stats.requests,
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BOUNDS, float("inf")), stats.buckets, strict=True):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "labgate_router_response_seconds",
            "Seconds from routing a request to an instance until its response head came back.",
            buckets=buckets,
            sum_value=stats.latency_sum,
        )
        activities = portal.activity.everything()
        total_in, total_out = self.metrics._bytes.update(
            {iid: (a.bytes_in, a.bytes_out) for iid, a in activities.items()}
        )
        traffic = CounterMetricFamily(
            "labgate_router_bytes",
            "Bytes the routers carried to (in) and from (out) instances, HTTP framing included.",
            labels=["direction"],
        )
        traffic.add_metric(["in"], total_in)
        traffic.add_metric(["out"], total_out)
        yield traffic
        yield GaugeMetricFamily(
            "labgate_router_open_websockets",
            "WebSockets (and other upgraded connections) open to instances.",
            value=sum(a.open_websockets for a in activities.values()),
        )


class LaunchTimer:
    """A route feed that also times cold launches (wraps the portal's own feed)."""

    def __init__(self, inner: RouteFeed | None, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self._starting: set[str] = set()

    def instance_changed(self, instance: Instance) -> None:
        """Pass the change on; note when an instance this portal saw starting is ready."""
        if self.inner is not None:
            self.inner.instance_changed(instance)
        if instance.state in (InstanceState.pending, InstanceState.starting):
            self._starting.add(instance.id)
        elif instance.id in self._starting:
            self._starting.discard(instance.id)
            if instance.state == InstanceState.running and instance.ready_at is not None:
                kind = "pool" if instance.pool is not None else "cold"
                seconds = (instance.ready_at - instance.created_at).total_seconds()
                self.metrics.launch_seconds(instance.tool, kind, seconds)
