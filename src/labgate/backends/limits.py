"""Resource limits and the uid switch of process-backend instances: a tiny launcher.

The backend runs the launcher in front of ``bwrap`` (or of the tool, unsandboxed),
and everything it sets is inherited by every process of the instance::

    python -I -S .../limits.py [--cgroups FILE,FILE] --as BYTES --nofile N --core 0
        --cpus 0,1 -- COMMAND...

It joins the instance's cgroups (made by :mod:`labgate.backends.cgroups`),
sets the rlimits and the CPU affinity on itself, then ``exec``\\ s the command,
so the pid the backend tracks stays the same.

When labgate runs as root, something inside the sandbox, right in front of
the tool, switches to the instance's uid: util-linux's ``setpriv`` where the
system has it (Debian and Ubuntu always do: it is part of an essential
package), else this launcher a second time::

    python -I -S .../limits.py --drop UID:GID --chdir WORKSPACE -- TOOL...

Either empties the capability bounding set, drops supplementary groups,
switches gid and uid (which clears every remaining capability), empties the
inheritable and ambient sets, sets ``no_new_privs`` and ``exec``\\ s the tool
(the launcher also checks that no capability is left).
(``bwrap`` itself cannot switch to a uid unless it also makes a user namespace,
where that uid would stand for root outside.)

It imports only the standard library and runs isolated (``-I -S``), so it
starts in a few milliseconds and does not depend on the environment it is given.

A launcher rather than ``subprocess``'s ``preexec_fn``: ``preexec_fn`` runs
Python code between ``fork`` and ``exec`` in a server that has threads (the
event loop's executor), which the Python docs call unsafe.
"""

from __future__ import annotations

import errno
import math
import os
import resource
import shutil
import sys
import zlib
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labgate.backends.cgroups import Cgroup

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
    #: The instance's cgroup, when it has one (see :mod:`labgate.backends.cgroups`).
    cgroup: Cgroup | None = None

    def as_json(self) -> dict[str, Any]:
        """Plain JSON form, as stored in the instance state."""
        return {
            "memory": self.memory,
            "nofile": self.nofile,
            "core": self.core,
            "cpus": list(self.cpus),
            "cgroup": self.cgroup.as_json() if self.cgroup is not None else None,
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


def launcher_options(limits: Limits) -> list[str]:
    """The launcher's options that apply ``limits`` (what :func:`apply` takes, as pairs)."""
    options: list[str] = []
    if limits.cgroup is not None:
        options += ["--cgroups", ",".join(limits.cgroup.join_files())]
    if limits.memory is not None:
        options += ["--as", str(limits.memory)]
    options += ["--nofile", str(limits.nofile), "--core", str(limits.core)]
    if limits.cpus:
        options += ["--cpus", ",".join(str(cpu) for cpu in limits.cpus)]
    return options


def launcher_argv(limits: Limits, command: list[str]) -> list[str]:
    """``command`` prefixed with the launcher that applies ``limits``."""
    launcher = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
    return [*launcher, *launcher_options(limits), "--", *command]


@cache
def _system_tools() -> tuple[str, str] | None:
    """``setpriv`` and ``env`` from the system directories (util-linux and coreutils)."""
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
    env = shutil.which("env", path="/usr/bin:/bin")
    return (setpriv, env) if setpriv and env else None


def dropping_argv(uid: int, gid: int, cwd: str, command: list[str]) -> list[str]:
    """``command`` prefixed with what runs it as ``uid``/``gid`` in ``cwd``, capability-free.

    ``setpriv`` (util-linux, a few hundred microseconds) when the system has it,
    else this launcher (Python with ctypes: some 10 ms more per launch). The
    working directory is entered after the switch (``env -C``): the workspace
    is the uid's, mode 0700, which root without capabilities cannot enter.
    """
    tools = _system_tools()
    if tools is None:
        launcher = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
        return [*launcher, "--drop", f"{uid}:{gid}", "--chdir", cwd, "--", *command]
    setpriv, env = tools
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
        env,
        "-C",
        cwd,
        "--",
        *command,
    ]


def _set_limit(which: int, value: int) -> None:
    # Lowering the hard limit too keeps the tool from raising it back.
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
_CAPABILITY_VERSION_3 = 0x20080522


def _drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no groups, no capabilities (bounding set too), no_new_privs."""
    import ctypes  # only here: the outer launcher need not load it

    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(*args: int) -> int:
        result: int = libc.prctl(*(ctypes.c_ulong(a) for a in args))
        return result

    # Needs CAP_SETPCAP, which bwrap keeps for this step only; EINVAL past the last cap.
    for cap in range(64):
        if prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                break
            raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
    if prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot clear the ambient capabilities")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to another uid: permitted and effective caps go
    # The inheritable set survives setuid; empty it too (version 3 header, two zeroed sets).
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(ctypes.get_errno(), "cannot clear the inheritable capabilities")
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot set no_new_privs")
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status if ":" in line)
    left = [n for n in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") if int(fields[n], 16)]
    if os.getuid() != uid or os.getgroups() or left:
        raise OSError(errno.EPERM, f"privileges left after the switch: {left or 'uid/groups'}")


def apply(options: list[str]) -> None:
    """Apply the launcher's ``options`` (``--cgroups F,F --as N ...``) to this process.

    The batch task executor calls it in its child before ``exec`` (saving a
    launcher process per task); OSError or ValueError when something cannot be applied.
    """
    pairs = dict(zip(options[::2], options[1::2], strict=False))
    for join in filter(None, pairs.get("--cgroups", "").split(",")):
        with open(join, "w") as procs:
            procs.write("0")  # "0": the writer itself
    if "--drop" in pairs:
        uid, gid = (int(part) for part in pairs["--drop"].split(":"))
        _drop_privileges(uid, gid)
    if "--chdir" in pairs:
        os.chdir(pairs["--chdir"])
    if "--as" in pairs:
        _set_limit(resource.RLIMIT_AS, int(pairs["--as"]))
    if "--nofile" in pairs:
        _set_limit(resource.RLIMIT_NOFILE, int(pairs["--nofile"]))
    if "--core" in pairs:
        _set_limit(resource.RLIMIT_CORE, int(pairs["--core"]))
    if "--cpus" in pairs:
        os.sched_setaffinity(0, {int(cpu) for cpu in pairs["--cpus"].split(",")})


def _main(argv: list[str]) -> None:
    """Apply the limits named on the command line, then exec the command."""
    if "--" not in argv:
        sys.stderr.write(
            "usage: limits.py [--cgroups FILES] [--drop UID:GID] [--as N] [--nofile N] "
            "[--chdir DIR] [--core N] [--cpus L] -- CMD\n"
        )
        sys.exit(2)
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    try:
        apply(options)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"labgate: cannot apply resource limits or drop privileges: {exc}\n")
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
