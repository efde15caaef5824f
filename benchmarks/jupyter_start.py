"""How long JupyterLab's server takes to start, and how much CPU, two ways.

``python -m jupyterlab`` (as JupyterHub's single-user servers and most
deployments start it) against ``python -m labgate.tools.jupyter_start`` (what
the built-in ``jupyterlab`` tool runs: the same server without the
``rfc3987_syntax`` import, see that module). Both get the tool's own options,
a fresh workspace and a token; each run is timed from the start of the
process until ``/api`` answers 200, and its CPU (user + system of the process
and its children) is read at that moment. The two take turns (run 1 of each,
then run 2 of each, ...) so that a load that comes and goes on a shared
machine falls on both alike. Prints a Markdown table and JSON (also written
to ``benchmarks/results/jupyter-start-<time>.json``).

    .venv/bin/python benchmarks/jupyter_start.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")
TOKEN = "benchmark-token"
WAYS = {
    "python -m jupyterlab": "jupyterlab",
    "python -m labgate.tools.jupyter_start": "labgate.tools.jupyter_start",
}
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (reaped children's included)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    pids += [int(child) for child in children]
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / TICKS
    return total


def start_once(module: str, workspace: Path, timeout: float) -> tuple[float, float]:
    """Start the server, wait for ``/api``; seconds and CPU seconds until it answered."""
    port = free_port()
    argv = [
        sys.executable, "-m", module, "--no-browser", "--allow-root", "--ip=127.0.0.1",
        f"--port={port}", "--ServerApp.base_url=/i/bench/", f"--ServerApp.root_dir={workspace}",
        "--ServerApp.password=", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
    env = {**os.environ, "JUPYTER_TOKEN": TOKEN, "HOME": str(workspace)}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/i/bench/api", headers={"Authorization": f"token {TOKEN}"}
    )
    begun = time.perf_counter()
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workspace
    )
    try:
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - begun, tree_cpu(process.pid)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if process.poll() is not None:
                raise RuntimeError(f"{module} exited with {process.returncode}")
            if time.perf_counter() - begun > timeout:
                raise TimeoutError(f"{module}: /api did not answer within {timeout} s")
            time.sleep(0.02)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    """Run the benchmark and print its table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="starts of each (10)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per start (120)")
    options = parser.parse_args()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory(prefix="jupyter-start-") as tmp:
        for module in WAYS.values():  # one warm-up each: bytecode and page caches
            start_once(module, Path(tmp), options.timeout)
        for _ in range(options.runs):
            for name, module in WAYS.items():
                samples[name].append(start_once(module, Path(tmp), options.timeout))
    rows: list[dict[str, Any]] = []
    for name, runs in samples.items():
        seconds, cpu = [s for s, _ in runs], [c for _, c in runs]
        rows.append(
            {
                "command": name,
                "runs": len(runs),
                "ready_median_s": statistics.median(seconds),
                "ready_mean_s": statistics.fmean(seconds),
                "ready_max_s": max(seconds),
                "cpu_median_s": statistics.median(cpu),
            }
        )
    plain, ours = rows
    result = {
        "benchmark": "jupyter_start",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()[0]},
        "python": sys.version.split()[0],
        "results": rows,
        "cpu_ratio": ours["cpu_median_s"] / plain["cpu_median_s"],
        "ready_ratio": ours["ready_median_s"] / plain["ready_median_s"],
    }
    print(f"\nJupyterLab server start until /api answers ({options.runs} runs each)\n")
    print("| started with | ready, median | ready, mean | ready, max | CPU, median |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| `{row['command']}` | {row['ready_median_s']:.2f} s | {row['ready_mean_s']:.2f} s"
            f" | {row['ready_max_s']:.2f} s | {row['cpu_median_s']:.2f} s |"
        )
    print(
        f"\nlabgate's start / plain: {result['ready_ratio']:.2f}x the time, "
        f"{result['cpu_ratio']:.2f}x the CPU\n"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"jupyter-start-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
