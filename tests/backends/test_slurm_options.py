"""The slurm backend's site options, users' choices and job scripts (no cluster needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labgate.backends.slurm.backend import _read_endpoint, describe_end, endpoint_address
from labgate.backends.slurm.jobs import JobRequest, format_time, parse_job, parse_time
from labgate.backends.slurm.options import SlurmOptions, placement
from labgate.errors import InstanceStartError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 1800),
        ("1:30", 90),
        ("1:00:00", 3600),
        ("2-00", 172800),
        ("2-01:30", 178200),
        ("1-00:00:01", 86401),
        ("UNLIMITED", None),
    ],
)
def test_slurm_times_are_read_in_every_spelling(text, seconds):
    assert parse_time(text) == seconds


def test_times_are_written_as_slurm_reads_them():
    assert format_time(3600) == "0-01:00:00"
    assert parse_time(format_time(93784)) == 93784


def test_extra_directives_must_be_sbatch_options():
    options = SlurmOptions(extra_directives=["#SBATCH --mail-type=NONE", "--exclusive"])
    assert options.extra_directives == ["--mail-type=NONE", "--exclusive"]
    for bad in ["rm -rf /", "--x=1\nrm -rf /", "#SBATCH"]:
        with pytest.raises(ValueError, match="not an sbatch option"):
            SlurmOptions(extra_directives=[bad])


def test_site_options_are_checked_at_start_up():
    with pytest.raises(ValueError, match="only partition"):
        SlurmOptions(choices={"nodes": ["2"]})
    with pytest.raises(ValueError, match="longer than max_time"):
        SlurmOptions(default_time="2:00:00", max_time="1:00:00")
    with pytest.raises(ValueError, match="finite"):
        SlurmOptions(max_time="UNLIMITED")


def test_users_choose_only_among_allowed_values():
    options = SlurmOptions(
        partition="interactive",
        default_time="1:00:00",
        max_time="4:00:00",
        choices={"partition": ["interactive", "gpu"], "gres": ["gpu:1"]},
    )
    chosen = placement(options, {"partition": "gpu", "gres": "gpu:1", "time": "2:00:00"})
    assert (chosen.partition, chosen.gres, chosen.time_limit) == ("gpu", "gpu:1", 7200)
    assert placement(options, {}).partition == "interactive"  # the site's default
    for refused, words in [
        ({"partition": "bigmem"}, "partition 'bigmem' is not allowed"),
        ({"account": "other-lab"}, "account 'other-lab' is not allowed"),
        ({"time": "5:00:00"}, "at most 4:00:00"),
        ({"time": "soon"}, "not a Slurm time"),
        ({"nodes": "4"}, "'nodes' cannot be chosen"),
        ({"partition": "gpu\n#SBATCH --uid=0"}, "is not allowed"),
    ]:
        with pytest.raises(InstanceStartError, match=words):
            placement(options, refused)


def test_a_job_script_has_one_directive_per_line_and_nothing_injected():
    request = JobRequest(
        name="labgate-hpc-abc",
        body="print('hi')\n",
        shebang="#!/usr/bin/python3",
        partition="gpu",
        gres="gpu:1",
        time_limit=3600,
        cpus=2,
        memory=2 * 1024**3,
        extra=("--exclusive",),
    )
    lines = request.script().splitlines()
    assert lines[0] == "#!/usr/bin/python3"
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --gres=gpu:1" in lines
    assert "#SBATCH --time=0-01:00:00" in lines and "#SBATCH --mem=2048M" in lines
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --exclusive" in lines
    assert "#SBATCH --export=NONE" in lines
    with pytest.raises(ValueError, match="no spaces"):
        JobRequest(name="x", body="", workdir="/tmp/a\n#SBATCH --uid=0").script()


def test_scontrol_lines_are_read_with_spaces_in_values():
    line = (
        "JobId=42 JobName=labgate-hpc-i1 UserId=root(0) JobState=PENDING Reason=Resources "
        "Dependency=(null) TimeLimit=01:00:00 StartTime=2026-12-02T14:45:38 "
        "EndTime=2026-12-02T15:45:38 NodeList=(null) BatchHost=c042 NumCPUs=2 "
        "Partition=interactive Command=/x y/job.py ExitCode=0:0"
    )
    job = parse_job(line)
    assert (job.id, job.state, job.reason, job.node, job.cpus) == (
        "42",
        "PENDING",
        "Resources",
        "c042",
        2,
    )
    assert job.time_limit == 3600 and job.end is not None and job.start is not None
    assert job.fields["Command"] == "/x y/job.py"
    cancelled = parse_job("JobId=7 JobState=CANCELLED Reason=None ExitCode=0:15")
    assert describe_end(cancelled, "7") == (
        "Slurm job 7 cancelled outside labgate (scancel) (CANCELLED)"
    )
    assert "is gone" in describe_end(None, "7")


def test_an_endpoint_is_taken_only_from_the_jobs_own_report(tmp_path: Path):
    path = tmp_path / "endpoint.json"
    me = os.geteuid()
    assert _read_endpoint(path, "12", me) is None
    path.write_text(json.dumps({"node": "c1", "port": 20001, "job_id": "11"}))
    assert _read_endpoint(path, "12", me) is None  # a previous job's report
    report = {"node": "c1", "port": 20001, "job_id": "12"}
    path.write_text(json.dumps(report))
    assert _read_endpoint(path, "12", me) == report


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other uids (run as root)")
def test_an_endpoint_is_taken_only_when_the_jobs_account_wrote_it_with_a_port_of_the_site(
    tmp_path: Path,
):
    job_uid, other_uid = 54321, 54322  # the job's account, another account
    path = tmp_path / "endpoint.json"
    report = {"node": "c1", "host": "10.0.0.5", "port": 20001, "job_id": "12"}
    path.write_text(json.dumps(report))
    os.chown(path, job_uid, job_uid)
    assert _read_endpoint(path, "12", job_uid, (20000, 30000)) == report
    os.chown(path, 0, 0)  # root's: the agent's own (run_as = "agent" as root)
    assert _read_endpoint(path, "12", job_uid, (20000, 30000)) == report
    # Written by another account (a job of someone else's, into a directory it could reach).
    os.chown(path, other_uid, other_uid)
    assert _read_endpoint(path, "12", job_uid, (20000, 30000)) is None
    # A port outside the site's range: a job pointing the router at another service.
    os.chown(path, job_uid, job_uid)
    assert _read_endpoint(path, "12", job_uid, (21000, 30000)) is None
    assert _read_endpoint(path, "12", job_uid, (0, 0)) == report  # no range: any port
    for port in (0, 70000, "20001", True):
        path.write_text(json.dumps({**report, "port": port}))
        os.chown(path, job_uid, job_uid)
        assert _read_endpoint(path, "12", job_uid) is None, port
    # A link to a file root wrote is not followed, nor is a FIFO opened.
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps(report))
    path.unlink()
    path.symlink_to(elsewhere)
    assert _read_endpoint(path, "12", job_uid) is None
    path.unlink()
    os.mkfifo(path)
    assert _read_endpoint(path, "12", job_uid) is None


def test_the_router_goes_only_to_the_endpoint_host_or_the_node_slurm_reports():
    # The job's own address for its node is used when the node's name resolves to it.
    assert endpoint_address("127.0.0.1", "", "localhost") == "127.0.0.1"
    assert endpoint_address("127.0.0.1", "127.0.0.1", "c042") == "127.0.0.1"
    assert endpoint_address("c042", "", "c042") == "c042"
    # Any other host a job names is not: the node Slurm reports is.
    assert endpoint_address("192.0.2.7", "", "localhost") == "localhost"
    assert endpoint_address("intranet.example", "10.1.2.3", "c042") == "c042"
    assert endpoint_address(None, "10.1.2.3", "c042") == "10.1.2.3"  # an older report


@pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other uids (run as root)")
def test_a_jobs_log_is_read_only_from_its_own_file(tmp_path: Path):
    from labgate.backends.procfs import tail

    job_uid = 54321
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    log = tmp_path / "job.log"
    log.write_text("--- labgate: starting\n")
    assert tail(log, 10, owners=(job_uid,)) == ""  # root's file, not the job's
    os.chown(log, job_uid, job_uid)
    assert tail(log, 10, owners=(job_uid,)) == "--- labgate: starting\n"
    # The job's account owns the directory: a link it puts there is not read through.
    log.unlink()
    log.symlink_to(secret)
    assert tail(log, 10, owners=(job_uid,)) == ""
    log.unlink()
    os.link(secret, log)
    os.chown(secret, job_uid, job_uid)
    assert tail(log, 10, owners=(job_uid,)) == ""  # a second name of a file: not its own


def test_accounts_must_be_unix_account_names():
    options = SlurmOptions(accounts={"alice": "alice01", "bob": "b.smith"})
    assert options.run_as == "owner" and options.min_uid == 1000
    for bad in ["-rf", "a b", "", "x" * 40, "a/b"]:
        with pytest.raises(ValueError, match="is not a Unix account name"):
            SlurmOptions(accounts={"alice": bad})
    with pytest.raises(ValueError):
        SlurmOptions(run_as="root")
