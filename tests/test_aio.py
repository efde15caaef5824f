"""labgate.aio: cancelling background tasks and waiting for their end."""

from __future__ import annotations

import asyncio

import pytest

from labgate.aio import cancel_and_wait


async def test_every_task_is_cancelled_and_has_ended_when_it_returns() -> None:
    ended: list[str] = []

    async def loop(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # cleanup that takes a moment
            ended.append(name)

    tasks = [asyncio.create_task(loop(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, tasks[1])
    assert sorted(ended) == ["a", "b"]
    assert all(task.cancelled() for task in tasks)


async def test_an_error_the_task_ended_with_is_raised() -> None:
    async def broken() -> None:
        raise ValueError("broken loop")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken loop"):
        await cancel_and_wait(task)


async def test_nothing_to_cancel_is_fine() -> None:
    await cancel_and_wait()
    await cancel_and_wait(None)
