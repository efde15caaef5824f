"""Slurm jobs through its commands: submit, look up, cancel, account. Nothing here is labgate's.

This is the reusable part of the ``slurm`` backend: interactive instances use
it today and batch pipelines will submit their steps with it. It runs
``sbatch``, ``squeue``, ``scontrol``, ``scancel`` and ``sacct`` as the
agent's account (typically on a login node), with ``SLURM_CONF`` pointing at
the cluster when a site names one, and parses their machine-readable output.
A root agent may submit as another account (a :class:`Submitter`): ``sbatch``
then runs with that account's uid, gid and groups, and the job is its.

- :class:`JobRequest` is one batch job: the ``#SBATCH`` directives
  (partition, account, QOS, reservation, constraint, GRES, time limit, CPUs,
  memory, name, comment, output file, working directory, extra lines) and the
  script body. :meth:`JobRequest.script` renders it.
- :class:`Slurm` runs the commands: :meth:`Slurm.submit` (or
  :meth:`Slurm.submit_file`, a script already written) returns the job id;
  :meth:`Slurm.job` a :class:`Job` (state, reason, node, start and end times)
  or None once the controller has forgotten it; :meth:`Slurm.queue_position`
  where a pending job stands; :meth:`Slurm.cancel`; :meth:`Slurm.usage` the
  core-hours ``sacct`` accounted (None when the cluster keeps no accounting).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from labgate.aio import wait_for
from labgate.errors import BackendError

#: Job states in which the job still holds or waits for a place.
ACTIVE_STATES = frozenset(
    {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
)
_DIRECTIVE_RE = re.compile(r"^--?[A-Za-z][A-Za-z0-9-]*(=.*)?( .*)?$")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
COMMAND_TIMEOUT = 60.0


class SlurmError(BackendError):
    """A Slurm command failed (the controller is down, a request was refused)."""

    default_code = "slurm_error"


def parse_time(text: str) -> int | None:
    """Slurm's time format (``30``, ``1:30:00``, ``2-00:00:00``) in seconds; None: unlimited.

    ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` and ``D-HH:MM:SS`` are
    Slurm's spellings. Raises ValueError on anything else.
    """
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", "N/A"):
        return None
    found = _TIME_RE.match(text)
    if found is None:
        raise ValueError(f"not a Slurm time: {text!r}")
    days, first, second, third = found.groups()
    a, b, c = int(first), int(second or 0), int(third or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if third is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if second is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM


def format_time(seconds: int) -> str:
    """Seconds as ``D-HH:MM:SS`` (whole minutes are what Slurm enforces)."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def _timestamp(text: str) -> float | None:
    """``2026-12-02T14:45:38`` (the controller's local time) as Unix seconds."""
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class JobRequest:
    """One batch job: its directives and its script body."""

    name: str
    body: str
    #: The interpreter line; the body is written in its language.
    shebang: str = "#!/bin/sh"
    comment: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    reservation: str = ""
    constraint: str = ""
    gres: str = ""
    #: Seconds; None leaves the partition's default.
    time_limit: int | None = None
    cpus: int = 1
    #: Bytes; 0 leaves the partition's default.
    memory: int = 0
    output: str = ""
    workdir: str = ""
    #: Further directives, as ``--name=value`` (``#SBATCH`` in front is accepted).
    extra: tuple[str, ...] = ()
    #: ``--export``: which of the submitting environment the job sees.
    export: str = "NONE"

    def directives(self) -> list[str]:
        """The ``sbatch`` options, one per ``#SBATCH`` line."""
        lines = [f"--job-name={self.name}", f"--cpus-per-task={max(1, self.cpus)}"]
        lines += ["--nodes=1", "--ntasks=1", f"--export={self.export}"]
        for flag, value in (
            ("comment", self.comment),
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("reservation", self.reservation),
            ("constraint", self.constraint),
            ("gres", self.gres),
            ("output", self.output),
            ("chdir", self.workdir),
        ):
            if value:
                lines.append(f"--{flag}={value}")
        if self.time_limit is not None:
            lines.append(f"--time={format_time(self.time_limit)}")
        if self.memory > 0:
            lines.append(f"--mem={max(1, self.memory // 1024**2)}M")
        for line in self.extra:
            lines.append(check_directive(line))
        return lines

    def script(self) -> str:
        """The whole batch script: interpreter line, ``#SBATCH`` lines, body."""
        for value in (self.name, self.comment, self.output, self.workdir):
            if any(ch.isspace() for ch in value):
                raise ValueError(f"a job's name, comment and paths have no spaces: {value!r}")
        head = [self.shebang, *(f"#SBATCH {line}" for line in self.directives())]
        return "\n".join(head) + "\n" + self.body


def check_directive(line: str) -> str:
    """An extra directive as an ``sbatch`` option (``#SBATCH`` stripped); ValueError if not one."""
    text = line.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH") :].strip()
    if "\n" in text or "\r" in text or not _DIRECTIVE_RE.match(text):
        raise ValueError(f"not an sbatch option: {line!r} (write it as --name=value)")
    return text


@dataclass(frozen=True)
class Job:
    """What the controller says of one job (``scontrol show job``)."""

    id: str
    state: str
    reason: str = ""
    node: str = ""
    start: float | None = None
    end: float | None = None
    time_limit: int | None = None
    cpus: int = 0
    exit_code: str = ""
    name: str = ""
    partition: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Pending or running: the job still waits for or holds its place."""
        return self.state in ACTIVE_STATES


def parse_job(line: str) -> Job:
    """One line of ``scontrol -o show job`` as a :class:`Job`."""
    fields: dict[str, str] = {}
    key = ""
    for token in line.strip().split(" "):
        if "=" in token and re.match(r"^[A-Za-z/:_]+=", token):
            key, _, value = token.partition("=")
            fields[key] = value
        elif key:  # a value with spaces (Reason, Comment, Command)
            fields[key] += " " + token
    limit = fields.get("TimeLimit", "")
    try:
        time_limit = parse_time(limit) if limit else None
    except ValueError:
        time_limit = None
    reason = fields.get("Reason", "")
    return Job(
        id=fields.get("JobId", ""),
        state=fields.get("JobState", "UNKNOWN").split()[0],
        reason="" if reason in ("None", "(null)") else reason,
        node=fields.get("BatchHost", "") or fields.get("NodeList", ""),
        start=_timestamp(fields.get("StartTime", "")),
        end=_timestamp(fields.get("EndTime", "")),
        time_limit=time_limit,
        cpus=int(fields.get("NumCPUs", "0") or 0),
        exit_code=fields.get("ExitCode", ""),
        name=fields.get("JobName", ""),
        partition=fields.get("Partition", ""),
        fields=fields,
    )


@dataclass(frozen=True)
class Usage:
    """What ``sacct`` accounted for a finished job."""

    cpus: int
    elapsed: int
    state: str

    @property
    def core_hours(self) -> float:
        """Allocated CPUs times elapsed hours."""
        return self.cpus * self.elapsed / 3600


@dataclass(frozen=True)
class Submitter:
    """The Unix account ``sbatch`` runs as (only root may switch): the job is that account's."""

    uid: int
    gid: int
    #: Supplementary groups, the primary one included.
    groups: tuple[int, ...] = ()


class Slurm:
    """Runs Slurm's commands for one cluster."""

    def __init__(self, slurm_conf: str = "", bin_dir: str = "") -> None:
        self.env = dict(os.environ)
        if slurm_conf:
            self.env["SLURM_CONF"] = slurm_conf
        self.bin_dir = bin_dir

    def command(self, name: str) -> str:
        """The path of one of Slurm's commands (its bare name: found on PATH)."""
        return str(Path(self.bin_dir) / name) if self.bin_dir else name

    async def run(
        self,
        name: str,
        *args: str,
        stdin: str | None = None,
        submitter: Submitter | None = None,
        cwd: str | None = None,
    ) -> tuple[int, str, str]:
        """Run a command (as ``submitter`` when given); its exit code, output and error output."""
        if submitter is not None:
            # In a thread: not every event loop (uvloop) switches a child's uid and groups.
            return await asyncio.to_thread(self._run_as, submitter, name, args, stdin, cwd)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.command(name),
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                cwd=cwd,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run {name}: {exc}") from exc
        try:
            out, err = await wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), COMMAND_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(f"{name} did not answer within {COMMAND_TIMEOUT:g}s") from None
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    def _run_as(
        self,
        submitter: Submitter,
        name: str,
        args: tuple[str, ...],
        stdin: str | None,
        cwd: str | None,
    ) -> tuple[int, str, str]:
        """:meth:`run` as ``submitter``, blocking: its uid, gid and groups for the child."""
        try:
            done = subprocess.run(
                [self.command(name), *args],
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                env=self.env,
                cwd=cwd,
                user=submitter.uid,
                group=submitter.gid,
                extra_groups=list(submitter.groups),
                timeout=COMMAND_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{name} did not answer within {COMMAND_TIMEOUT:g}s") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise SlurmError(f"cannot run {name} as uid {submitter.uid}: {exc}") from exc
        return done.returncode, done.stdout, done.stderr

    async def submit(self, request: JobRequest, script_path: Path | None = None) -> str:
        """Submit ``request``; its job id. The script is kept at ``script_path`` when given."""
        script = request.script()
        if script_path is not None:
            await asyncio.to_thread(write_script, script_path, script)
            return await self.submit_file(script_path)
        code, out, err = await self.run("sbatch", "--parsable", stdin=script)
        return _job_id(code, out, err)

    async def submit_file(self, script_path: Path, submitter: Submitter | None = None) -> str:
        """Submit the batch script at ``script_path`` (as ``submitter`` when given); its job id."""
        code, out, err = await self.run(
            "sbatch",
            "--parsable",
            str(script_path),
            submitter=submitter,
            cwd=str(script_path.parent),
        )
        return _job_id(code, out, err)

    async def job(self, job_id: str) -> Job | None:
        """The controller's view of a job; None once it forgot the job (or never knew it)."""
        code, out, err = await self.run("scontrol", "-o", "show", "job", job_id)
        if code != 0:
            if "Invalid job id" in err:
                return None
            raise SlurmError(f"scontrol show job {job_id}: {_one_line(err)}")
        lines = [line for line in out.splitlines() if line.strip()]
        return parse_job(lines[0]) if lines else None

    async def queue_position(self, job_id: str, partition: str = "") -> tuple[int, int] | None:
        """Where a pending job stands among the pending jobs of its partition: (position, of)."""
        args = ["-h", "-t", "PENDING", "-o", "%i", "--sort=-p,i"]
        if partition:
            args += ["-p", partition]
        code, out, _ = await self.run("squeue", *args)
        if code != 0:
            return None
        ids = out.split()
        return (ids.index(job_id) + 1, len(ids)) if job_id in ids else None

    async def jobs_named(self, prefix: str, everyone: bool = False) -> dict[str, str]:
        """Active jobs whose name starts with ``prefix``: job id to name.

        This account's jobs only, unless ``everyone`` (a root agent submitting as users).
        """
        mine = () if everyone else ("--me",)
        code, out, err = await self.run("squeue", "-h", *mine, "-o", "%i|%j")
        if code != 0:
            raise SlurmError(f"squeue: {_one_line(err)}")
        found = {}
        for line in out.splitlines():
            job_id, _, name = line.strip().partition("|")
            if name.startswith(prefix):
                found[job_id] = name
        return found

    async def cancel(self, job_id: str, signal: str = "") -> None:
        """``scancel`` the job (with ``signal`` to every process of it); a finished job is fine."""
        args = [f"--signal={signal}", "--full"] if signal else []
        code, _, err = await self.run("scancel", *args, job_id)
        if code != 0 and "already completing" not in err and "Invalid job id" not in err:
            raise SlurmError(f"scancel {job_id}: {_one_line(err)}")

    async def usage(self, job_id: str) -> Usage | None:
        """Allocated CPUs and elapsed seconds from ``sacct``; None without accounting."""
        code, out, _ = await self.run(
            "sacct", "-n", "-P", "-X", "-j", job_id, "-o", "AllocCPUS,ElapsedRaw,State"
        )
        if code != 0:
            return None
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                return Usage(int(parts[0]), int(parts[1]), parts[2].split()[0])
        return None


def _job_id(code: int, out: str, err: str) -> str:
    """The job id in ``sbatch --parsable``'s answer; SlurmError when it refused the job."""
    if code != 0:
        raise SlurmError(f"sbatch refused the job: {_one_line(err or out)}")
    job_id = out.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {out.strip()!r}, not a job id")
    return job_id


def write_script(path: Path, script: str) -> None:
    """Write a batch script anew, mode 0700; a link in its place is replaced, not followed."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o700)
    with os.fdopen(fd, "w") as handle:
        handle.write(script)


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
