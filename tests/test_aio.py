"""labgate.aio: cancelling background tasks and waiting for their end."""

from __future__ import annotations

import asyncio

import pytest

from labgate.aio import cancel_and_wait, wait_for


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


async def test_a_cancel_that_arrives_as_the_awaited_completes_is_not_lost():
    """Python 3.11's asyncio.wait_for would return the result and run on (gh-86296)."""
    inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    ran_on = asyncio.Event()

    async def loop_body() -> None:
        await wait_for(inner, 10)
        ran_on.set()  # a loop that lost its cancellation would go round again
        await asyncio.sleep(3600)

    task = asyncio.create_task(loop_body())
    await asyncio.sleep(0)  # it waits on ``inner`` now
    inner.set_result(1)
    task.cancel()  # in the same turn of the loop as the completion
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled() and not ran_on.is_set()


async def test_wait_for_times_out_and_cancels_what_it_waited_on():
    started = asyncio.Event()

    async def slow() -> None:
        started.set()
        await asyncio.sleep(3600)

    inner = asyncio.ensure_future(slow())
    with pytest.raises(TimeoutError):
        await wait_for(inner, 0.05)
    assert started.is_set() and inner.cancelled()
    assert await wait_for(asyncio.sleep(0, "done"), None) == "done"
