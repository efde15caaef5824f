"""Numbers past what labgate stores are refused with a 4xx naming them, never a 500.

(Run definitions and share or link ids here; launch resources, quotas and
token ids are in tests/portal/test_api_contract.py.)
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from labgate.types import MAX_ID
from labgate.wire.runs import MAX_MEMORY_MIB

TASK = '[[stages]]\nname = "one"\n[[stages.tasks]]\nname = "t"\ncommand = "true"\n{extra}\n'


@pytest.mark.parametrize("memory", [MAX_MEMORY_MIB + 1, 99999999999999999999, -1])
async def test_a_task_asking_more_memory_than_can_be_stored_is_refused(
    client: httpx.AsyncClient, make_user: Any, memory: int
) -> None:
    alice = await make_user("alice")
    answer = await client.post(
        "/api/v1/runs", content=TASK.format(extra=f"memory_mib = {memory}"), headers=alice
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_run"
    assert "memory_mib" in answer.json()["detail"]
    # Nothing was stored.
    assert (await client.get("/api/v1/runs", headers=alice)).json() == []


async def test_the_most_memory_a_task_may_ask_for_is_taken(
    client: httpx.AsyncClient, make_user: Any
) -> None:
    alice = await make_user("alice")
    answer = await client.post(
        "/api/v1/runs/validate",
        json={
            "stages": [
                {
                    "name": "one",
                    "tasks": [{"name": "t", "command": "true", "memory_mib": MAX_MEMORY_MIB}],
                }
            ]
        },
        headers=alice,
    )
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("kind", ["shares", "links"])
@pytest.mark.parametrize("number", [MAX_ID + 1, 2**70, 0])
async def test_a_share_or_link_id_past_the_ids_stored_is_a_422(
    client: httpx.AsyncClient, make_user: Any, kind: str, number: int
) -> None:
    alice = await make_user("alice")
    answer = await client.delete(f"/api/v1/instances/abcdefgh/{kind}/{number}", headers=alice)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]
