"""The agent protocol's task commands, at both ends.

:data:`TASK_OPS` are the command ops of :mod:`labgate.wire.agent` for batch
tasks. :func:`execute` runs one at the site (``labgate agent``);
:class:`TaskCalls` sends them from the portal over a network link. Results
archives cross as base64 text (the protocol's messages are JSON).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

from labgate.agent.tasks import TaskRunner
from labgate.errors import BadRequest
from labgate.wire.runs import TaskSpec

TASK_OPS = frozenset(
    {"run_task", "cancel_task", "adopt_task", "task_logs", "task_results", "forget_task"}
)


async def execute(runner: TaskRunner, op: str, args: dict[str, Any]) -> Any:
    """Run one task command at the site; its JSON answer."""
    if op == "run_task":
        await runner.run(TaskSpec.model_validate(args["spec"]))
        return None
    attempt_id = str(args.get("attempt_id", ""))
    if op == "cancel_task":
        await runner.cancel(attempt_id)
        return None
    if op == "adopt_task":
        await runner.adopt(attempt_id)
        return None
    if op == "task_logs":
        return await runner.logs(attempt_id, int(args.get("lines", 200)))
    if op == "task_results":
        return base64.b64encode(await runner.results(attempt_id)).decode()
    if op == "forget_task":
        await runner.forget(attempt_id)
        return None
    raise BadRequest(f"unknown task command {op!r}")


Call = Callable[[str, dict[str, Any], float | None], Awaitable[Any]]


class TaskCalls:
    """The portal's end: each task command as one call on a network link."""

    def __init__(self, call: Call, timeout: float) -> None:
        self._call = call
        self.timeout = timeout

    async def run(self, spec: TaskSpec) -> None:
        """Start an attempt at the site."""
        await self._call("run_task", {"spec": spec.model_dump(mode="json")}, None)

    async def simple(self, op: str, attempt_id: str) -> None:
        """cancel_task, adopt_task or forget_task."""
        await self._call(op, {"attempt_id": attempt_id}, None)

    async def logs(self, attempt_id: str, lines: int) -> str:
        """The attempt's output, read at the site."""
        return str(await self._call("task_logs", {"attempt_id": attempt_id, "lines": lines}, None))

    async def results(self, attempt_id: str) -> bytes:
        """The attempt's results archive, from the site."""
        value = await self._call("task_results", {"attempt_id": attempt_id}, self.timeout * 10)
        return base64.b64decode(str(value))
