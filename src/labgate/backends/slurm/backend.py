"""The ``slurm`` backend: each instance is one Slurm batch job running the tool on a node.

A launch writes the job's files into ``<jobs_dir>/<instance id>/`` (a
filesystem the nodes share with the agent): ``launch.json`` (the tool's
command and environment, instance token included, mode 600) and the batch
script, which is :mod:`labgate.backends.slurm.launcher` with the site's
``#SBATCH`` lines. :meth:`SlurmBackend.start` submits it and returns at once
with no endpoint; the agent then calls :meth:`SlurmBackend.place`, which
follows the job through the queue (reason, position, estimated start, as
progress notes) until it runs and its launcher has written ``endpoint.json``
with the address and port of the job's relay (on the node's network, in
front of the tool's loopback port), and returns ``http://<address>:<port>``. The job's
end (``EndTime``, its wall time) becomes ``ends_at`` in the state: the
portal shows it as the instance's lifetime stop.

**Whose job.** With ``run_as = "owner"`` (the default) a job runs as its
owner's Unix account on the cluster (:mod:`.accounts`: the site's
``accounts`` table maps labgate users to accounts; root and uids under
``min_uid`` are refused; the agent must be root and runs ``sbatch`` with
the account's uid, gid and groups). The job's directory is then the
account's (mode 0700, ``launch.json`` 0600) inside ``jobs_dir`` (0711:
each account reaches its own directory and lists none), and so is its
workspace (0700, handed over when it belonged to someone else). The agent
takes ``endpoint.json`` only when the job's account (or root) owns it, it
names the job, its port lies in ``ports``, and it connects only to
``endpoint_host`` or the node Slurm reports. ``run_as = "agent"`` runs
every job as the agent's own account, as labgate did before.

The saved state is the job id, the job's directory and its account (uid,
gid): :meth:`poll`, :meth:`stop` and :meth:`place` need nothing else, so a
restarted agent re-attaches from it. Jobs are named ``<prefix>-<site>-<instance id>``;
:meth:`reconcile` cancels the ones of this site the portal does not know.
See ``docs/backends/slurm.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from labgate.backends.base import (
    JSON,
    Backend,
    Diagnosis,
    LaunchSpec,
    Started,
    Status,
    mount_variables,
)
from labgate.backends.confine import require_confined
from labgate.backends.identity import hand_over
from labgate.backends.process import INSTANCE_ID_RE, tool_environment
from labgate.backends.procfs import tail
from labgate.backends.slurm.accounts import (
    ROOT_FIX,
    Account,
    lookup_account,
    make_dirs,
    planted,
    root_problem,
    unreachable,
)
from labgate.backends.slurm.jobdir import open_jobs_dir, write_job_dir
from labgate.backends.slurm.jobs import Job, JobRequest, Slurm, SlurmError
from labgate.backends.slurm.launcher import PORT_MARK
from labgate.backends.slurm.options import SlurmOptions, choices_of, placement
from labgate.errors import InstanceStartError
from labgate.tools.catalog import ProcessSpec, template_values

if TYPE_CHECKING:
    from labgate.config import Settings, SiteSettings

log = logging.getLogger(__name__)

#: Seconds between looks for ``endpoint.json`` once the job runs.
_ENDPOINT_POLL = 0.1
#: The most of ``endpoint.json`` read (the launcher's is a hundred bytes or so).
_ENDPOINT_MAX = 4096
#: Seconds a cancelled job may take to end after SIGKILL before stop gives up waiting.
_KILL_WAIT = 30.0


def describe_end(job: Job | None, job_id: str) -> str:
    """Why a job is no longer running, in words."""
    if job is None:
        return f"Slurm job {job_id} is gone (the controller no longer knows it)"
    state = job.state
    words = {
        "COMPLETED": "the tool exited",
        "CANCELLED": "cancelled outside labgate (scancel)",
        "TIMEOUT": "reached its wall time limit",
        "FAILED": f"failed (exit code {job.exit_code})",
        "NODE_FAIL": f"its node {job.node} failed",
        "PREEMPTED": "was preempted",
        "OUT_OF_MEMORY": "ran out of memory",
        "BOOT_FAIL": "its node failed to boot",
        "DEADLINE": "missed its deadline",
    }.get(state, state.lower())
    reason = f", {job.reason}" if job.reason and state != "CANCELLED" else ""
    return f"Slurm job {job_id} {words} ({state}{reason})"


def _clock(at: float | None) -> str:
    return datetime.fromtimestamp(at).strftime("%H:%M") if at else "unknown"


class SlurmBackend(Backend):
    """Runs each instance as one Slurm batch job; see the module docstring."""

    name = "slurm"
    abstract = False
    tool_section = "process"
    tool_schema = ProcessSpec
    options_schema = SlurmOptions
    #: Slurm queues jobs itself: the portal's start queue leaves Slurm sites alone.
    queues_starts = True

    def __init__(self, settings: Settings | SiteSettings, options: JSON | None = None) -> None:
        super().__init__(settings, options)
        self.config = cast(SlurmOptions, self.site_options)
        self.slurm = Slurm(self.config.slurm_conf, self.config.bin_dir)
        self.jobs_dir = Path(self.config.jobs_dir or self.settings.data_dir / "slurm")
        self.owners = self.config.run_as == "owner"
        #: The last look at each job and when: polls within ``poll_interval`` reuse it.
        self._seen: dict[str, tuple[float, Job | None]] = {}
        #: Jobs whose usage was already noted.
        self._accounted: set[str] = set()

    @classmethod
    def launch_choices(cls, options: JSON) -> JSON:
        """Each choosable option's default and allowed values (``time`` also its maximum)."""
        try:
            config = SlurmOptions.model_validate(options)
        except ValueError:
            return {}
        return choices_of(config)

    @classmethod
    def check_tool(cls, spec: Any) -> str | None:
        """A tool runs when what its ``requires`` names is here (the nodes share the software)."""
        return cast(ProcessSpec, spec).missing_requirement()

    def workspaces_root(self) -> Path | None:
        """``workspaces_dir`` when the site sets one (shared with the nodes), else the agent's."""
        return Path(self.config.workspaces_dir) if self.config.workspaces_dir else None

    def doctor(self) -> list[Diagnosis]:
        """Whether Slurm's commands are here, the controller answers and jobs can be owned."""
        found = self._doctor_slurm()
        if found[-1].final:
            return found
        return found + self._doctor_accounts()

    def _doctor_accounts(self) -> list[Diagnosis]:
        """Whether the agent can run jobs as their owners (it is root), or runs them as root."""
        if not self.owners:
            if os.geteuid() == 0:
                return [
                    Diagnosis(
                        "warn",
                        'run_as = "agent" with an agent running as root: every job runs as root',
                        'set run_as = "owner", or run the agent as an account of its own',
                    )
                ]
            return [Diagnosis("ok", 'jobs run as the agent\'s account (run_as = "agent")')]
        problem = root_problem()
        if problem is not None:
            return [Diagnosis("fail", problem, ROOT_FIX)]
        return [Diagnosis("ok", "jobs run as their owners' Unix accounts")]

    def _doctor_slurm(self) -> list[Diagnosis]:
        """Whether Slurm's commands are here and the controller answers."""
        missing = [
            name
            for name in ("sbatch", "squeue", "scontrol", "scancel", "sacct")
            if shutil.which(self.slurm.command(name)) is None
        ]
        if missing:
            return [
                Diagnosis(
                    "fail",
                    f"Slurm commands missing: {', '.join(missing)}",
                    "install Slurm's client commands (Debian: slurm-client) or set bin_dir",
                    final=True,
                )
            ]
        try:
            done = subprocess.run(
                [self.slurm.command("scontrol"), "ping"],
                env=self.slurm.env,
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [Diagnosis("fail", f"scontrol ping: {exc}", "check slurmctld", final=True)]
        if done.returncode != 0 or "UP" not in done.stdout:
            detail = (done.stdout + done.stderr).strip().splitlines()
            return [
                Diagnosis(
                    "fail",
                    f"the Slurm controller does not answer: {detail[-1] if detail else '?'}",
                    "start slurmctld and munge, or set slurm_conf",
                    final=True,
                )
            ]
        return [Diagnosis("ok", "the Slurm controller answers")]

    # --- start --------------------------------------------------------------------

    def job_name(self, instance_id: str) -> str:
        """The name of an instance's job: how reconcile recognises this site's jobs."""
        return f"{self.config.job_prefix}-{self.site or 'site'}-{instance_id}"

    async def start(self, spec: LaunchSpec) -> Started:
        """Submit the instance's job; the endpoint comes later, from :meth:`place`."""
        if not INSTANCE_ID_RE.match(spec.instance_id):
            raise InstanceStartError(f"invalid instance id {spec.instance_id!r}")
        reason = self.unavailable_reason(spec.tool)
        tool = spec.tool.parsed(self.tool_section, ProcessSpec) if reason is None else None
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name!r} cannot run here: {reason}")
        where = placement(self.config, spec.options)
        require_confined(spec.mounts)
        account = await asyncio.to_thread(self.account_of, spec.owner)
        # Resolved above the last part only: a link in place of it is refused, not followed.
        job_dir = self.jobs_dir.resolve() / spec.instance_id
        given = spec.workspace.expanduser()
        workspace = given.parent.resolve() / given.name
        python = self.config.python or sys.executable
        values = template_values(
            port=0,
            base_url=spec.base_url,
            workspace=str(workspace),
            instance_id=spec.instance_id,
            user=spec.owner,
            instance_token=spec.secret,
            params=spec.params,
        )
        values["port"] = PORT_MARK
        values["python"] = python  # the nodes' Python, which the job's account can run
        try:
            command, tool_env = tool.render(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise InstanceStartError(f"bad command template of {spec.tool.name!r}: {exc}") from exc
        launch = {
            "argv": command,
            "env": self.environment(spec, workspace, tool_env, python),
            "workdir": str(workspace),
            "ports": list(self.config.ports),
            "endpoint_host": self.config.endpoint_host,
        }
        body = await asyncio.to_thread(launcher_source)
        body += f"\n\nmain({str(job_dir)!r})\n"
        request = JobRequest(
            name=self.job_name(spec.instance_id),
            comment=f"labgate:{self.site}:{spec.instance_id}",
            body=body,
            shebang=f"#!{python}",
            partition=where.partition,
            account=where.account,
            qos=where.qos,
            reservation=where.reservation,
            constraint=where.constraint,
            gres=where.gres,
            time_limit=where.time_limit,
            cpus=max(1, math.ceil(spec.resources.cpu)),
            memory=spec.resources.memory if self.config.request_memory else 0,
            output=str(job_dir / "job.log"),
            workdir=str(job_dir),
            extra=tuple(self.config.extra_directives),
        )
        try:
            script = request.script()
            await asyncio.to_thread(
                self._write_files, job_dir, workspace, launch, script, account, spec.owner
            )
            job_id = await self.slurm.submit_file(
                job_dir / "job.py", account.submitter if account is not None else None
            )
        except (OSError, ValueError, SlurmError) as exc:
            raise InstanceStartError(f"cannot submit the Slurm job: {exc}") from exc
        state: JSON = {
            **self._runner(account),
            "instance_id": spec.instance_id,
            "job_id": job_id,
            "dir": str(job_dir),
            "log": str(job_dir / "job.log"),
            "workspace": str(workspace),
            "cpus": request.cpus,
            "placement": where.as_json(),
            "submitted_at": time.time(),
        }
        return Started(state=state, endpoint="")

    def account_of(self, owner: str) -> Account | None:
        """The account ``owner``'s jobs run as; None with ``run_as = "agent"``.

        InstanceStartError when there is none, it may not run jobs, or the agent
        is not root and so cannot submit as another account.
        """
        if not self.owners:
            return None
        problem = root_problem()
        if problem is not None:
            raise InstanceStartError(f"{problem}; {ROOT_FIX}")
        return lookup_account(owner, self.config.accounts, self.config.min_uid)

    @staticmethod
    def _runner(account: Account | None) -> JSON:
        """Who the job runs as, for the saved state: the account, else the agent's own."""
        if account is not None:
            return {"run_as": "owner", **account.as_json()}
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return {"run_as": "agent", "account": name, "uid": uid, "gid": os.getegid()}

    def _write_files(
        self,
        job_dir: Path,
        workspace: Path,
        launch: JSON,
        script: str,
        account: Account | None,
        owner: str,
    ) -> None:
        """The job's directory, files and workspace; the account's when it has one.

        The directory is made anew: files a previous job of the account left
        there (a link where ``launch.json`` goes) are never written through.
        """
        if account is None:
            job_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            self._reachable(job_dir, workspace, account, owner)
        write_job_dir(job_dir, {"launch.json": json.dumps(launch)}, script, account)
        if account is None:
            return
        # Two launches of one user at once both find no workspace: the second's mkdir fails.
        with contextlib.suppress(FileExistsError):
            workspace.mkdir(mode=0o700)
        hand_over(workspace, account.identity)

    def _reachable(self, job_dir: Path, workspace: Path, account: Account, owner: str) -> None:
        """Create what lies above the job's directory and workspace; check the account passes."""
        open_jobs_dir(self.jobs_dir)
        make_dirs(workspace.parent)
        for what, path, option in (
            ("job directory", job_dir, "jobs_dir"),
            ("workspace", workspace, "workspaces_dir"),
        ):
            problem = unreachable(path, account) or planted(path)
            if problem is not None:
                raise InstanceStartError(
                    f"the Slurm job of labgate user {owner!r} (Unix account {account.name!r}) "
                    f"cannot use its {what} {path}: {problem}; set the site option {option} "
                    f"to a directory of the agent's on the shared filesystem that every user "
                    f"may pass through to (chmod o+x on the directories above it)"
                )

    def environment(
        self, spec: LaunchSpec, workspace: Path, tool_env: dict[str, str], python: str
    ) -> dict[str, str]:
        """The tool's environment, as on the process backend; datasets by their paths.

        Nothing is bound on the nodes: the tool is told where each dataset is instead.
        """
        where = mount_variables(spec.mounts, lambda mount: str(mount.source))
        return tool_environment(spec, workspace, tool_env, python, spec.owner, where)

    # --- the queue ----------------------------------------------------------------

    async def _job(self, job_id: str, fresh: bool = False) -> Job | None:
        """The controller's view of a job, at most ``poll_interval`` old unless ``fresh``.

        When the controller does not answer (restarting, overloaded), the last view
        stands: a job is not declared gone because slurmctld was busy for a moment.
        """
        seen = self._seen.get(job_id)
        now = time.monotonic()
        if not fresh and seen is not None and now - seen[0] < self.config.poll_interval:
            return seen[1]
        try:
            job = await self.slurm.job(job_id)
        except SlurmError as exc:
            if seen is None or seen[1] is None:
                raise
            log.warning("Slurm job %s: %s; keeping its last known state", job_id, exc)
            return seen[1]
        self._seen[job_id] = (now, job)
        if job is None or not job.active:
            self._seen.pop(job_id, None)  # ended: nothing more to cache
        return job

    async def place(self, state: JSON) -> Started:
        """Follow the job through the queue until its tool has a port; its endpoint and state."""
        iid, job_id = str(state["instance_id"]), str(state["job_id"])
        endpoint_file = Path(state["dir"]) / "endpoint.json"
        uid = await asyncio.to_thread(job_uid, state)
        ports = self.config.ports
        said = ""
        # Most jobs on an idle cluster start within a second: look often at first, then
        # back off to ``poll_interval`` so a long queue costs the controller little.
        pending_wait = _ENDPOINT_POLL
        while True:
            try:
                job = await self._job(job_id, fresh=True)
            except SlurmError as exc:  # the controller is away: the job waits, so do we
                log.warning("Slurm job %s: %s", job_id, exc)
                await asyncio.sleep(self.config.poll_interval)
                continue
            if job is None or not job.active:
                await self.note_usage(iid, job_id, job)
                raise InstanceStartError(describe_end(job, job_id) + " before the tool started")
            if job.state == "PENDING":
                message, data = await self._queued(job)
                interval = pending_wait
                pending_wait = min(pending_wait * 1.5, self.config.poll_interval)
            else:
                message = f"running on node {job.node}"
                data = {"slurm": {"state": job.state, "node": job.node, "job_id": job_id}}
                found = await asyncio.to_thread(_read_endpoint, endpoint_file, job_id, uid, ports)
                if found is not None:
                    node = await asyncio.to_thread(
                        endpoint_address, found.get("host"), self.config.endpoint_host, job.node
                    )
                    placed = {
                        **state,
                        "node": job.node,
                        "port": int(found["port"]),
                        "host": node,
                        "started_at": job.start,
                        "ends_at": job.end if job.time_limit is not None else None,
                    }
                    if message != said:
                        await self.progress_note(iid, message, **data)
                    return Started(placed, f"http://{node}:{int(found['port'])}")
                interval = _ENDPOINT_POLL
            if message != said:
                said = message
                await self.progress_note(iid, message, **data)
            await asyncio.sleep(interval)

    async def _queued(self, job: Job) -> tuple[str, JSON]:
        """The progress note of a pending job: reason, position and estimated start."""
        position = await self.slurm.queue_position(job.id, job.partition)
        parts = [f"queued ({job.reason or 'waiting'})"]
        if position is not None:
            parts.append(f"position {position[0]} of {position[1]}")
        if job.start is not None and job.start > time.time():
            parts.append(f"estimated start {_clock(job.start)}")
        data = {
            "slurm": {
                "state": "PENDING",
                "job_id": job.id,
                "reason": job.reason,
                "position": position[0] if position else None,
                "pending": position[1] if position else None,
                "estimated_start": job.start,
            }
        }
        return ", ".join(parts), data

    # --- poll, stop, logs -------------------------------------------------------

    async def poll(self, state: JSON) -> Status:
        """Alive while the job is pending or running; else why it ended."""
        job_id = str(state["job_id"])
        job = await self._job(job_id)
        if job is not None and job.active:
            return Status(alive=True)
        await self.note_usage(str(state["instance_id"]), job_id, job)
        return Status(alive=False, detail=describe_end(job, job_id))

    async def stop(self, state: JSON, grace: float) -> None:
        """``scancel`` (Slurm sends TERM, then KILL after its KillWait); KILL after ``grace``."""
        job_id = str(state["job_id"])
        job = await self._job(job_id, fresh=True)
        if job is not None and job.active:
            await self.slurm.cancel(job_id)
            job = await self._wait_end(job_id, max(grace, 0.5))
            if job is not None and job.active:
                log.info("Slurm job %s: still %s after %gs, killing", job_id, job.state, grace)
                await self.slurm.cancel(job_id, signal="KILL")
                job = await self._wait_end(job_id, _KILL_WAIT)
                if job is not None and job.active:
                    raise SlurmError(f"Slurm job {job_id} is still {job.state} after scancel")
        await self.note_usage(str(state["instance_id"]), job_id, job)

    async def _wait_end(self, job_id: str, budget: float) -> Job | None:
        deadline = time.monotonic() + budget
        while True:
            job = await self._job(job_id, fresh=True)
            if job is None or not job.active or time.monotonic() >= deadline:
                return job
            await asyncio.sleep(0.2)

    async def logs(self, state: JSON, lines: int = 100) -> str:
        """The last ``lines`` lines of the job's output file."""
        uid = await asyncio.to_thread(job_uid, state)
        # The job's account owns its directory: read its own log, never through a link.
        return await asyncio.to_thread(tail, Path(state["log"]), lines, owners=(uid,))

    # --- usage, reconcile ---------------------------------------------------------

    async def note_usage(self, instance_id: str, job_id: str, job: Job | None) -> None:
        """Put the job's core-hours (``sacct``, else the controller's times) in its events."""
        if job_id in self._accounted:
            return
        self._accounted.add(job_id)
        usage = await self.slurm.usage(job_id)
        if usage is not None:
            cpus, elapsed, source = usage.cpus, usage.elapsed, "sacct"
        elif job is not None and job.start is not None and job.end is not None:
            cpus, elapsed, source = job.cpus, max(0, int(job.end - job.start)), "scontrol"
        else:
            return
        if cpus <= 0 and elapsed <= 0:
            return
        hours = round(cpus * elapsed / 3600, 4)
        await self.progress_note(
            instance_id,
            f"Slurm job {job_id} used {hours:g} core-hours ({cpus} CPUs, {elapsed}s)",
            usage={
                "job_id": job_id,
                "core_hours": hours,
                "cpus": cpus,
                "elapsed": elapsed,
                "source": source,
            },
        )

    async def discard(self, instance_id: str, grace: float) -> None:
        """Cancel the instance's job, found by its name (no job id was recorded)."""
        name = self.job_name(instance_id)
        for job_id, found in (await self.slurm.jobs_named(name, everyone=self.owners)).items():
            if found == name:
                await self.slurm.cancel(job_id)

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Cancel this site's labgate jobs whose instance is not in ``keep``."""
        prefix = self.job_name("")
        removed = []
        for job_id, name in (await self.slurm.jobs_named(prefix, everyone=self.owners)).items():
            instance_id = name[len(prefix) :]
            if instance_id in keep:
                continue
            log.info("cancelling Slurm job %s of unknown instance %s", job_id, instance_id)
            with contextlib.suppress(SlurmError):
                await self.slurm.cancel(job_id)
                removed.append(instance_id)
        return removed


@functools.cache
def launcher_source() -> str:
    """The launcher module's code without its ``__main__`` block: the body of every job."""
    source = Path(__file__).with_name("launcher.py").read_text()
    return source.split('\nif __name__ == "__main__":', 1)[0]


def job_uid(state: JSON) -> int:
    """The uid a job runs as: its saved state's; a job from before owners, its directory's."""
    if "uid" in state:
        return int(state["uid"])
    try:
        return Path(state["dir"]).stat().st_uid  # the agent's account made it then
    except OSError:
        return os.geteuid()


def _read_endpoint(
    path: Path, job_id: str, uid: int, ports: tuple[int, int] = (0, 0)
) -> JSON | None:
    """The launcher's report, when it is there and is this job's; None otherwise.

    The job (the user's code) writes it, so it is taken only when it is a
    regular file owned by the job's account ``uid`` (or root), not reached
    through a link, names ``job_id``, and has a port in ``ports`` (when that
    is a range).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid not in (uid, 0):
            log.debug("%s is owned by uid %d, not the job's %d: ignored", path, info.st_uid, uid)
            return None
        raw = handle.read(_ENDPOINT_MAX)
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(found, dict) or str(found.get("job_id")) != job_id:
        return None
    port = found.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return None
    low, high = ports
    if high > low and not low <= port < high:
        log.debug("%s names port %d, outside the site's ports: ignored", path, port)
        return None
    return found


def endpoint_address(reported: object, endpoint_host: str, node: str) -> str:
    """The host the router connects to: ``endpoint_host`` or the node Slurm reports.

    The job's report (its own ``host``, an address) is used only when it is one
    of those or an address one of them resolves to here: a job cannot send the
    router elsewhere.
    """
    fallback = endpoint_host or node
    if not isinstance(reported, str) or not reported:
        return fallback
    known = {name for name in (endpoint_host, node) if name}
    if reported in known:
        return reported
    for name in known:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError:
            continue
        if reported in {str(info[4][0]) for info in infos}:
            return reported
    # The relay listens on all the node's addresses when endpoint_host is not one of them.
    return node or fallback
