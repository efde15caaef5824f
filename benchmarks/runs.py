"""Batch runs benchmark: scheduling overhead per task and throughput of trivial tasks.

Everything runs on loopback, in a temporary data dir, and stops by itself::

    .venv/bin/python benchmarks/runs.py            # 30 single-task runs, 1,000 tasks
    .venv/bin/python benchmarks/runs.py --quick    # 10 runs, 200 tasks

What is measured, with the portal in this process (uvicorn on a random
loopback port, one local process site, the sandbox as labgate uses it):

- **overhead**: ``POST /api/v1/runs`` of a one-task run (``true``) until the
  task's ``running`` event, and until the run is ``succeeded``; p50 and p95
  over one run at a time;
- **throughput**: one run of one stage with N copies of ``true``, from the
  submit to ``succeeded``: tasks per second, with ``run_tasks_per_site``
  (``--per-site``) attempts at once;
- **floor**: the same N ``true`` as plain ``subprocess.run`` calls, one at a
  time, and through the task executor's sandbox (``bwrap``) with the same
  parallelism: what the machine does with no labgate in the way.

Results: a Markdown table on stdout and JSON in ``benchmarks/results/runs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from labgate.config import Settings
from labgate.portal.app import create_app

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ADMIN_PASSWORD = "bench-admin-password-runs"
ONE = '[[stages]]\nname = "one"\n[[stages.tasks]]\nname = "t"\ncommand = ["true"]\n'


def wide(n: int) -> str:
    """A run of one stage of ``n`` copies of ``true``."""
    return (
        '[[stages]]\nname = "wide"\n[[stages.tasks]]\nname = "t"\ncommand = ["true"]\n'
        f"where = {{copies = {n}}}\n"
    )


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def wait_done(
    client: httpx.AsyncClient, run_id: str, timeout: float, *, every: float = 0.02
) -> dict[str, Any]:
    """Poll until the run ends (without its events while it runs, as the runs page does)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await client.get(f"/api/v1/runs/{run_id}", params={"events": "false"})
        run: dict[str, Any] = got.json()
        if run["state"] not in ("pending", "running"):
            return (await client.get(f"/api/v1/runs/{run_id}")).json()
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {run['state']}")
        await asyncio.sleep(every)


async def bench(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    """Start the portal, time the runs, stop it."""
    settings = Settings(
        data_dir=data,
        admin_password=ADMIN_PASSWORD,
        secret_key="bench-secret-key-bench-secret-key-0123456789",
        run_tasks_per_site=args.per_site,
        # Running tasks count as instances of their owner: the per-site cap is the limit here.
        max_instances_per_user=max(args.per_site, 5),
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    results: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            login = await client.post(
                "/api/v1/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
            )
            login.raise_for_status()
            token = await client.post(
                "/api/v1/tokens",
                json={"scopes": ["instances:read", "instances:write"]},
                headers={"X-CSRF-Token": login.json()["csrf_token"]},
            )
            client.cookies.clear()
            client.headers["Authorization"] = f"Bearer {token.json()['token']}"
            to_start: list[float] = []
            to_end: list[float] = []
            for _ in range(args.runs):
                submitted = time.time()
                run_id = (await client.post("/api/v1/runs", content=ONE)).json()["id"]
                run = await wait_done(client, run_id, 60)
                ended = time.time()
                running = next(
                    e["at"] for e in run["events"] if e["state"] == "running" and e["task"] == "t"
                )
                to_start.append(datetime.fromisoformat(running).timestamp() - submitted)
                to_end.append(ended - submitted)
            results["overhead"] = {
                "runs": args.runs,
                "submit_to_start_p50_ms": 1000 * statistics.median(to_start),
                "submit_to_start_p95_ms": 1000 * pct(to_start, 95),
                "submit_to_done_p50_ms": 1000 * statistics.median(to_end),
                "submit_to_done_p95_ms": 1000 * pct(to_end, 95),
            }
            started = time.monotonic()
            run_id = (await client.post("/api/v1/runs", content=wide(args.tasks))).json()["id"]
            # A wide run's view is big: looked at four times a second, like a watching user.
            run = await wait_done(client, run_id, 3600, every=0.25)
            seconds = time.monotonic() - started
            ok = sum(t["state"] == "succeeded" for t in run["stages"][0]["tasks"])
            reasons = sorted({t["reason"] for t in run["stages"][0]["tasks"] if t["reason"]})
            if reasons:
                print("failures:", reasons[:5], file=sys.stderr)
            results["throughput"] = {
                "tasks": args.tasks,
                "succeeded": ok,
                "per_site": args.per_site,
                "seconds": seconds,
                "tasks_per_second": args.tasks / seconds,
            }
    finally:
        server.should_exit = True
        await serving
    return results


def floor(n: int, parallel: int) -> dict[str, Any]:
    """N ``true`` as plain subprocesses, then through bwrap with the runs' parallelism."""
    started = time.monotonic()
    for _ in range(n):
        subprocess.run(["true"], check=True)
    plain = time.monotonic() - started
    out: dict[str, Any] = {"tasks": n, "plain_seconds": plain, "plain_per_second": n / plain}
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        argv = [bwrap, "--ro-bind", "/", "/", "--unshare-pid", "--dev", "/dev", "--", "true"]
        started = time.monotonic()
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda _: subprocess.run(argv, check=True), range(n)))
        sandboxed = time.monotonic() - started
        out.update(bwrap_seconds=sandboxed, bwrap_per_second=n / sandboxed)
    return out


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 runs, 200 tasks")
    parser.add_argument("--runs", type=int, default=30, help="single-task runs for the overhead")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks of the throughput run")
    parser.add_argument("--per-site", type=int, default=8, help="run_tasks_per_site")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.tasks = 10, 200
    with tempfile.TemporaryDirectory(prefix="labgate-bench-runs-") as tmp:
        data = Path(tmp) / "var"
        data.mkdir(mode=0o700)
        results = asyncio.run(bench(args, data))
    results["floor"] = floor(args.tasks, args.per_site)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runs.json").write_text(json.dumps(results, indent=2))
    o, t, f = results["overhead"], results["throughput"], results["floor"]
    print("| measure | value |\n|---|---|")
    print(
        f"| submit → task running, p50 / p95 | {o['submit_to_start_p50_ms']:.0f} / "
        f"{o['submit_to_start_p95_ms']:.0f} ms |"
    )
    print(
        f"| submit → run succeeded (1 task), p50 / p95 | {o['submit_to_done_p50_ms']:.0f} / "
        f"{o['submit_to_done_p95_ms']:.0f} ms |"
    )
    print(
        f"| {t['tasks']} trivial tasks, {t['per_site']} at once | {t['seconds']:.1f} s, "
        f"{t['tasks_per_second']:.1f} tasks/s ({t['succeeded']} succeeded) |"
    )
    print(
        f"| floor: {f['tasks']} x `true` via subprocess | {f['plain_seconds']:.2f} s, "
        f"{f['plain_per_second']:.0f}/s |"
    )
    if "bwrap_seconds" in f:
        print(
            f"| floor: {f['tasks']} x `true` in bwrap, {t['per_site']} at once | "
            f"{f['bwrap_seconds']:.2f} s, {f['bwrap_per_second']:.0f}/s |"
        )


if __name__ == "__main__":
    sys.exit(main())
