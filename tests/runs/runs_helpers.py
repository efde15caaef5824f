"""Helpers of the batch run tests: submit a definition, wait for a state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx


async def submit(client: httpx.AsyncClient, headers: dict[str, str], definition: str) -> str:
    """Submit a TOML definition; the run's id."""
    answer = await client.post(
        "/api/v1/runs", content=definition, headers={**headers, "Content-Type": "text/plain"}
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


async def wait_run(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    run_id: str,
    states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll a run until its state is one of ``states``; its last view."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await client.get(f"/api/v1/runs/{run_id}", headers=headers)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        if body["state"] in states:
            return body
        assert time.monotonic() < deadline, f"run still {body['state']}: {body}"
        await asyncio.sleep(0.1)


def tasks_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task copy of a run view, by name."""
    return {t["name"]: t for stage in run["stages"] for t in stage["tasks"]}
