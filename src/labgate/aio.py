"""Small asyncio helpers shared by labgate's background loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_for(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``asyncio.wait_for`` as Python 3.12 has it: ``awaitable`` under ``asyncio.timeout``.

    Python 3.11's ``wait_for`` loses a cancellation that arrives just as the
    awaited thing completes (CPython gh-86296): a loop cancelled at that moment
    runs on, and whoever awaits its end waits for ever (seen in CI: an agent's
    ``close`` hung on its watch loop, cancelled while a ``squeue`` returned).
    Raises ``TimeoutError`` once ``seconds`` (None: no limit) have passed.
    """
    async with asyncio.timeout(seconds):
        return await awaitable


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` (None ones are skipped) and wait until each has ended.

    A task's own ``CancelledError`` is swallowed; other exceptions it ended
    with propagate, as awaiting it would.
    """
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task
