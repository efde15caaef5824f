"""Slurm jobs run as their owners' Unix accounts (``run_as = "owner"``), on the real test cluster.

The test users' accounts (``lgslurm-alice``, ``lgslurm-bob``... made by the
``slurm_cluster`` fixture) run their jobs: Slurm's record and the tool's own
process carry the account's uid, the job's directory, ``launch.json`` and
workspace are the account's alone, and another account's job cannot read
them (tried as that account). Launches for a user with no account, or one
mapped to root or a daemon, fail with the reason; a non-root agent is refused
(tried as an account too); ``run_as = "agent"`` still runs jobs as the agent.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import TEST_SECRET_KEY
from labgate.backends.slurm import SlurmBackend
from labgate.config import Settings
from labgate.errors import InstanceStartError
from slurm_agents import healthy, spec_of
from slurm_cluster import Cluster

pytestmark = pytest.mark.slow


def as_account(account: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as ``account`` (its uid, gid and groups), as its own job would."""
    entry = pwd.getpwnam(account)
    return subprocess.run(
        argv,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=os.getgrouplist(account, entry.pw_gid),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def owner_and_mode(path: Path) -> tuple[int, int]:
    """Who owns ``path`` and its permission bits."""
    info = path.stat()
    return info.st_uid, stat.S_IMODE(info.st_mode)


def process_uids(pid: int) -> set[str]:
    """The real, effective, saved and filesystem uids of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return set(line.split()[1:])
    raise AssertionError(f"no Uid line for process {pid}")


async def test_a_job_runs_as_its_owners_account_and_its_files_are_theirs(
    make_agent, demo, slurm: Cluster, slurm_dir: Path, slurm_accounts: dict[str, str]
) -> None:
    agent, seen = make_agent()
    spec = spec_of(demo)  # labgate user alice, lgslurm-alice by the site's accounts table
    agent.launch(spec)
    await seen.wait(spec.instance_id, "running", timeout=60)
    state, endpoint = seen.saved(spec.instance_id)
    alice = pwd.getpwnam(slurm_accounts["alice"])
    assert (state["run_as"], state["account"], state["uid"], state["gid"]) == (
        "owner",
        "lgslurm-alice",
        alice.pw_uid,
        alice.pw_gid,
    )
    # Slurm's record of the job, and the tool's own process, are the account's.
    assert slurm.run("squeue", "-h", "-j", state["job_id"], "-o", "%u").strip() == "lgslurm-alice"
    job_dir = Path(state["dir"])
    report = json.loads((job_dir / "endpoint.json").read_text())
    assert process_uids(report["pid"]) == {str(alice.pw_uid)}
    assert await healthy(endpoint, spec)
    # jobs_dir lets every account through to its own directory and lists none.
    assert owner_and_mode(slurm_dir / "jobs") == (0, 0o711)
    assert owner_and_mode(job_dir) == (alice.pw_uid, 0o700)
    assert owner_and_mode(job_dir / "launch.json") == (alice.pw_uid, 0o600)
    assert (job_dir / "endpoint.json").stat().st_uid == alice.pw_uid  # written by the job
    workspace = Path(state["workspace"])
    assert workspace == slurm_dir / "workspaces" / "alice"
    assert owner_and_mode(workspace) == (alice.pw_uid, 0o700)
    assert owner_and_mode(workspace.parent) == (0, 0o711)
    await agent.stop(spec.instance_id, {})


async def test_one_users_job_cannot_read_anothers_token_or_workspace(
    make_agent, demo, slurm_dir: Path, slurm_accounts: dict[str, str]
) -> None:
    agent, seen = make_agent()
    alice, bob = spec_of(demo, owner="alice"), spec_of(demo, owner="bob")
    for spec in (alice, bob):
        agent.launch(spec)
    for spec in (alice, bob):
        await seen.wait(spec.instance_id, "running", timeout=60)
    theirs, mine = seen.saved(alice.instance_id)[0], seen.saved(bob.instance_id)[0]
    notes = Path(theirs["workspace"]) / "notes.txt"
    written = as_account(slurm_accounts["alice"], "sh", "-c", f"echo private > {notes}")
    assert written.returncode == 0, written.stderr
    # What bob's job could try, as bob's account: nothing of alice's opens.
    for argv in (
        ["cat", str(Path(theirs["dir"]) / "launch.json")],
        ["ls", theirs["dir"]],
        ["ls", theirs["workspace"]],
        ["cat", str(notes)],
        ["ls", str(slurm_dir / "jobs")],
        ["ls", str(slurm_dir / "workspaces")],
    ):
        done = as_account(slurm_accounts["bob"], *argv)
        assert done.returncode != 0 and "Permission denied" in done.stderr, (argv, done)
    # Its own token it reads (the launcher does), as alice reads her notes.
    done = as_account(slurm_accounts["bob"], "cat", str(Path(mine["dir"]) / "launch.json"))
    assert bob.secret in done.stdout
    assert as_account(slurm_accounts["alice"], "cat", str(notes)).stdout == "private\n"
    for spec in (alice, bob):
        await agent.stop(spec.instance_id, {})


async def test_a_user_not_in_the_accounts_table_runs_as_the_account_of_their_name(
    make_agent, demo, slurm: Cluster, slurm_accounts: dict[str, str]
) -> None:
    agent, seen = make_agent()
    carol = slurm_accounts["carol"]  # a labgate user named like the account: no entry needed
    spec = spec_of(demo, owner=carol)
    agent.launch(spec)
    await seen.wait(spec.instance_id, "running", timeout=60)
    state, _ = seen.saved(spec.instance_id)
    assert state["account"] == carol and state["uid"] == pwd.getpwnam(carol).pw_uid
    assert slurm.run("squeue", "-h", "-j", state["job_id"], "-o", "%u").strip() == carol
    await agent.stop(spec.instance_id, {})


async def test_launches_for_no_account_root_or_a_daemon_fail_with_the_reason(
    tmp_path: Path, demo, slurm: Cluster, slurm_dir: Path, slurm_accounts: dict[str, str]
) -> None:
    settings = Settings(data_dir=tmp_path / "var", secret_key=TEST_SECRET_KEY)
    alice_uid = pwd.getpwnam(slurm_accounts["alice"]).pw_uid
    daemon = next(entry for entry in pwd.getpwall() if 0 < entry.pw_uid < 1000)
    for owner, extra, words in [
        ("nosuchuser", {}, "labgate user 'nosuchuser' has no Unix account 'nosuchuser'"),
        ("alice", {"accounts": {"alice": "root"}}, "Unix account 'root' (uid 0)"),
        ("alice", {"accounts": {"alice": daemon.pw_name}}, "under min_uid 1000"),
        ("alice", {"min_uid": alice_uid + 1}, f"under min_uid {alice_uid + 1}"),
    ]:
        options = slurm.options(jobs_dir=str(slurm_dir / "jobs"), **extra)
        backend = SlurmBackend(settings, options)
        with pytest.raises(InstanceStartError, match=re.escape(words)) as refused:
            await backend.start(spec_of(demo, owner=owner))
        assert "site option accounts" in str(refused.value)
    # Nothing was submitted, nothing made.
    assert slurm.run("squeue", "-h", "-o", "%i").split() == []
    assert not (slurm_dir / "jobs").exists()


async def test_a_job_directory_its_account_cannot_reach_fails_the_launch(
    tmp_path: Path, demo, slurm: Cluster, slurm_dir: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "var", secret_key=TEST_SECRET_KEY)
    private = slurm_dir / "private"  # above it, every account passes through
    private.mkdir(mode=0o700)
    for extra, words in [
        ({"jobs_dir": str(private / "jobs")}, "its job directory"),
        (
            {"jobs_dir": str(slurm_dir / "jobs"), "workspaces_dir": str(private / "ws")},
            "its workspace",
        ),
    ]:
        backend = SlurmBackend(settings, slurm.options(request_memory=False, **extra))
        root = backend.workspaces_root() or slurm_dir / "workspaces"
        spec = spec_of(demo)
        with pytest.raises(InstanceStartError, match=words) as refused:
            await backend.start(replace(spec, workspace=root / spec.workspace))
        assert f"{private} (mode 0700" in str(refused.value)
        assert f"site option {extra and list(extra)[-1]}" in str(refused.value)
    assert slurm.run("squeue", "-h", "-o", "%i").split() == []


async def test_a_workspace_others_could_put_a_link_in_place_of_is_refused(
    tmp_path: Path, demo, slurm: Cluster, slurm_dir: Path
) -> None:
    settings = Settings(data_dir=tmp_path / "var", secret_key=TEST_SECRET_KEY)
    shared = slurm_dir / "shared-workspaces"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: any account may create a name there
    backend = SlurmBackend(
        settings,
        slurm.options(
            request_memory=False, jobs_dir=str(slurm_dir / "jobs"), workspaces_dir=str(shared)
        ),
    )
    spec = spec_of(demo)
    with pytest.raises(InstanceStartError, match="writable by it alone"):
        await backend.start(replace(spec, workspace=shared / "alice"))
    # A link where a workspace goes (root would chmod and chown what it points to): refused.
    shared.chmod(0o711)
    target = slurm_dir / "target"
    target.mkdir(mode=0o755)
    (shared / "alice").symlink_to(target)
    with pytest.raises(InstanceStartError, match="is a symbolic link"):
        await backend.start(replace(spec, workspace=shared / "alice"))
    assert owner_and_mode(target) == (0, 0o755)
    assert slurm.run("squeue", "-h", "-o", "%i").split() == []


async def test_run_as_agent_still_runs_jobs_as_the_agents_account(
    make_agent, demo, slurm: Cluster
) -> None:
    agent, seen = make_agent(run_as="agent")
    spec = spec_of(demo, owner="nosuchuser")  # no account needed
    agent.launch(spec)
    await seen.wait(spec.instance_id, "running", timeout=60)
    state, endpoint = seen.saved(spec.instance_id)
    assert (state["run_as"], state["uid"]) == ("agent", os.geteuid())
    assert slurm.run("squeue", "-h", "-j", state["job_id"], "-o", "%U").strip() == str(os.geteuid())
    assert await healthy(endpoint, spec)
    await agent.stop(spec.instance_id, {})


AS_AGENT = """
import asyncio, json, sys
from pathlib import Path
from labgate.backends.slurm import SlurmBackend
from labgate.config import Settings
from labgate.errors import InstanceStartError

settings = Settings(data_dir=Path(sys.argv[1]), secret_key=sys.argv[2])
backend = SlurmBackend(settings, json.loads(sys.argv[3]))
found = {"doctor": [[d.level, d.detail, d.fix] for d in backend.doctor()]}
try:
    backend.account_of("alice")
except InstanceStartError as exc:
    found["start"] = str(exc)
print(json.dumps(found))
"""


def test_an_agent_that_is_not_root_is_refused_and_doctor_says_so(
    slurm: Cluster, slurm_accounts: dict[str, str]
) -> None:
    # The agent runs as a test account: it cannot submit as another.
    done = as_account(
        slurm_accounts["carol"],
        slurm.python,
        "-c",
        AS_AGENT,
        "/nonexistent",
        TEST_SECRET_KEY,
        json.dumps(slurm.options()),
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert "needs the agent to run as root" in found["start"], found
    assert 'run_as = "agent"' in found["start"]
    [slurm_ok, owners] = found["doctor"]
    assert slurm_ok[0] == "ok", found
    assert owners[0] == "fail" and "needs the agent to run as root" in owners[1], found
    assert "run the site's agent as root" in owners[2]
