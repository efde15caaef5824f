"""Speak the Jupyter server and kernel protocols to a real JupyterLab."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import websockets
from jupyter_client.session import Session


async def execute(http_base: str, ws_base: str, headers: dict[str, str], code: str) -> str:
    """Start a kernel over REST, run ``code`` over its WebSocket, return text/plain output."""
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        created = await client.post(f"{http_base}api/kernels", json={"name": "python3"})
        assert created.status_code == 201, created.text
        kernel_id = created.json()["id"]
        try:
            return await _run(f"{ws_base}api/kernels/{kernel_id}/channels", headers, code)
        finally:
            await client.delete(f"{http_base}api/kernels/{kernel_id}")


async def _run(url: str, headers: dict[str, str], code: str) -> str:
    session = Session(username="labgate-tests")
    request = session.msg(
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )
    request["channel"] = "shell"
    deadline = time.monotonic() + 60
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps(request, default=str))
        while time.monotonic() < deadline:
            reply: dict[str, Any] = json.loads(await ws.recv())
            if reply.get("parent_header", {}).get("msg_id") != request["header"]["msg_id"]:
                continue
            kind = reply["header"]["msg_type"]
            if kind == "execute_result":
                return str(reply["content"]["data"]["text/plain"])
            if kind == "error":
                raise AssertionError(f"kernel error: {reply['content']}")
    raise AssertionError("no execute_result within 60 s")
