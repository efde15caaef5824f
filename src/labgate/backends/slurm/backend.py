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

The saved state is the job id and the job's directory: :meth:`poll`,
:meth:`stop` and :meth:`place` need nothing else, so a restarted agent
re-attaches from it. Jobs are named ``<prefix>-<site>-<instance id>``;
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
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from labgate.backends.base import JSON, Backend, Diagnosis, LaunchSpec, Started, Status
from labgate.backends.confine import require_confined
from labgate.backends.process import tool_environment
from labgate.backends.procfs import tail
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

    def doctor(self) -> list[Diagnosis]:
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
        reason = self.unavailable_reason(spec.tool)
        tool = spec.tool.parsed(self.tool_section, ProcessSpec) if reason is None else None
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name!r} cannot run here: {reason}")
        where = placement(self.config, spec.options)
        require_confined(spec.mounts)
        job_dir = (self.jobs_dir / spec.instance_id).resolve()
        workspace = spec.workspace.expanduser().resolve()
        python = self.config.python or sys.executable
        values = template_values(
            port=0,
            base_url=spec.base_url,
            workspace=str(workspace),
            instance_id=spec.instance_id,
            user=spec.owner,
            instance_token=spec.secret,
        )
        values["port"] = PORT_MARK
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
            await asyncio.to_thread(self._write_files, job_dir, workspace, launch)
            job_id = await self.slurm.submit(request, job_dir / "job.py")
        except (OSError, ValueError, SlurmError) as exc:
            raise InstanceStartError(f"cannot submit the Slurm job: {exc}") from exc
        state: JSON = {
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

    @staticmethod
    def _write_files(job_dir: Path, workspace: Path, launch: JSON) -> None:
        job_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in ("endpoint.json", "job.log"):
            (job_dir / stale).unlink(missing_ok=True)
        path = job_dir / "launch.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(launch, handle)

    def environment(
        self, spec: LaunchSpec, workspace: Path, tool_env: dict[str, str], python: str
    ) -> dict[str, str]:
        """The tool's environment, as on the process backend; datasets by their paths.

        Nothing is bound on the nodes: the tool is told where each dataset is instead.
        """
        where = {mount.env_var: str(mount.source) for mount in spec.mounts}
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
                found = await asyncio.to_thread(_read_endpoint, endpoint_file, job_id)
                if found is not None:
                    # The relay's address (endpoint_host's or the node's); older jobs: the node.
                    node = str(found.get("host") or self.config.endpoint_host or job.node)
                    placed = {
                        **state,
                        "node": job.node or found["node"],
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
        return await asyncio.to_thread(tail, Path(state["log"]), lines)

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

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Cancel this site's labgate jobs whose instance is not in ``keep``."""
        prefix = self.job_name("")
        removed = []
        for job_id, name in (await self.slurm.jobs_named(prefix)).items():
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


def _read_endpoint(path: Path, job_id: str) -> JSON | None:
    """The launcher's report, when it is there and is this job's."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(found, dict) or str(found.get("job_id")) != job_id:
        return None
    return found
