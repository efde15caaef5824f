"""The slurm backend under a site agent on the real test cluster: restarts and orphans.

An agent that goes away leaves its jobs running or queued; a new agent (a
restarted ``labgate agent`` or portal) adopts them from the saved state alone:
a running one is watched again, a queued one is followed until it runs and
becomes healthy. Jobs of the site that nobody knows are cancelled by reconcile, and a
stop without a state cancels the instance's job by its name.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from helpers import TEST_SECRET_KEY
from labgate.agent.site import Adoption
from labgate.backends.slurm import SlurmBackend
from labgate.config import Settings
from slurm_agents import SITE, healthy, spec_of

pytestmark = pytest.mark.slow


async def test_a_new_agent_adopts_running_and_queued_jobs(make_agent, demo, slurm) -> None:
    first, seen = make_agent()
    # Two instances of one CPU fill the node; the third is queued.
    specs = [spec_of(demo) for _ in range(3)]
    for spec in specs[:2]:
        first.launch(spec)
        await seen.wait(spec.instance_id, "running")
    first.launch(specs[2])
    await seen.wait(specs[2].instance_id, note="queued (")
    await first.close()  # the agent goes away; the jobs stay

    second, heard = make_agent()
    running, queued = specs[0], specs[2]
    state, endpoint = seen.saved(running.instance_id)
    await second.adopt(Adoption(running, "running", state, endpoint))
    assert second.watched[running.instance_id].running
    assert await healthy(endpoint, running)
    state, endpoint = seen.saved(queued.instance_id)
    assert endpoint == "" and state["job_id"]
    await second.adopt(Adoption(queued, "starting", state, endpoint, 0.0))
    # Stopping the running one makes room: the adopted queued job runs and becomes healthy.
    await second.stop(running.instance_id, {})
    await heard.wait(queued.instance_id, "running", timeout=30)
    _, placed = heard.saved(queued.instance_id)
    assert await healthy(placed, queued)
    # The adopted running job, killed outside labgate, is reported lost with the reason.
    slurm.run("scancel", seen.saved(specs[1].instance_id)[0]["job_id"])
    await second.adopt(Adoption(specs[1], "running", *seen.saved(specs[1].instance_id)))
    lost = await heard.wait(specs[1].instance_id, "lost")
    assert "cancelled outside labgate" in lost.message, lost
    await second.stop(queued.instance_id, {})
    await second.close()


async def test_reconcile_cancels_jobs_nobody_knows(make_agent, demo, slurm) -> None:
    agent, seen = make_agent()
    kept, orphan = spec_of(demo), spec_of(demo)
    for spec in (kept, orphan):
        agent.launch(spec)
        await seen.wait(spec.instance_id, "running")
    # A restarted agent knows neither; the portal knows only ``kept``.
    await agent.close()
    fresh, _ = make_agent()
    removed = await fresh.reconcile({kept.instance_id})
    assert removed == [orphan.instance_id]
    deadline = time.monotonic() + 20
    while f"labgate-{SITE}-{orphan.instance_id}" in slurm.run("squeue", "-h", "-o", "%j"):
        assert time.monotonic() < deadline, "the orphan's job is still there"
        await asyncio.sleep(0.2)
    assert f"labgate-{SITE}-{kept.instance_id}" in slurm.run("squeue", "-h", "-o", "%j")
    # Another site's jobs are not this site's to cancel.
    other = SlurmBackend(
        Settings(data_dir=Path("/nonexistent"), secret_key=TEST_SECRET_KEY),
        slurm.options(),
    )
    other.attach("elsewhere")
    assert await other.reconcile(set()) == []
    await fresh.stop(kept.instance_id, seen.saved(kept.instance_id)[0])
    await fresh.close()


async def test_a_stop_without_a_state_cancels_the_job_by_its_name(make_agent, demo, slurm) -> None:
    """The job id never reached the portal (its agent was killed): the job's name finds it."""
    agent, seen = make_agent()
    cut, other = spec_of(demo), spec_of(demo)
    for spec in (cut, other):
        agent.launch(spec)
        await seen.wait(spec.instance_id, "running")
    await agent.close()
    fresh, heard = make_agent()
    await fresh.stop(cut.instance_id, {})
    await heard.wait(cut.instance_id, "stopped")
    deadline = time.monotonic() + 20
    while f"labgate-{SITE}-{cut.instance_id}" in slurm.run("squeue", "-h", "-o", "%j"):
        assert time.monotonic() < deadline, "the job is still there"
        await asyncio.sleep(0.2)
    assert f"labgate-{SITE}-{other.instance_id}" in slurm.run("squeue", "-h", "-o", "%j")
    await fresh.stop(other.instance_id, seen.saved(other.instance_id)[0])
    await fresh.close()


def test_doctor_says_whether_the_controller_answers(slurm, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, secret_key=TEST_SECRET_KEY)
    ok, owners = SlurmBackend(settings, slurm.options()).doctor()
    assert ok.level == "ok", ok
    # The tests' agent is root: it can run jobs as their owners.
    assert (owners.level, owners.detail) == ("ok", "jobs run as their owners' Unix accounts")
    [missing] = SlurmBackend(settings, slurm.options(bin_dir=str(tmp_path))).doctor()
    assert missing.level == "fail" and "sbatch" in missing.detail and missing.final
    down = tmp_path / "down.conf"
    down.write_text(slurm.conf.read_text().replace("SlurmctldPort=", "SlurmctldPort=1"))
    [fail] = SlurmBackend(settings, slurm.options(slurm_conf=str(down))).doctor()
    assert fail.level == "fail" and "does not answer" in fail.detail, fail


async def test_a_batch_job_through_the_reusable_layer_and_its_sacct_usage(slurm, tmp_path):
    from labgate.backends.slurm.jobs import JobRequest, Slurm

    cluster = Slurm(str(slurm.conf))
    request = JobRequest(
        name="labgate-batch-step",
        body="echo step done\nsleep 1\n",
        shebang="#!/bin/sh",
        partition="batch",
        cpus=2,
        time_limit=120,
        output=str(tmp_path / "step.log"),
        workdir=str(tmp_path),
    )
    job_id = await cluster.submit(request, tmp_path / "step.sh")
    deadline = time.monotonic() + 30
    while (job := await cluster.job(job_id)) is not None and job.active:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)
    assert job is not None and job.state == "COMPLETED" and job.partition == "batch", job
    assert (tmp_path / "step.log").read_text().strip() == "step done"
    if shutil.which("slurmdbd") is None:
        assert await cluster.usage(job_id) is None  # no accounting: sacct knows nothing
        return
    while (usage := await cluster.usage(job_id)) is None or usage.state != "COMPLETED":
        assert time.monotonic() < deadline + 30, usage
        await asyncio.sleep(0.3)
    assert usage.cpus == 2 and usage.elapsed >= 1
    assert usage.core_hours == pytest.approx(2 * usage.elapsed / 3600)
