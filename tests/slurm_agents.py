"""Helpers of the tests that drive the slurm backend under a site agent (no portal)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from labgate.backends.base import LaunchSpec
from labgate.tools.catalog import Tool
from labgate.wire.launch import Resources
from labgate.wire.site import Report

SITE = "hpc"


class Recorder:
    """The agent's reports, as the portal would receive them."""

    def __init__(self) -> None:
        self.reports: list[Report] = []

    async def __call__(self, report: Report) -> None:
        self.reports.append(report)

    def of(self, instance_id: str) -> list[Report]:
        """Reports on one instance."""
        return [r for r in self.reports if r.instance_id == instance_id]

    async def wait(
        self, instance_id: str, state: str = "", note: str = "", timeout: float = 30
    ) -> Report:
        """The first report on ``instance_id`` moving it to ``state``, or noting ``note``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for report in self.of(instance_id):
                if state and report.kind == "state" and report.state == state:
                    return report
                if note and report.kind == "progress" and note in report.message:
                    return report
            await asyncio.sleep(0.05)
        raise AssertionError(f"no report of {state or note!r}: {self.of(instance_id)}")

    def saved(self, instance_id: str) -> tuple[dict[str, Any], str]:
        """The last backend state and endpoint reported: what the portal would have saved."""
        state: dict[str, Any] = {}
        endpoint = ""
        for report in self.of(instance_id):
            if report.backend_state is not None:
                state = report.backend_state
            if report.endpoint is not None:
                endpoint = report.endpoint
        return state, endpoint


def spec_of(tool: Tool, cpu: float = 1, owner: str = "alice") -> LaunchSpec:
    """A launch of ``tool`` by ``owner`` with one CPU."""
    iid = f"t{uuid.uuid4().hex[:10]}"
    return LaunchSpec(
        instance_id=iid,
        owner=owner,
        tool=tool,
        base_url=f"/i/{iid}/",
        workspace=Path(owner),
        resources=Resources(cpu=cpu, memory=256 * 1024**2),
        secret=uuid.uuid4().hex,
    )


async def healthy(endpoint: str, spec: LaunchSpec) -> bool:
    """Whether the demo answers at ``endpoint`` with the instance's token."""
    async with httpx.AsyncClient(timeout=5) as client:
        r = await client.get(
            f"{endpoint}{spec.base_url}api/health",
            headers={"Authorization": f"token {spec.secret}"},
        )
        return r.status_code == 200
