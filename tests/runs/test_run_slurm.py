"""Runs on a Slurm site: each task attempt a batch job on the real one-node test cluster.

The jobs run as their owners' test accounts (``lgslurm-alice``: the cluster's
``options()`` map the users to them), their files in a job directory of the
account's on the shared area; results come back through the agent; a job
cancelled outside labgate is retried, then fails the run with Slurm's
reason; cancelling a run scancels its jobs.
"""

from __future__ import annotations

import asyncio
import io
import os
import pwd
import stat
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from runs_helpers import make_wheel, submit, tasks_of, wait_run

from labgate.agent import taskslurm
from labgate.agent.tasks import TaskRunner
from labgate.agent.taskslurm import SlurmTaskExecutor
from labgate.backends.slurm import SlurmBackend
from labgate.config import Settings, SiteConfig
from labgate.errors import BadRequest
from labgate.wire.runs import TaskSpec
from labgate.wire.site import Report
from slurm_cluster import ACCOUNTS, Cluster

pytestmark = pytest.mark.slow

SITE = "hpc"
#: Job names of this site's task attempts start so (then the attempt id).
TASK_JOBS = f"labgate.task.{SITE}."


@pytest.fixture
def slurm(slurm_cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, its node emptied of jobs after the test."""
    try:
        yield slurm_cluster
    finally:
        slurm_cluster.cancel_all()


@pytest.fixture
def slurm_dir(slurm: Cluster) -> Path:
    """The test's part of the shared area: the task jobs' directories go there."""
    return slurm.area()


@pytest.fixture
def settings(settings: Settings, slurm: Cluster, slurm_dir: Path) -> Settings:
    """One Slurm site on the test cluster; ``mallory`` is mapped to root (refused)."""
    options = slurm.options(
        request_memory=False,
        jobs_dir=str(slurm_dir / "jobs"),
        workspaces_dir=str(slurm_dir / "workspaces"),
        accounts={**ACCOUNTS, "mallory": "root"},
    )
    return settings.model_copy(
        update={"sites": [SiteConfig(name=SITE, backend="slurm", options=options)]}
    )


#: Job states in which a job runs or will: a cancelled one shows COMPLETING a while.
LIVE = ("PENDING", "CONFIGURING", "RUNNING")


def task_jobs(slurm: Cluster) -> dict[str, tuple[str, str]]:
    """This site's task jobs in the queue: attempt id -> (job id, state)."""
    found = {}
    for line in slurm.run("squeue", "-h", "-o", "%i|%j|%T").splitlines():
        job_id, name, state = line.strip().split("|")
        if name.startswith(TASK_JOBS):
            found[name[len(TASK_JOBS) :]] = (job_id, state)
    return found


async def running_jobs(slurm: Cluster, count: int, timeout: float = 60) -> dict[str, str]:
    """Wait until ``count`` task jobs run; attempt id -> job id."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = await asyncio.to_thread(task_jobs, slurm)
        running = {a: job for a, (job, state) in jobs.items() if state == "RUNNING"}
        if len(running) >= count:
            return running
        assert time.monotonic() < deadline, f"task jobs: {jobs}"
        await asyncio.sleep(0.2)


TWO_STAGES = """
name = "hpc-two"

[[stages]]
name = "make"
[[stages.tasks]]
name = "make"
command = '''
id -u > $LABGATE_RESULTS_DIR/uid
echo $SLURM_JOB_ID > $LABGATE_RESULTS_DIR/job
echo hello > $LABGATE_RESULTS_DIR/data.txt
echo '{"n": 3}' > $LABGATE_RESULT
echo made it
'''
timeout = 120

[[stages]]
name = "use"
[[stages.tasks]]
name = "call"
callable = "json:dumps"
args = {obj = [1, 2]}
"""


async def test_a_two_stage_run_on_a_slurm_site_runs_as_its_owner_with_results_back(
    client: httpx.AsyncClient, make_user, slurm: Cluster, slurm_dir: Path
) -> None:
    alice = await make_user("alice")
    run_id = await submit(client, alice, TWO_STAGES)
    run = await wait_run(client, alice, run_id, timeout=120)
    assert run["state"] == "succeeded", run
    tasks = tasks_of(run)
    assert tasks["make"]["site"] == tasks["call"]["site"] == SITE
    assert tasks["make"]["result"] == {"n": 3}
    assert tasks["make"]["files"] == ["data.txt", "job", "uid"]
    assert tasks["call"]["result"] == "[1, 2]"
    assert all(t["exit_code"] == 0 for t in tasks.values())

    archive = await client.get(f"/api/v1/runs/{run_id}/results", headers=alice)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        files = {
            name: (tar.extractfile(name) or io.BytesIO()).read().decode()
            for name in ("make/uid", "make/job", "make/data.txt", ".logs/make.log")
        }
    # It ran as alice's account, in a Slurm job of its own, with the task's time limit.
    assert int(files["make/uid"]) == pwd.getpwnam(ACCOUNTS["alice"]).pw_uid
    assert files["make/data.txt"] == "hello\n"
    assert "made it" in files[".logs/make.log"]
    job = slurm.run("scontrol", "-o", "show", "job", files["make/job"].strip())
    assert f"JobName={TASK_JOBS}" in job
    assert f"UserId={ACCOUNTS['alice']}(" in job
    assert "TimeLimit=00:03:00" in job  # 120 s and a minute's grace
    # The job's directory was removed once its results were taken.
    assert list((slurm_dir / "jobs" / "tasks").iterdir()) == []


async def test_python_requirements_run_in_a_venv_the_agent_made_on_the_shared_area(
    client: httpx.AsyncClient, make_user, slurm: Cluster, slurm_dir: Path, shelf: Path
) -> None:
    alice = await make_user("alice")
    wheel = make_wheel(shelf, "labgate_hpc_pkg", "def answer(x):\n    return {'twice': 2 * x}\n")
    definition = f"""
name = "hpc-env"
[[stages]]
name = "one"
[[stages.tasks]]
name = "call"
callable = "labgate_hpc_pkg:answer"
args = {{x = 21}}
environment = {{python = ["{wheel}"]}}
[[stages.tasks]]
name = "where"
command = ["python", "-c", "import labgate_hpc_pkg, os, sys; print(sys.prefix, os.getuid())"]
environment = {{python = ["{wheel}"]}}
"""
    run_id = await submit(client, alice, definition)
    run = await wait_run(client, alice, run_id, timeout=240)
    assert run["state"] == "succeeded", (tasks_of(run), run["events"][-6:])
    assert tasks_of(run)["call"]["result"] == {"twice": 42}
    envs = list((slurm_dir / "jobs" / "envs").iterdir())
    assert len(envs) == 1  # one list, one venv, for both jobs
    # The list names a wheel file, read as alice's account: the venv is that account's
    # alone (another might not read the file), its files the agent's.
    account = pwd.getpwnam(ACCOUNTS["alice"])
    info = envs[0].stat()
    assert info.st_uid == account.pw_uid and stat.S_IMODE(info.st_mode) == 0o700
    assert (envs[0] / "pyvenv.cfg").stat().st_uid == os.geteuid()
    logs = await client.get(f"/api/v1/runs/{run_id}/logs", params={"task": "where"}, headers=alice)
    prefix, uid = logs.json()["text"].split()
    assert prefix == str(envs[0].resolve())
    assert int(uid) == account.pw_uid


ONE_LONG = """
name = "{name}"
[[stages]]
name = "one"
[[stages.tasks]]
name = "long"
command = "echo started; sleep 60"
retries = {retries}
where = {{copies = {copies}}}
"""


async def test_a_job_cancelled_outside_labgate_is_retried_then_fails_the_run_with_the_reason(
    client: httpx.AsyncClient, make_user, slurm: Cluster, slurm_dir: Path
) -> None:
    alice = await make_user("alice")
    run_id = await submit(client, alice, ONE_LONG.format(name="outside", retries=1, copies=1))
    account = pwd.getpwnam(ACCOUNTS["alice"])
    for attempt in (1, 2):
        jobs = await running_jobs(slurm, 1)
        ((attempt_id, job_id),) = jobs.items()
        if attempt == 1:
            # Its output so far, read from the job's directory while it runs.
            deadline = time.monotonic() + 30
            while True:
                logs = await client.get(
                    f"/api/v1/runs/{run_id}/logs", params={"task": "long"}, headers=alice
                )
                if "started" in logs.json().get("text", ""):
                    break
                assert time.monotonic() < deadline, logs.text
                await asyncio.sleep(0.2)
            # The job's directory is its account's alone, in a directory only the agent writes.
            tasks_dir = slurm_dir / "jobs" / "tasks"
            info, above = (tasks_dir / attempt_id).stat(), tasks_dir.stat()
            assert (info.st_uid, info.st_gid) == (account.pw_uid, account.pw_gid)
            assert stat.S_IMODE(info.st_mode) == 0o700
            assert above.st_uid == os.geteuid() and stat.S_IMODE(above.st_mode) == 0o711
            token = (tasks_dir / attempt_id / "task.json").stat()
            assert token.st_uid == account.pw_uid and stat.S_IMODE(token.st_mode) == 0o600
        slurm.run("scancel", job_id)  # by someone else than labgate
        # Gone from the queue, or COMPLETING while its node cleans up (slow when loaded).
        deadline = time.monotonic() + 60
        while (await asyncio.to_thread(task_jobs, slurm)).get(attempt_id, ("", ""))[1] in LIVE:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    run = await wait_run(client, alice, run_id, timeout=60)
    assert run["state"] == "failed", run
    task = tasks_of(run)["long"]
    assert task["state"] == "lost" and task["attempts"] == 2, task
    assert "cancelled outside labgate (scancel)" in task["reason"], task
    lost = [e for e in run["events"] if e["task"] == "long" and e["state"] == "lost"]
    assert len(lost) == 2 and "attempt 1" in lost[0]["message"], lost
    assert "cancelled outside labgate" in lost[0]["message"]


async def test_cancelling_a_run_scancels_its_jobs(
    client: httpx.AsyncClient, make_user, slurm: Cluster
) -> None:
    alice = await make_user("alice")
    run_id = await submit(client, alice, ONE_LONG.format(name="stopped", retries=0, copies=2))
    jobs = await running_jobs(slurm, 2)
    cancelled = await client.post(f"/api/v1/runs/{run_id}/cancel", headers=alice)
    assert cancelled.status_code == 200, cancelled.text
    deadline = time.monotonic() + 30
    while set(jobs) & set(await asyncio.to_thread(task_jobs, slurm)):
        assert time.monotonic() < deadline, "the run's jobs are still queued or running"
        await asyncio.sleep(0.2)
    run = await wait_run(client, alice, run_id, timeout=30)
    assert run["state"] == "cancelled"
    tasks = tasks_of(run)
    assert tasks["long"]["state"] == tasks["long#1"]["state"] == "cancelled"
    for job_id in jobs.values():  # Slurm ended them as cancelled
        assert "JobState=CANCELLED" in slurm.run("scontrol", "-o", "show", "job", job_id)


async def test_a_task_of_a_user_without_an_account_or_mapped_to_root_fails_with_the_reason(
    client: httpx.AsyncClient, make_user, slurm: Cluster
) -> None:
    definition = '[[stages]]\nname = "one"\n[[stages.tasks]]\nname = "who"\ncommand = "id"\n'
    for user, words in (
        ("dave", "labgate user 'dave' has no Unix account 'dave' on the cluster"),
        ("mallory", "maps to the Unix account 'root' (uid 0)"),
    ):
        headers = await make_user(user)
        run = await wait_run(client, headers, await submit(client, headers, definition))
        assert run["state"] == "failed", run
        assert words in tasks_of(run)["who"]["reason"], run
    assert await asyncio.to_thread(task_jobs, slurm) == {}  # nothing was submitted


def test_a_root_agent_running_jobs_as_itself_runs_no_task(settings: Settings) -> None:
    site = settings.sites[0]
    backend = SlurmBackend(settings, {**site.options, "run_as": "agent"})
    backend.attach(SITE)
    executor = SlurmTaskExecutor(backend)
    if os.geteuid() != 0:
        pytest.skip("only a root agent is refused")
    with pytest.raises(BadRequest, match="a task would run as root"):
        executor._account("alice")


def agents(settings: Settings, tmp_path: Path, reports: list[Report]) -> Callable[[], TaskRunner]:
    """Makes the task runner of a new agent of the Slurm site; all report into ``reports``."""

    async def record(report: Report) -> None:
        reports.append(report)

    def runner() -> TaskRunner:
        backend = SlurmBackend(settings, settings.sites[0].options)
        backend.attach(SITE)
        return TaskRunner(SITE, record, tmp_path / "tasks" / SITE, SlurmTaskExecutor(backend))

    return runner


async def test_an_agent_restarted_while_a_job_runs_finds_it_again(
    settings: Settings, slurm: Cluster, tmp_path: Path
) -> None:
    reports: list[Report] = []
    runner = agents(settings, tmp_path, reports)

    async def report(state: str) -> Report:
        deadline = time.monotonic() + 60
        while True:
            for found in reports:
                if found.state == state:
                    return found
            assert time.monotonic() < deadline, reports
            await asyncio.sleep(0.1)

    spec = TaskSpec(
        attempt_id=uuid.uuid4().hex[:16],
        run_id="r1",
        task="t",
        owner="alice",
        command="sleep 3; echo done; echo x > $LABGATE_RESULTS_DIR/f; echo '[7]' > $LABGATE_RESULT",
        timeout=60,
    )
    first = runner()
    await first.run(spec)
    await report("running")
    await running_jobs(slurm, 1)
    await first.close()  # the agent goes away; the job runs on
    second = runner()
    await second.adopt(spec.attempt_id)
    ended = await report("succeeded")
    assert ended.data["result"] == [7] and ended.data["files"] == ["f"], ended
    assert "done" in await second.logs(spec.attempt_id, 10)
    with tarfile.open(fileobj=io.BytesIO(await second.results(spec.attempt_id))) as tar:
        assert tar.getnames() == ["f"]
    await second.close()


async def test_a_job_submitted_by_an_agent_that_died_before_noting_it_is_cancelled(
    settings: Settings, slurm: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sbatch answered, the agent died before writing the job id down: no job runs on unseen."""
    reports: list[Report] = []
    runner = agents(settings, tmp_path, reports)

    def dies(directory: Path, body: Any, marker: Any) -> None:
        raise SystemExit("the agent died here")

    async def jobs_of(attempt_id: str, present: bool) -> None:
        deadline = time.monotonic() + 30
        while (attempt_id in await asyncio.to_thread(task_jobs, slurm)) != present:
            assert time.monotonic() < deadline, f"job of {attempt_id} present: {not present}"
            await asyncio.sleep(0.2)

    def spec() -> TaskSpec:
        return TaskSpec(
            attempt_id=uuid.uuid4().hex[:16],
            run_id="r1",
            task="t",
            owner="alice",
            command="sleep 60",
            timeout=120,
        )

    # Adopted after the restart: "lost", and its job is cancelled.
    adopted, again = spec(), spec()
    for cut in (adopted, again):
        first = runner()
        with monkeypatch.context() as patch:
            patch.setattr(taskslurm, "_write_private", dies)
            with pytest.raises(SystemExit):
                await first.executor.start(cut, first.directory(cut.attempt_id))
        await jobs_of(cut.attempt_id, present=True)
    second = runner()
    await second.adopt(adopted.attempt_id)
    lost = [r for r in reports if r.instance_id == adopted.attempt_id and r.state == "lost"]
    assert lost and "has no such task" in lost[0].message, reports
    await jobs_of(adopted.attempt_id, present=False)
    # Sent again after the restart: the unrecorded job goes, one new job runs it.
    second.tasks_dir.joinpath(again.attempt_id).mkdir(parents=True, exist_ok=True)
    await second.run(again)
    deadline = time.monotonic() + 30
    while not any(r.instance_id == again.attempt_id and r.state == "running" for r in reports):
        assert time.monotonic() < deadline, reports
        await asyncio.sleep(0.1)
    # The cancelled job may linger as COMPLETING while its node cleans up; it runs no more.
    live = slurm.run("squeue", "-h", "-t", ",".join(LIVE), "-o", "%j").split()
    assert live.count(f"{TASK_JOBS}{again.attempt_id}") == 1, live
    await second.cancel(again.attempt_id)
    await second.close()
