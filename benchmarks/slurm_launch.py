"""Slurm launch benchmark: labgate's ``slurm`` site beside JupyterHub + batchspawner, same cluster.

One run starts a real one-node Slurm cluster (munge, slurmctld, slurmd; as
the tests do, ``tests/slurm_cluster.py``: needs root and Debian's
``slurm-wlm`` and ``munge``), then, one launch at a time on the idle cluster:

- ``labgate serve`` with one ``slurm`` site: ``demo`` and ``jupyterlab``, each
  timed from ``POST /api/v1/instances`` to the first 200 through labgate's
  router (``/i/<id>/api/health``, ``/i/<id>/api``);
- JupyterHub with ``batchspawner.SlurmSpawner`` (PyPI) behind
  configurable-http-proxy: JupyterLab, from ``POST /hub/api/users/<u>/server``
  to the first 200 of ``/user/<u>/api``.

Both submit a batch job with one CPU to the same partition and poll every
10 ms. Between launches the instance is stopped and the cluster left empty.
JupyterHub, batchspawner and JupyterLab (pinned to labgate's) go into
``benchmarks/.cache/jhub`` (see ``launch.py``). Results: a Markdown table on
stdout and JSON in ``benchmarks/results/slurm_launch.json``::

    .venv/bin/python benchmarks/slurm_launch.py              # 10 samples each
    .venv/bin/python benchmarks/slurm_launch.py --samples 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from launch import (
    CACHE,
    JHUB,
    RESULTS,
    JupyterHub,
    Labgate,
    ensure_chp,
    ensure_jupyterhub,
    hub_singles,
    labgate_singles,
    log,
    single_rows,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from slurm_cluster import Cluster, start_cluster


def ensure_batchspawner() -> Path:
    """JupyterHub's venv (launch.py) with batchspawner added."""
    bin_dir = ensure_jupyterhub()
    if not (JHUB / "bin" / "batchspawner-singleuser").exists():
        log("installing batchspawner into benchmarks/.cache/jhub")
        subprocess.run([str(bin_dir / "pip"), "install", "-q", "batchspawner"], check=True)
    return bin_dir


class SlurmHub(JupyterHub):
    """JupyterHub spawning each server as a Slurm job with batchspawner's SlurmSpawner."""

    def __init__(self, work: Path, bin_dir: Path, chp: str, cluster: Cluster) -> None:
        super().__init__(work, bin_dir, chp)
        self.cluster = cluster

    def config(self) -> str:
        homes = self.work / "homes"
        script = (
            "#!/bin/bash\n"
            "#SBATCH --output={{homedir}}/slurm-%j.log\n"
            "#SBATCH --job-name=spawner-jupyterhub\n"
            "#SBATCH --chdir={{homedir}}\n"
            "#SBATCH --export={{keepvars}}\n"
            "#SBATCH --cpus-per-task=1\n"
            "#SBATCH --partition=interactive\n"
            "{{prologue}}\n{{cmd}}\n{{epilogue}}\n"
        )
        return (
            super().config().replace('c.JupyterHub.spawner_class = "simple"\n', "")
            + f"""
import batchspawner
from traitlets import default


class BenchSlurmSpawner(batchspawner.SlurmSpawner):
    # The benchmark's users have no system accounts: one home, jobs as the hub's account.
    @default("req_homedir")
    def _homedir(self):
        return {str(homes)!r}

    def user_env(self, env):
        env.update(USER=self.user.name, HOME={str(homes)!r})
        return env


c.JupyterHub.spawner_class = BenchSlurmSpawner
c.BatchSpawnerBase.exec_prefix = ""
c.BatchSpawnerBase.batch_script = {script!r}
c.BatchSpawnerBase.startup_poll_interval = 0.1
c.Spawner.cmd = [{str(self.bin / "jupyterhub-singleuser")!r}]
c.Spawner.args = ["--allow-root"]
c.Spawner.env_keep = ["PATH", "SLURM_CONF", "LANG"]
"""
        )

    async def start(self) -> None:
        os.environ["SLURM_CONF"] = str(self.cluster.conf)  # sbatch, squeue, scancel of the hub
        await super().start()


async def run(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    work = CACHE / "slurm-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "jupyterlab": version("jupyterlab"),
            "slurm": cluster.run("sinfo", "--version").strip(),
        },
        "args": vars(args),
        "single": {},
    }
    site = {
        "name": "hpc",
        "backend": "slurm",
        "options": cluster.options(
            endpoint_host="127.0.0.1",
            request_memory=False,
            partition="interactive",
            jobs_dir=str(work / "jobs"),
        ),
    }
    lg = Labgate(work / "labgate")
    lg.env["LABGATE_SITES"] = json.dumps([site])
    try:
        await lg.start()
        await lg.users(1)
        for tool in ("demo", "jupyterlab"):
            log(f"labgate slurm {tool} x{args.samples}")
            results["single"][f"labgate slurm {tool}"] = await labgate_singles(
                lg, tool, args.samples, warm=False, timeout=args.timeout
            )
    finally:
        with contextlib.suppress(Exception):
            await lg.stop_all()
        lg.stop()
    cluster.cancel_all()

    if not args.skip_jupyterhub:
        hub = SlurmHub(work / "jupyterhub", ensure_batchspawner(), ensure_chp(), cluster)
        results["machine"]["jupyterhub"] = subprocess.run(
            [str(hub.bin / "jupyterhub"), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        results["machine"]["batchspawner"] = subprocess.run(
            [str(hub.bin / "python"), "-c", "import batchspawner; print(batchspawner.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        try:
            await hub.start()
            log(f"JupyterHub + batchspawner jupyterlab x{args.samples}")
            results["single"]["JupyterHub batchspawner jupyterlab"] = await hub_singles(
                hub, args.samples, args.timeout
            )
        finally:
            hub.stop()
    results["machine"]["load_after"] = os.getloadavg()[0]
    return results


def table(r: dict[str, Any]) -> str:
    rows = single_rows("submit to first proxied 200", r["single"])
    ours = r["single"].get("labgate slurm jupyterlab", {})
    theirs = r["single"].get("JupyterHub batchspawner jupyterlab", {})
    if ours.get("n") and theirs.get("n"):
        met = "yes" if ours["p50"] <= theirs["p50"] else "NO"
        rows += [
            "",
            "| target | measured | wanted | met |",
            "|---|---:|---|---|",
            f"| JupyterLab p50, labgate vs batchspawner | {ours['p50']:.2f} s vs "
            f"{theirs['p50']:.2f} s | labgate <= batchspawner | {met} |",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=10, help="launches of each (10)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per launch (300)")
    parser.add_argument("--skip-jupyterhub", action="store_true", help="labgate only")
    args = parser.parse_args()
    with start_cluster() as cluster:
        results = asyncio.run(run(args, cluster))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "slurm_launch.json"
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
