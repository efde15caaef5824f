"""The executor next to one task: ``python -m labgate.agent.taskexec DIR``.

The site's task runner starts it in a session of its own, detached, so the
task outlives an agent or portal restart. It reads ``DIR/task.json``, runs the
command (or the Python callable) with its output in ``DIR/output.log``, its
results directory ``DIR/results`` and its result file ``DIR/result.json``,
enforces the timeout, and writes what happened to ``DIR/exit.json``
(atomically, last): the runner, or its successor after a restart, reads it.

Only the standard library: it starts in a few milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: Where the task writes its JSON result, inside its results directory (the only
#: place a sandboxed task can write); taken out before the results are collected.
RESULT_FILE = "results/.labgate-result.json"
#: Seconds between SIGTERM and SIGKILL when a task is stopped.
KILL_GRACE = 3.0


def write_exit(directory: Path, outcome: dict[str, Any]) -> None:
    """Write ``exit.json`` atomically: it is there whole, or not at all."""
    tmp = directory / "exit.json.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, directory / "exit.json")


def read_result(directory: Path) -> tuple[Any, str]:
    """The task's JSON result and a problem with it ("" when none or fine)."""
    path = directory / RESULT_FILE
    if not path.is_file() or path.is_symlink():
        return None, ""
    try:
        return json.loads(path.read_text() or "null"), ""
    except (OSError, ValueError) as exc:
        return None, f"the task's result is not JSON: {exc}"
    finally:
        path.unlink(missing_ok=True)


def _argv(spec: dict[str, Any]) -> list[str]:
    raw = spec.get("command")
    if spec.get("callable"):
        # The task's venv's Python when it has one; it imports labgate's taskcall by path.
        python = f"{spec['venv']}/bin/python" if spec.get("venv") else sys.executable
        command = [python, str(Path(__file__).with_name("taskcall.py")), str(spec["callable"])]
    elif isinstance(raw, str):
        command = ["/bin/sh", "-c", raw]
    else:
        command = [str(arg) for arg in raw or []]
    return [*spec.get("sandbox", []), *command]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(KILL_GRACE)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run(directory: Path) -> int:
    """Run the task of ``directory`` to its end; always leaves ``exit.json``."""
    spec = json.loads((directory / "task.json").read_text())
    (directory / "results").mkdir(exist_ok=True)
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    venv = {"VIRTUAL_ENV": str(spec["venv"])} if spec.get("venv") else {}
    if venv:
        path = f"{spec['venv']}/bin:{path}"
    env = {
        **venv,
        "PATH": path,
        "HOME": str(directory),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        **spec.get("env", {}),
        "LABGATE_RUN_ID": str(spec.get("run_id", "")),
        "LABGATE_TASK": str(spec.get("task", "")),
        "LABGATE_ATTEMPT": str(spec.get("attempt", 1)),
        "LABGATE_RESULTS_DIR": str(directory / "results"),
        "LABGATE_RESULT": str(directory / RESULT_FILE),
        "LABGATE_TASK_ARGS": json.dumps(spec.get("args", {})),
        "LABGATE_ATTEMPT_ID": str(spec.get("attempt_id", "")),
        "LABGATE_API_URL": str(spec.get("api_url", "")),
        "LABGATE_TASK_TOKEN": str(spec.get("token", "")),
    }
    stopped: list[str] = []

    def on_term(signum: int, _frame: object) -> None:
        stopped.append("cancelled")

    signal.signal(signal.SIGTERM, on_term)
    started = time.time()
    if (directory / "cancel").exists():  # cancelled before this process got this far
        write_exit(directory, {"state": "cancelled", "exit_code": None, "reason": "cancelled"})
        return 0
    with open(directory / "output.log", "ab") as log:
        try:
            proc = subprocess.Popen(
                _argv(spec),
                cwd=directory / "results",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            write_exit(directory, {"state": "failed", "exit_code": 127, "reason": str(exc)})
            return 0
        deadline = started + float(spec.get("timeout", 3600))
        while proc.poll() is None:
            if stopped or time.time() > deadline:
                _stop(proc)
                break
            time.sleep(0.02)
    code = proc.returncode
    result, problem = read_result(directory)
    outcome: dict[str, Any] = {
        "exit_code": code,
        "result": result,
        "seconds": round(time.time() - started, 3),
    }
    if stopped:
        outcome.update(state="cancelled", reason="cancelled")
    elif time.time() > deadline and code != 0:
        outcome.update(state="failed", reason=f"timed out after {spec.get('timeout')}s")
    elif code != 0:
        outcome.update(state="failed", reason=f"exited with status {code}")
    elif problem:
        outcome.update(state="failed", reason=problem)
    else:
        outcome.update(state="succeeded", reason="")
    write_exit(directory, outcome)
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
