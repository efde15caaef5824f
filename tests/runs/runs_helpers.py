"""Helpers of the batch run tests: submit a definition, wait for a state."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
import zipfile
from pathlib import Path
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


def make_wheel(directory: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel (pip installs it offline, no build step)."""
    dist = f"{name}-1.0"
    files = {
        f"{name}.py": source,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    wheel = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel
