"""The task executor (:mod:`labgate.agent.taskexec`) as a batch job runs it, signals and all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_a_task_signalled_just_before_its_executor_is_cancelled_not_failed(
    tmp_path: Path,
) -> None:
    """A ``scancel`` signals the job's processes in turn: the task may die first.

    The executor, signalled a moment later, says the task was cancelled (the
    site tells why), not that it failed with a signal's exit status.
    """
    directory = tmp_path / "job"
    directory.mkdir()
    pid_file = tmp_path / "task.pid"
    command = f"echo $$ > {pid_file}; sleep 60"
    (directory / "task.json").write_text(json.dumps({"command": command, "timeout": 30}))
    executor = subprocess.Popen(
        [sys.executable, "-m", "labgate.agent.taskexec", str(directory)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.02)
        os.killpg(int(pid_file.read_text()), signal.SIGTERM)  # the task's group first
        time.sleep(0.2)
        executor.send_signal(signal.SIGTERM)  # then the executor
        assert executor.wait(20) == 0
    finally:
        if executor.poll() is None:
            executor.kill()
            executor.wait()
    outcome = json.loads((directory / "exit.json").read_text())
    assert outcome["state"] == "cancelled", outcome
