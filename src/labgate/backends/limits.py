"""Resource limits for process-backend instances, without cgroups.

What a plain Linux process can be held to is applied by a tiny launcher that
the backend runs in front of the tool (or in front of ``bwrap``, whose
children inherit everything set here)::

    python -I -S .../limits.py --as BYTES --nofile N --core 0 --cpus 0,1 -- COMMAND...

The launcher sets the rlimits and the CPU affinity on itself, then ``exec``\\ s
the command, so the pid the backend tracks stays the same. It imports only the
standard library and runs isolated (``-I -S``) so it starts in a few
milliseconds and does not depend on the environment it is given.

A launcher rather than ``subprocess``'s ``preexec_fn``: ``preexec_fn`` runs
Python code between ``fork`` and ``exec`` in a server that has threads (the
event loop's executor), which the Python docs call unsafe.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

#: Open files allowed per instance process when the backend options do not say.
DEFAULT_NOFILE = 8192
#: Exit status of the launcher when it cannot exec the command (as a shell does).
EXEC_FAILED = 127


@dataclass(frozen=True)
class Limits:
    """The limits one instance gets; recorded in the instance state."""

    #: RLIMIT_AS in bytes (address space, not resident memory); None for none.
    memory: int | None
    #: RLIMIT_NOFILE, soft and hard.
    nofile: int
    #: RLIMIT_CORE: 0 so a crashing tool never writes a core (with its secrets) to disk.
    core: int = 0
    #: CPUs the instance may run on; empty for all of them.
    cpus: tuple[int, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form, as stored in the instance state."""
        return {
            "memory": self.memory,
            "nofile": self.nofile,
            "core": self.core,
            "cpus": list(self.cpus),
        }


def plan_limits(cpu: float, memory: int, instance_id: str, nofile: int = DEFAULT_NOFILE) -> Limits:
    """The limits for an instance asking for ``cpu`` cores and ``memory`` bytes.

    CPU is enforced as an affinity mask of ``ceil(cpu)`` cores. Which cores is
    derived from the instance id, so instances spread over the machine instead
    of all sharing core 0.
    """
    available = sorted(os.sched_getaffinity(0))
    wanted = max(1, math.ceil(cpu))
    cpus: tuple[int, ...] = ()
    if wanted < len(available):
        first = zlib.crc32(instance_id.encode()) % len(available)
        cpus = tuple(sorted(available[(first + i) % len(available)] for i in range(wanted)))
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_nofile != resource.RLIM_INFINITY:
        nofile = min(nofile, hard_nofile)
    return Limits(memory=memory if memory > 0 else None, nofile=nofile, cpus=cpus)


def launcher_argv(limits: Limits, command: list[str]) -> list[str]:
    """``command`` prefixed with the launcher that applies ``limits``."""
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
    if limits.memory is not None:
        argv += ["--as", str(limits.memory)]
    argv += ["--nofile", str(limits.nofile), "--core", str(limits.core)]
    if limits.cpus:
        argv += ["--cpus", ",".join(str(cpu) for cpu in limits.cpus)]
    return [*argv, "--", *command]


def _set_limit(which: int, value: int) -> None:
    # Lowering the hard limit too keeps the tool from raising it back.
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _main(argv: list[str]) -> None:
    """Apply the limits named on the command line, then exec the command."""
    if "--" not in argv:
        sys.stderr.write("usage: limits.py [--as N] [--nofile N] [--core N] [--cpus L] -- CMD\n")
        sys.exit(2)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    pairs = dict(zip(options[::2], options[1::2], strict=False))
    try:
        if "--as" in pairs:
            _set_limit(resource.RLIMIT_AS, int(pairs["--as"]))
        if "--nofile" in pairs:
            _set_limit(resource.RLIMIT_NOFILE, int(pairs["--nofile"]))
        if "--core" in pairs:
            _set_limit(resource.RLIMIT_CORE, int(pairs["--core"]))
        if "--cpus" in pairs:
            os.sched_setaffinity(0, {int(cpu) for cpu in pairs["--cpus"].split(",")})
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"labgate: cannot apply resource limits: {exc}\n")
        sys.exit(EXEC_FAILED)
    if not command:
        sys.exit(0)
    try:
        os.execvp(command[0], command)  # noqa: S606 - the whole point of the launcher
    except OSError as exc:
        sys.stderr.write(f"labgate: cannot execute {command[0]}: {exc.strerror}\n")
        sys.exit(EXEC_FAILED)


if __name__ == "__main__":
    _main(sys.argv[1:])
