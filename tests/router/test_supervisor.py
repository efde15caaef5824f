"""Router workers supervised: real worker processes that die are replaced, with a backoff."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from labgate.router.supervisor import WorkerSupervisor, describe_exit
from labgate.router.workers import WorkerConfig

from .conftest import KEY
from .test_workers import free_port


def config(host: str = "127.0.0.1") -> WorkerConfig:
    # No portal answers at port 9: a worker waits sync_wait for it, then serves anyway.
    return WorkerConfig(
        host=host,
        port=free_port(),
        portal_url="http://127.0.0.1:9",
        stream_token="stream-token",
        signing_key=KEY,
        session_max_age=3600,
        sync_wait=0.05,
    )


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exit code 1"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(0) == "exit code 0"


@pytest.mark.slow
async def test_a_killed_worker_is_replaced_at_once(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = WorkerSupervisor(config(), 2, check_interval=0.05)
    caplog.set_level(logging.INFO, "labgate.router")
    supervisor.start()
    try:
        first, second = (process.pid for process in supervisor.processes)
        assert first is not None
        await asyncio.sleep(0.5)
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        while first in (process.pid for process in supervisor.processes):
            assert time.monotonic() - killed < 1.0, "not replaced within a second"
            await asyncio.sleep(0.02)
        assert supervisor.alive == 2
        assert supervisor.processes[1].pid == second  # the other worker was left alone
        assert supervisor.restarts == 1
        assert f"router worker 0 (pid {first}) killed by SIGKILL" in caplog.text
        assert "router worker 0 restarted as pid" in caplog.text
    finally:
        await supervisor.close()
    assert supervisor.alive == 0


@pytest.mark.slow
async def test_a_worker_that_dies_at_start_backs_off_then_is_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: binding it fails, exit code 1.
    supervisor = WorkerSupervisor(config("192.0.2.1"), 1, check_interval=0.05, max_quick_failures=3)
    caplog.set_level(logging.INFO, "labgate.router")
    started = time.monotonic()
    supervisor.start()
    try:
        while not supervisor.given_up:
            assert time.monotonic() - started < 60, caplog.text
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        await asyncio.sleep(1.5)  # and it stays given up
    finally:
        await supervisor.close()
    assert supervisor.given_up == [0]
    assert supervisor.restarts == 2  # first death: at once; second: after 1 s; third: given up
    assert elapsed > 1.0, "no backoff between quick failures"
    assert "exit code 1" in caplog.text
    assert "restarting it in 1 s" in caplog.text
    assert "3rd quick failure in a row: not restarting it" in caplog.text
    assert caplog.text.count("restarted as pid") == 2
