"""Keeping router worker processes alive: a dead worker is replaced, and said so.

``labgate serve`` with ``router_workers > 1`` runs one router in its own
process and ``router_workers - 1`` worker processes on the same port. A
worker that dies (a crash, the OOM killer, ``kill -9``) would silently take
its share of the capacity with it; the supervisor notices within
``check_interval`` and starts a fresh worker in the same slot, which follows
the route stream like the first one did.

Restarts back off so a worker that cannot start does not spin: a death less
than ``stable_after`` seconds after the start counts as a quick failure. The
first is restarted at once, the next ones after 1, 2, 4 ... seconds (at most
``backoff_max``); after ``max_quick_failures`` in a row the slot is given up
with an error in the log, and the server goes on with the router processes
it still has (the in-process router of ``serve`` never depends on a worker).
A worker that ran ``stable_after`` seconds or more starts a fresh count.

Every death and restart is a log line on ``labgate.router``, naming the
worker, its pid, and its exit code or the signal that killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

from labgate.aio import cancel_and_wait
from labgate.router.workers import WorkerConfig, spawn_worker, stop_workers

log = logging.getLogger("labgate.router")


def describe_exit(exitcode: int | None) -> str:
    """``exit code 1`` or ``killed by SIGKILL``, from a process's exit code."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


@dataclass
class _Slot:
    """One worker position: its current process and how its last starts went."""

    index: int
    process: BaseProcess
    started: float
    quick_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False


class WorkerSupervisor:
    """Starts ``count`` router workers and replaces any that die, with a backoff."""

    def __init__(
        self,
        config: WorkerConfig,
        count: int,
        *,
        check_interval: float = 0.2,
        stable_after: float = 10.0,
        max_quick_failures: int = 5,
        backoff_max: float = 30.0,
    ) -> None:
        self.config = config
        self.count = count
        self.check_interval = check_interval
        self.stable_after = stable_after
        self.max_quick_failures = max_quick_failures
        self.backoff_max = backoff_max
        self.restarts = 0
        self._slots: list[_Slot] = []
        self._task: asyncio.Task[None] | None = None

    # --- what runs -------------------------------------------------------------------

    @property
    def processes(self) -> list[BaseProcess]:
        """The current process of every slot (dead ones included until replaced)."""
        return [slot.process for slot in self._slots]

    @property
    def given_up(self) -> list[int]:
        """Slots no longer restarted (too many quick failures in a row)."""
        return [slot.index for slot in self._slots if slot.given_up]

    @property
    def alive(self) -> int:
        """How many workers run now."""
        return sum(slot.process.is_alive() for slot in self._slots)

    # --- start, watch, stop ------------------------------------------------------------

    def start(self) -> None:
        """Spawn every worker and start watching them (in the running loop's thread)."""
        now = time.monotonic()
        self._slots = [
            _Slot(index, spawn_worker(self.config, index), now) for index in range(self.count)
        ]
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="router-workers")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            self.check(time.monotonic())

    def check(self, now: float) -> None:
        """Notice dead workers and restart those whose turn has come."""
        for slot in self._slots:
            if slot.given_up:
                continue
            if slot.restart_at is None and slot.process.exitcode is not None:
                self._died(slot, now)
            if slot.restart_at is not None and now >= slot.restart_at:
                self._restart(slot, now)

    def _died(self, slot: _Slot, now: float) -> None:
        process = slot.process
        how = describe_exit(process.exitcode)
        uptime = now - slot.started
        slot.quick_failures = slot.quick_failures + 1 if uptime < self.stable_after else 0
        if slot.quick_failures >= self.max_quick_failures:
            slot.given_up = True
            log.error(
                "router worker %d (pid %s) %s, its %d%s quick failure in a row: not restarting "
                "it; %d of %d router worker processes remain",
                slot.index,
                process.pid,
                how,
                slot.quick_failures,
                _ordinal(slot.quick_failures),
                self.alive,
                self.count,
            )
            return
        # The first quick failure restarts at once, then 1, 2, 4 ... seconds.
        delay = 0.0 if slot.quick_failures <= 1 else 2.0 ** (slot.quick_failures - 2)
        delay = min(delay, self.backoff_max)
        slot.restart_at = now + delay
        log.warning(
            "router worker %d (pid %s) %s after %.1f s; restarting it%s",
            slot.index,
            process.pid,
            how,
            uptime,
            f" in {delay:.0f} s" if delay else "",
        )

    def _restart(self, slot: _Slot, now: float) -> None:
        old = slot.process
        with contextlib.suppress(ValueError):
            old.close()  # its sentinel pipe; the process is reaped already
        slot.process = spawn_worker(self.config, slot.index)
        slot.started = now
        slot.restart_at = None
        self.restarts += 1
        log.warning("router worker %d restarted as pid %s", slot.index, slot.process.pid)

    async def close(self, grace: float = 10.0) -> None:
        """Stop watching, then stop every worker (SIGTERM, then SIGKILL after ``grace`` s)."""
        await cancel_and_wait(self._task)
        self._task = None
        live = [slot.process for slot in self._slots if slot.process.exitcode is None]
        await asyncio.to_thread(stop_workers, live, grace)


def _ordinal(number: int) -> str:
    if 10 <= number % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
