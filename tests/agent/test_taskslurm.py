"""The Slurm task executor's files, without a cluster: what the agent takes from a job's directory.

The job's account owns its job directory and could leave links, hard links
or files of someone else's there; the agent (root) must take only the job's
own files. The job's body (:func:`labgate.agent.taskexec.run_job`) packs
the results itself, leaving links out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from labgate.agent import taskexec, taskslurm

#: A uid of nobody's on this machine: the job's account in these tests.
JOB_UID = 54321


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    """A job directory owned by the job's account, as the agent makes it."""
    path = tmp_path / "jobs" / "tasks" / "a1b2c3d4e5"
    path.mkdir(parents=True)
    os.chown(path, JOB_UID, JOB_UID)
    return path


def owned(path: Path, data: bytes, uid: int = JOB_UID) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, uid, follow_symlinks=False)
    return path


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another account needs root")
def test_the_agent_takes_only_the_jobs_own_files(tmp_path: Path, job_dir: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")  # root's, as /etc/shadow is
    mine = tmp_path / "private"
    mine.mkdir()
    # A link to the secret where the output goes; a hard link to it where the results go.
    (job_dir / "output.log").symlink_to(secret)
    os.link(secret, job_dir / taskexec.RESULTS_ARCHIVE)
    # exit.json of another account's: not the job's word.
    owned(job_dir / "exit.json", b'{"state": "succeeded", "exit_code": 0}', uid=JOB_UID + 1)
    assert taskslurm._own_json(job_dir / "exit.json", JOB_UID) is None
    taskslurm._take_over(mine, job_dir, JOB_UID, {"state": "lost", "reason": "gone"})
    assert "secret" not in (mine / "output.log").read_text()
    assert not (mine / taskexec.RESULTS_ARCHIVE).exists()
    assert json.loads((mine / "exit.json").read_text())["state"] == "lost"
    assert not job_dir.exists() and secret.read_text() == "root's secret\n"  # only the job's gone

    # The job's own files are taken; an exit.json too large is not.
    job_dir.mkdir()
    os.chown(job_dir, JOB_UID, JOB_UID)
    owned(job_dir / "output.log", b"line one\nline two\n")
    owned(job_dir / "exit.json", json.dumps({"state": "succeeded", "result": "x" * 2**21}).encode())
    assert taskslurm._own_json(job_dir / "exit.json", JOB_UID) is None
    owned(job_dir / "exit.json", b'{"state": "bogus", "exit_code": true, "result": [1]}')
    told = taskslurm._own_json(job_dir / "exit.json", JOB_UID)
    assert told is not None
    # A state the executor does not write is a failure; an exit code must be a number.
    assert taskslurm._clean(told) == {
        "state": "failed",
        "exit_code": None,
        "reason": "",
        "result": [1],
        "seconds": 0.0,
    }
    taskslurm._take_over(mine, job_dir, JOB_UID, taskslurm._clean(told))
    assert (mine / "output.log").read_text() == "line one\nline two\n"


def test_a_jobs_body_runs_the_task_and_packs_its_results_without_links(tmp_path: Path) -> None:
    directory = tmp_path / "job"
    directory.mkdir()
    (tmp_path / "outside").write_text("not the task's\n")
    command = (
        "echo out > $LABGATE_RESULTS_DIR/a.txt; mkdir $LABGATE_RESULTS_DIR/d;"
        " echo in > $LABGATE_RESULTS_DIR/d/b.txt;"
        f" ln -s {tmp_path / 'outside'} $LABGATE_RESULTS_DIR/link;"
        " echo '{\"n\": 1}' > $LABGATE_RESULT; echo $SLURM_JOB_ID"
    )
    (directory / "task.json").write_text(json.dumps({"command": command, "timeout": 30}))
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    script = taskslurm.executor_source() + f"\n\nsys.exit(run_job({str(directory)!r}))\n"
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=60)
    outcome = json.loads((directory / "exit.json").read_text())
    assert outcome["state"] == "succeeded" and outcome["result"] == {"n": 1}
    assert (directory / "output.log").read_text() == "4242\n"  # Slurm's variables reach the task
    with tarfile.open(directory / taskexec.RESULTS_ARCHIVE) as tar:
        assert sorted(tar.getnames()) == ["a.txt", "d", "d/b.txt"]
