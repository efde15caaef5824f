"""Helpers shared by tests: sign-in, tokens, waiting for instance states."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "user-password-123"


async def token_for(
    client: httpx.AsyncClient, username: str, password: str, scopes: list[str] | None = None
) -> dict[str, str]:
    """Sign in and create an API token; returns the Authorization header."""
    login = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert login.status_code == 200, login.text
    csrf = login.json()["csrf_token"]
    body: dict[str, Any] = {"note": "tests"}
    if scopes is not None:
        body["scopes"] = scopes
    created = await client.post("/api/v1/tokens", json=body, headers={"X-CSRF-Token": csrf})
    assert created.status_code == 201, created.text
    client.cookies.clear()
    return {"Authorization": f"token {created.json()['token']}"}


async def wait_for_state(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    instance_id: str,
    states: set[str],
    timeout: float = 60,
) -> dict[str, Any]:
    """Poll an instance until it is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/api/v1/instances/{instance_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["state"] in states:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"instance {instance_id} stuck in {body['state']}: {body}")
        await asyncio.sleep(0.1)
