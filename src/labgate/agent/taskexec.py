"""The executor next to one task: ``python -m labgate.agent.taskexec DIR``.

The site's task runner starts it in a session of its own, detached, so the
task outlives an agent or portal restart. It reads ``DIR/task.json``, runs the
command (or the Python callable) within its resource limits (``limits``:
see :mod:`labgate.agent.tasklimits`), with its output in
``DIR/output.log``, its results directory ``DIR/results`` and its result file
``DIR/result.json``, enforces the timeout, tells a kill for memory in the
task's cgroup from other failures, and writes what happened to
``DIR/exit.json`` (atomically): the runner, or its successor after a restart,
reads it. With the portal's address and its executor token in ``task.json``
it also tells the portal's task gateway (``POST <api>/tasks/<attempt>/state``)
that the task runs, then how it ended, often before the site's agent does.

On a Slurm site the same code is the batch job's body (:func:`run_job`, run
by the nodes' Python as the task's owner): it also packs the results
directory into ``DIR/results.tar.gz`` before it writes ``exit.json``, so the
agent takes one file of the job's, never walks a directory the job's
account controls.

Only the standard library: it starts in a few milliseconds, and runs on
nodes where labgate is not installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Where the task writes its JSON result, inside its results directory (the only
#: place a sandboxed task can write); taken out before the results are collected.
RESULT_FILE = "results/.labgate-result.json"
#: Seconds between SIGTERM and SIGKILL when a task is stopped.
KILL_GRACE = 3.0
#: Seconds a task killed by a signal it was not sent by this waits for this process's own
#: SIGTERM: a ``scancel`` signals every process of the job, this one maybe a moment later.
SIGNALLED_GRACE = 1.0
#: The archive of the results directory a batch job leaves (see :func:`run_job`).
RESULTS_ARCHIVE = "results.tar.gz"
#: Largest results archive a batch job leaves (bytes, compressed): the site's limit.
MAX_ARCHIVE = 64 * 1024 * 1024
#: Seconds the executor waits for the portal's task gateway, per report.
TELL_TIMEOUT = 5.0
#: Lines of a failed task's output its executor tells the gateway.
TAIL_LINES = 40
#: The task's ``PATH`` when the executor has none.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Largest JSON result a task may leave (bytes): a larger one fails the task.
MAX_RESULT = 1024 * 1024
#: Where ``env`` is (the sandbox shows the system at the same paths): it sets the
#: variables of a sandboxed task that the dynamic loader reads (see :func:`_argv`).
ENV_BINARY = shutil.which("env", path="/usr/bin:/bin") or "/usr/bin/env"


def write_exit(directory: Path, outcome: dict[str, Any]) -> None:
    """Write ``exit.json`` atomically: it is there whole, or not at all."""
    tmp = directory / "exit.json.tmp"
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, directory / "exit.json")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_result(directory: Path) -> tuple[Any, str]:
    """The task's JSON result and a problem with it ("" when none or fine).

    The file is the task's: opened without following a link, a regular file
    only, and read up to :data:`MAX_RESULT` bytes (a larger one fails the task:
    its executor, maybe root, never holds what the task wrote whatever its
    size). Strict JSON only: ``NaN`` and ``Infinity`` are no JSON a client parses.
    """
    path = directory / RESULT_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError:  # a link (ELOOP) or unreadable: as before, no result
        with contextlib.suppress(OSError):
            path.unlink()
        return None, ""
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None, ""
            data = handle.read(MAX_RESULT + 1)
        if len(data) > MAX_RESULT:
            return None, f"the task's result is larger than {MAX_RESULT // 2**20} MiB"
        text = data.decode("utf-8")
        return json.loads(text or "null", parse_constant=_no_constant), ""
    except (OSError, ValueError) as exc:
        return None, f"the task's result is not JSON: {exc}"
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


def _argv(spec: dict[str, Any], loader: dict[str, str] | None = None) -> list[str]:
    """The task's command line; sandboxed, with ``loader`` (the task's variables the
    dynamic loader reads) set by ``env`` at its very start, once it runs as the task."""
    raw = spec.get("command")
    if spec.get("callable"):
        # The task's venv's Python when it has one; it imports labgate's taskcall by path
        # (a batch job's copy of it when it names one: a job script has no module beside it).
        python = f"{spec['venv']}/bin/python" if spec.get("venv") else sys.executable
        taskcall = spec.get("taskcall") or str(Path(__file__).with_name("taskcall.py"))
        command = [python, str(taskcall), str(spec["callable"])]
    elif isinstance(raw, str):
        command = ["/bin/sh", "-c", raw]
    else:
        command = [str(arg) for arg in raw or []]
    sandbox = list(spec.get("sandbox", []))
    if sandbox and loader:
        # bwrap and the uid switch in front of the task run outside it (as root where
        # labgate is root), with the task's environment but never what the dynamic
        # loader reads (LD_PRELOAD… would run the owner's code there): env sets those
        # last, as the task. On its command line, seen as command lines are: the task's
        # token and other variables stay in its environment.
        assignments = [f"{name}={value}" for name, value in loader.items()]
        return [*sandbox, ENV_BINARY, "--", *assignments, *command]
    return [*sandbox, *command]


#: What the C library and its dynamic loader read from the environment of a program
#: (glibc's ``unsecvars.h``, which it drops for setuid programs): never given to what runs
#: a sandboxed task as root or outside its sandbox.
LOADER_VARIABLES = frozenset(
    {
        "GCONV_PATH",
        "GETCONF_DIR",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "TMPDIR",
        "TZDIR",
    }
)
_LOADER_PREFIXES = ("LD_", "MALLOC_", "GLIBC_")


def loader_variable(name: str) -> bool:
    """Whether the C library or the dynamic loader reads variable ``name``."""
    return name in LOADER_VARIABLES or name.startswith(_LOADER_PREFIXES)


def _valid_variables(variables: Any) -> dict[str, str]:
    """The run's variables that an environment can hold (a name with ``=`` or NUL, or a
    value with NUL, cannot be set: left out, where it made the executor fail before)."""
    if not isinstance(variables, dict):
        return {}
    return {
        str(name): str(value)
        for name, value in variables.items()
        if name and "=" not in str(name) and "\0" not in str(name) and "\0" not in str(value)
    }


def _limiter(options: list[str]) -> Callable[[], None] | None:
    """What applies a task's resource limits in its process before ``exec`` (None: none).

    Only process tasks have limits, and labgate is installed where they run
    (a batch job's copy of this file never imports it). Called between
    ``fork`` and ``exec``: this process has no other thread then (the
    gateway's is started after).
    """
    if not options:
        return None
    from labgate.backends.limits import apply

    return lambda: apply(options)


def oom_kills(path: str | None) -> int:
    """How many processes the kernel killed for memory in a task's cgroup (0 when unknown).

    ``path`` is the cgroup's ``memory.events`` (v2) or ``memory.oom_control`` (v1):
    lines of ``key value``, one of them ``oom_kill N``.
    """
    if not path:
        return 0
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the task's first process has exited, without reaping it.

    Unreaped, its pid (the task's process group id) cannot be taken by a new
    group, so :func:`_end_group` signals only the task's own processes.
    """
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL what is left of the task's process group, then reap its first process.

    Done however the task ended: a process it left behind (in the background,
    or ignoring SIGTERM inside the sandbox, whose outer ``bwrap`` SIGTERM ends
    at once) must not outlive its attempt.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie does not)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == b"%d" % pgid and fields[0] != b"Z":
            return True
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the task's process group and wait until it is gone, :data:`KILL_GRACE` at most.

    The grace is the group's, not its first process's: with the sandbox, that is
    the outer ``bwrap``, which SIGTERM ends at once while the task inside cleans
    up. :func:`_end_group` then kills what is left.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


def tell(spec: dict[str, Any], report: dict[str, Any]) -> None:
    """Send ``report`` to the portal's task gateway with the executor's token, if it has one.

    Best effort: the site's agent reports the attempt too, so a portal out of
    reach (or one that heard first from the agent: 409) loses nothing.
    """
    url, token = spec.get("api_url"), spec.get("executor_token")
    attempt = spec.get("attempt_id")
    if not (url and token and attempt):
        return
    import urllib.error  # only with a gateway to tell: it costs start-up time
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - the portal's own URL, http(s)
        f"{url}/tasks/{attempt}/state",
        data=json.dumps(report).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TELL_TIMEOUT) as answer:  # noqa: S310
            answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: the attempt has ended already, as the agent told
            sys.stderr.write(f"labgate: the task gateway refused the report: {exc}\n")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"labgate: the task gateway is out of reach: {exc}\n")


def tell_end(directory: Path, outcome: dict[str, Any]) -> None:
    """Tell the gateway how the task ended (cancelled is the site's to tell, not this)."""
    if outcome.get("state") not in ("succeeded", "failed"):
        return
    try:
        spec = json.loads((directory / "task.json").read_text())
    except (OSError, ValueError):
        return
    report = {key: outcome.get(key) for key in ("state", "exit_code", "reason", "result")}
    report["seconds"] = max(0.0, float(outcome.get("seconds") or 0.0))
    report["files"] = result_files(directory / "results")
    if outcome["state"] != "succeeded":
        report["log_tail"] = _tail(directory / "output.log")
    tell(spec, report)


def result_files(results: Path) -> list[str]:
    """The regular files of a results directory, by name (links left out), at most 1,000."""
    if not results.is_dir():
        return []
    found = [
        str(path.relative_to(results))
        for path in sorted(results.rglob("*"))
        if path.is_file() and not path.is_symlink()
    ]
    return found[:1000]


def _tail(path: Path) -> str:
    """The last :data:`TAIL_LINES` lines of a file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-TAIL_LINES:])


def run(directory: Path) -> int:
    """Run the task of ``directory`` to its end; always leaves ``exit.json``."""
    outcome = execute(directory)
    write_exit(directory, outcome)
    tell_end(directory, outcome)
    return 0


def run_job(directory: str) -> int:
    """A batch job's body: run the task, pack its results, then leave ``exit.json``."""
    where = Path(directory)
    outcome = execute(where)
    problem = pack_results(where)
    if problem and outcome.get("state") == "succeeded":
        outcome.update(state="failed", reason=problem)
    write_exit(where, outcome)
    tell_end(where, outcome)
    return 0


def pack_results(directory: Path) -> str:
    """``DIR/results`` as ``DIR/results.tar.gz`` (links left out); a problem in words, or ""."""
    results = directory / "results"
    archive = directory / RESULTS_ARCHIVE
    part = directory / (RESULTS_ARCHIVE + ".part")
    try:
        with tarfile.open(part, mode="w:gz") as tar:
            for path in sorted(results.rglob("*")) if results.is_dir() else []:
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    continue
                tar.add(path, arcname=str(path.relative_to(results)), recursive=False)
                if part.stat().st_size > MAX_ARCHIVE:
                    raise ValueError(
                        f"the results are larger than {MAX_ARCHIVE // 2**20} MiB compressed"
                    )
    except (OSError, ValueError, tarfile.TarError) as exc:
        part.unlink(missing_ok=True)
        return str(exc)
    os.replace(part, archive)
    return ""


def execute(directory: Path) -> dict[str, Any]:
    """Run the task of ``directory`` to its end; what happened (``exit.json``'s content)."""
    spec = json.loads((directory / "task.json").read_text())
    (directory / "results").mkdir(exist_ok=True)
    path = os.environ.get("PATH", DEFAULT_PATH)
    venv = {"VIRTUAL_ENV": str(spec["venv"])} if spec.get("venv") else {}
    if venv:
        path = f"{spec['venv']}/bin:{path}"
    # A batch job's task sees Slurm's own variables (its job id, CPUs); a process has none.
    slurm = {key: value for key, value in os.environ.items() if key.startswith("SLURM_")}
    env = {
        **slurm,
        **venv,
        "PATH": path,
        # Sandboxed (perhaps as the owner's uid), the attempt's folder is not the task's to
        # write: its home is the sandbox's own /tmp, private and thrown away with it.
        "HOME": "/tmp" if spec.get("sandbox") else str(directory),  # noqa: S108
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        **_valid_variables(spec.get("env", {})),
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
        return {"state": "cancelled", "exit_code": None, "reason": "cancelled"}
    with open(directory / "output.log", "ab") as log:
        try:
            outer, loader = env, {}
            if spec.get("sandbox"):
                loader = {k: v for k, v in env.items() if loader_variable(k)}
                outer = {k: v for k, v in env.items() if not loader_variable(k)}
            proc = subprocess.Popen(  # preexec_fn: see _limiter (no thread runs yet)
                _argv(spec, loader),
                cwd=directory / "results",
                env=outer,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_limiter((spec.get("limits") or {}).get("options") or []),
            )
        except subprocess.SubprocessError as exc:  # from _limiter, in the child
            return {"state": "failed", "exit_code": 127, "reason": f"cannot apply limits: {exc}"}
        except OSError as exc:
            return {"state": "failed", "exit_code": 127, "reason": str(exc)}
        threading.Thread(target=tell, args=(spec, {"state": "running"}), daemon=True).start()
        deadline = started + float(spec.get("timeout", 3600))
        while not _exited(proc):
            if stopped or time.time() > deadline:
                _stop(proc)
                break
            time.sleep(0.02)
        _end_group(proc)
    code = proc.returncode
    if code is not None and code < 0 and not stopped:
        # Killed from outside: if the job is being cancelled, the site tells how it ended
        # ("cancelled outside labgate"), not this as a failure that beat it there.
        until = time.time() + SIGNALLED_GRACE
        while not stopped and time.time() < until:
            time.sleep(0.02)
    result, problem = read_result(directory)
    outcome: dict[str, Any] = {
        "exit_code": code,
        "result": result,
        "seconds": round(time.time() - started, 3),
    }
    limits = spec.get("limits") or {}
    if stopped:
        outcome.update(state="cancelled", reason="cancelled")
    elif code != 0 and oom_kills(limits.get("oom_file")):
        outcome.update(
            state="failed",
            reason=f"out of memory: limit {limits.get('memory_mib')} MiB (killed by the kernel)",
        )
    elif time.time() > deadline and code != 0:
        outcome.update(state="failed", reason=f"timed out after {spec.get('timeout')}s")
    elif code != 0:
        outcome.update(state="failed", reason=f"exited with status {code}")
    elif problem:
        outcome.update(state="failed", reason=problem)
    else:
        outcome.update(state="succeeded", reason="")
    return outcome


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
