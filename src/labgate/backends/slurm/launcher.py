"""The body of a labgate Slurm job: pick a free port on the node, report it, become the tool.

This file is copied into each job's script (the compute node needs a Python 3,
not labgate), so it imports only the standard library and nothing of labgate.
It reads the job's ``launch.json`` (command, environment and working directory,
with :data:`PORT_MARK` where the port goes), finds a free TCP port on the node,
writes ``endpoint.json`` (node name, port, job id) next to it, atomically (the
agent watches for it), and ``exec``\\ s the tool, which so becomes the job's
own process: Slurm's signals, time limit and accounting apply to it directly.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys

#: Stands for the port in the command and environment until the node has picked one.
PORT_MARK = "@@LABGATE_PORT@@"


def free_port(low: int, high: int) -> int:
    """A TCP port nothing listens on, from ``[low, high)`` when given, else any.

    Like :func:`labgate.backends.process.free_port`, but on the node and on every
    address (the router may connect from elsewhere), and without labgate: this file
    runs where labgate is not installed.
    """
    for _ in range(200 if high > low else 0):
        port = random.randrange(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        found: int = sock.getsockname()[1]
        return found


def main(state_dir: str) -> None:
    """Start the tool of the job whose files are in ``state_dir``."""
    with open(os.path.join(state_dir, "launch.json"), encoding="utf-8") as handle:
        launch = json.load(handle)
    low, high = launch.get("ports", [0, 0])
    port = str(free_port(int(low), int(high)))
    argv = [part.replace(PORT_MARK, port) for part in launch["argv"]]
    env = {key: value for key, value in os.environ.items() if key.startswith("SLURM")}
    env.update({key: value.replace(PORT_MARK, port) for key, value in launch["env"].items()})
    report = {
        "node": socket.gethostname(),
        "port": int(port),
        "job_id": os.environ.get("SLURM_JOB_ID", ""),
        "pid": os.getpid(),
    }
    part = os.path.join(state_dir, "endpoint.json.part")
    with open(part, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    os.replace(part, os.path.join(state_dir, "endpoint.json"))
    workdir = launch.get("workdir") or state_dir
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)
    print(f"--- labgate: starting {argv[0]} on {report['node']} port {port}", flush=True)
    try:
        # The tool becomes the job's process: Slurm signals, limits and accounts it directly.
        os.execvpe(argv[0], argv, env)  # noqa: S606
    except OSError as exc:
        print(f"--- labgate: cannot start {argv[0]}: {exc}", flush=True)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1])
