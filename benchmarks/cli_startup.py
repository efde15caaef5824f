"""How fast the ``labgate`` command starts: ``--help``, ``version`` and ``ls``.

Each command runs as a fresh process, as a person at a terminal runs it. ``ls``
talks to a stand-in server in this script (any GET under ``/api/v1`` answers
``[]``), so the figure is the CLI's own start-up, settings, client and one
HTTP round trip on loopback, without a portal's work.

Uses hyperfine when it is installed (``--warmup 3``), else times ``--runs``
runs with ``subprocess`` after 3 warm-up runs, the commands taking turns (run
1 of each, then run 2 of each, ...) so that a load that comes and goes on a
shared machine falls on all of them alike; it also records each run's CPU
time (user + system of the process). Prints a Markdown table and JSON (also
written to ``benchmarks/results/cli-startup-<time>.json``). The target of
issue 18 is a mean under 0.3 s for each command. Runs without
``PYTHONDONTWRITEBYTECODE``, as an installed labgate does: the warm-up runs
write labgate's bytecode cache.

    .venv/bin/python benchmarks/cli_startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TARGET_SECONDS = 0.3
TABLE_TOKEN = "lg_benchmark_table"
# name: (arguments, token); the stand-in server answers TABLE_TOKEN with three
# instances, so that `ls` also draws its table (which loads Rich).
COMMANDS: dict[str, tuple[list[str], str]] = {
    "labgate --help": (["--help"], "lg_benchmark"),
    "labgate version": (["version"], "lg_benchmark"),
    "labgate ls": (["ls"], "lg_benchmark"),
    "labgate ls (3 instances)": (["ls"], TABLE_TOKEN),
}
RESULTS = Path(__file__).with_name("results")
INSTANCES = [
    {
        "id": f"i-{n:04d}",
        "tool": "jupyterlab",
        "owner": "ada",
        "site": "local",
        "state": "running",
        "created_at": "2026-12-02T10:00:00+00:00",
        "url": f"http://127.0.0.1:8000/i/i-{n:04d}/",
        "reason": None,
    }
    for n in range(3)
]


class _StandIn(BaseHTTPRequestHandler):
    """Answers every GET with an empty JSON list, or three instances for TABLE_TOKEN."""

    def do_GET(self) -> None:
        table = self.headers.get("Authorization") == f"token {TABLE_TOKEN}"
        body = json.dumps(INSTANCES).encode() if table else b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _environment(home: Path, url: str, token: str) -> dict[str, str]:
    # Without PYTHONDONTWRITEBYTECODE, as an installed labgate runs: the warm-up runs
    # write labgate's bytecode cache, else every run would compile its modules again.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LABGATE_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        LABGATE_URL=url,
        LABGATE_TOKEN=token,
        COLUMNS="120",
    )
    return env


def _command(args: list[str]) -> list[str]:
    """The ``labgate`` script next to this interpreter, as a user runs it, else ``-m labgate``."""
    script = Path(sys.executable).with_name("labgate")
    if script.is_file() and script.read_text(errors="replace").startswith(f"#!{sys.executable}"):
        return [str(script), *args]
    return [sys.executable, "-m", "labgate", *args]


def _time_subprocess(
    commands: list[tuple[list[str], dict[str, str]]], runs: int
) -> list[tuple[list[float], list[float]]]:
    """Wall-clock and CPU seconds of each command's runs, the commands taking turns."""
    for argv, env in commands * 3:
        subprocess.run(argv, env=env, capture_output=True, check=True)
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in commands]
    for _ in range(runs):
        for (argv, env), (wall, cpu) in zip(commands, times, strict=True):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(argv, env=env, capture_output=True, check=True)
            wall.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return times


def _time_hyperfine(argv: list[str], env: dict[str, str], runs: int, tmp: Path) -> list[float]:
    export = tmp / "hyperfine.json"
    subprocess.run(
        [
            "hyperfine",
            "--warmup",
            "3",
            "--runs",
            str(runs),
            "--shell=none",
            "--style",
            "none",
            "--export-json",
            str(export),
            subprocess.list2cmdline(argv),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    times: list[float] = json.loads(export.read_text())["results"][0]["times"]
    return times


def main() -> None:
    """Run the benchmark and print its table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed runs per command")
    options = parser.parse_args()

    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    tool = "hyperfine" if shutil.which("hyperfine") else "subprocess"
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        commands = [
            (_command(args), _environment(Path(tmp), url, token))
            for args, token in COMMANDS.values()
        ]
        if tool == "hyperfine":
            measured: list[tuple[list[float], list[float] | None]] = [
                (_time_hyperfine(argv, env, options.runs, Path(tmp)), None)
                for argv, env in commands
            ]
        else:
            measured = list(_time_subprocess(commands, options.runs))
        for name, (times, cpu) in zip(COMMANDS, measured, strict=True):
            results.append(
                {
                    "command": name,
                    "runs": len(times),
                    "mean_s": statistics.fmean(times),
                    "median_s": statistics.median(times),
                    "min_s": min(times),
                    "max_s": max(times),
                    "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
                    "cpu_median_s": statistics.median(cpu) if cpu else None,
                    "under_target": statistics.fmean(times) < TARGET_SECONDS,
                }
            )
    server.shutdown()

    print(f"\nCLI start-up ({tool}, {options.runs} runs each, target: mean < {TARGET_SECONDS} s)\n")
    print("| command | mean | median | min | max | CPU (median) | < 0.3 s |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        cpu_text = "" if row["cpu_median_s"] is None else f"{row['cpu_median_s']:.3f} s"
        print(
            f"| `{row['command']}` | {row['mean_s']:.3f} s | {row['median_s']:.3f} s "
            f"| {row['min_s']:.3f} s | {row['max_s']:.3f} s | {cpu_text} "
            f"| {'yes' if row['under_target'] else 'NO'} |"
        )
    report = {
        "tool": tool,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cli-startup-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
