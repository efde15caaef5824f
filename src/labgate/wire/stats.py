"""Router-wide counters for ``/metrics``: instance requests and their latency.

The proxy counts each request routed to an instance and, when the tool's
response head arrives, the time since the request was routed (time to first
byte through the router, the tool's own time included), in the first bucket
whose bound is at least that (:meth:`labgate.router.context.Context.observe`,
in the router's compiled code); this is the form those counts travel and add
up in. Bytes per instance are in :mod:`labgate.wire.activity`.
"""

from __future__ import annotations

from typing import Any

#: Upper bounds (seconds) of the latency buckets; a last, open bucket follows.
#: (Of any length to the type checker: the compiled router then keeps it one Python
#: object rather than unpacking it into thirteen floats, and boxing them again, per use.)
LATENCY_BOUNDS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class RouterStats:
    """Requests to instances and a latency histogram, for one router process."""

    __slots__ = ("buckets", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "requests": self.requests,
            "buckets": list(self.buckets),
            "latency_sum": self.latency_sum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterStats:
        """From the JSON form (unknown bucket layouts are ignored)."""
        stats = cls()
        stats.requests = int(data.get("requests", 0))
        buckets = [int(b) for b in data.get("buckets", [])]
        if len(buckets) == len(stats.buckets):
            stats.buckets = buckets
            stats.latency_sum = float(data.get("latency_sum", 0.0))
        return stats

    def add(self, other: RouterStats) -> None:
        """Add another process's counts to these."""
        self.requests += other.requests
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.latency_sum += other.latency_sum
