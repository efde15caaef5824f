"""Small asyncio helpers shared by labgate's background loops."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


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
