"""A process task's ``cpu`` and ``memory_mib`` as real limits, as for process instances.

The executor (:mod:`labgate.agent.taskexec`) applies them as the launcher of
process instances does (:func:`labgate.backends.limits.apply`, in its child
before it runs the sandbox), so every process of the task inherits what they
set: a CPU affinity of ``ceil(cpu)`` cores, the open-files and core limits,
and, where labgate runs as root on a machine with cgroups, a cgroup of its
own (``task-<attempt id>``, beside the instances' under labgate's own:
:mod:`labgate.backends.cgroups`) with a CPU quota of ``cpu`` cores,
``memory_mib`` of memory and the pids limit.

In a cgroup the memory limit is the cgroup's alone: the kernel kills a task
past it, and the executor reads the cgroup's count of such kills to report
"out of memory: limit N MiB". An address-space limit beside it would fail the
task's allocations first (a ``MemoryError``), with no sign of why. Without a
cgroup the address-space limit (``RLIMIT_AS``) is what there is, as for
process instances.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from labgate.backends import cgroups
from labgate.backends.limits import launcher_options, plan_limits
from labgate.wire.runs import TaskSpec

#: What a task's cgroup is named after, before its attempt id.
CGROUP_PREFIX = "task-"


@dataclass(frozen=True)
class TaskLimits:
    """The limits of one attempt, as its executor gets them in ``task.json``."""

    #: The launcher's options (:func:`labgate.backends.limits.apply` takes them).
    options: list[str]
    memory_mib: int
    #: Where the kernel counts the task's processes it killed for memory (cgroup only).
    oom_file: str | None
    #: The attempt's cgroup directories (removed once it ended).
    cgroup: list[str]

    def as_json(self) -> dict[str, Any]:
        """The ``limits`` entry of ``task.json``."""
        return {
            "options": self.options,
            "memory_mib": self.memory_mib,
            "oom_file": self.oom_file,
            "cgroup": self.cgroup,
        }


def plan(spec: TaskSpec) -> TaskLimits:
    """Make the attempt's cgroup (when the machine allows) and the launcher's options."""
    limits = plan_limits(spec.cpu, spec.memory_mib * 2**20, spec.attempt_id)
    cgroup = cgroups.create(
        CGROUP_PREFIX + spec.attempt_id, spec.cpu, limits.cpus, limits.memory, cgroups.DEFAULT_PIDS
    )
    if cgroup is not None:
        limits = replace(limits, memory=None, cgroup=cgroup)
    return TaskLimits(
        options=launcher_options(limits),
        memory_mib=spec.memory_mib,
        oom_file=cgroup.oom_file() if cgroup is not None and cgroup.memory else None,
        cgroup=list(cgroup.paths) if cgroup is not None else [],
    )


def release(paths: list[str]) -> None:
    """Remove an attempt's cgroup (its processes are gone; a sweep takes what lingers)."""
    if paths:
        cgroups.remove(paths, 1.0)


def recorded(directory: Path) -> list[str]:
    """The cgroup directories recorded in an attempt's ``task.json`` ([] when none)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        limits = json.loads((directory / "task.json").read_text()).get("limits") or {}
        return [str(path) for path in limits.get("cgroup") or []]
    return []
