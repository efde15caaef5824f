"""The router's latency histogram: counted in the compiled context, reported as RouterStats."""

from __future__ import annotations

from bisect import bisect_left

import httpx

from labgate.wire.stats import LATENCY_BOUNDS

from .conftest import ALICE, Gateway


async def test_the_context_buckets_latencies_as_router_stats_does(gateway: Gateway) -> None:
    ctx = gateway.router.ctx
    before = ctx.stats
    samples = [-1.0, 0.0, 0.0005, *LATENCY_BOUNDS, 0.0010001, 0.003, 9.99, 10.5, 3600.0]
    # Prometheus' buckets: a sample counts in the first whose bound ("le") is at least it.
    expected = [0] * (len(LATENCY_BOUNDS) + 1)
    for seconds in samples:
        ctx.observe(seconds)
        expected[bisect_left(LATENCY_BOUNDS, seconds)] += 1
    after = ctx.stats
    assert [a - b for a, b in zip(after.buckets, before.buckets, strict=True)] == expected
    assert after.latency_sum - before.latency_sum == sum(samples)


async def test_each_request_to_an_instance_is_counted_once_with_its_latency(
    gateway: Gateway,
) -> None:
    before = gateway.router.ctx.stats
    async with httpx.AsyncClient(base_url=gateway.base) as client:
        for _ in range(3):
            response = await client.get("/i/aaaa/api/health", headers=gateway.cookie_header(ALICE))
            assert response.status_code == 200
    after = gateway.router.ctx.stats
    assert after.requests - before.requests == 3
    assert sum(after.buckets) - sum(before.buckets) == 3
    assert after.latency_sum > before.latency_sum
    # A copy: what a caller does with it changes nothing in the router.
    after.buckets[0] += 100
    assert gateway.router.ctx.stats.buckets[0] == after.buckets[0] - 100
