"""The process backend: tools run as local processes, sandboxed by bubblewrap.

Each instance is one process tree started in its own session, with a limited
environment, its workspace as working directory and ``HOME``, its output
appended to ``<logs_dir>/<instance id>.log``, and the limits of
:mod:`labgate.backends.limits`. When ``bwrap`` is available (or required by
``sandbox = "bwrap"``) the tool runs inside the sandbox of
:mod:`labgate.backends.sandbox`. See ``docs/backends/process.md``.

The saved state identifies the tracked process (the launcher, which ``exec``\\ s
``bwrap`` or the tool) by pid *and* start time, so a reused pid is never taken
for the tool, and it is all :meth:`ProcessBackend.poll` and
:meth:`ProcessBackend.stop` need: after a server restart a new backend
re-attaches from the state alone. Backend options: ``nofile`` (default 8192),
``pids`` (tasks per instance under a cgroup, default 4096) and
``extra_ro_binds`` (host paths shown read-only inside the sandbox).

Run as root, a sandboxed instance runs as its owner's own unprivileged uid
(:mod:`labgate.backends.identity`) with no capabilities, in a cgroup of its own
(:mod:`labgate.backends.cgroups`); a warm-pool instance runs as a uid of its own,
which it keeps when a user claims it, and whose keyrings are emptied at its stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field

from labgate.backends import cgroups, sockets
from labgate.backends.archive import SUFFIX as ARCHIVE_SUFFIX
from labgate.backends.archive import (
    delete_archive,
    find_archive,
    restore_workspace,
    save_workspace,
)
from labgate.backends.base import (
    JSON,
    Backend,
    Diagnosis,
    LaunchSpec,
    SnapshotRef,
    SnapshotRequest,
    SnapshotResult,
    Started,
    Status,
    mount_variables,
)
from labgate.backends.claim import Claim, Claimed, ClaimError, mount_into, sandboxed_pid
from labgate.backends.confine import require_confined
from labgate.backends.deployment import deployment_id
from labgate.backends.identity import (
    Identity,
    IdentityError,
    clear_keyrings,
    hand_over,
    instance_identity,
)
from labgate.backends.limits import DEFAULT_NOFILE, dropping_argv, launcher_argv, plan_limits
from labgate.backends.procfs import (
    DEPLOYMENT_VAR,
    MARKER_VAR,
    SITE_VAR,
    boot_id,
    cpu_seconds,
    instance_processes,
    marked_instances,
    read_proc,
    signal_if_same,
    tail,
)
from labgate.backends.sandbox import (
    SandboxError,
    bwrap_argv,
    close_fds,
    find_bwrap,
)
from labgate.errors import BackendError, InstanceStartError
from labgate.tools.catalog import ProcessSpec, template_values
from labgate.tools.gate import LISTEN_FD_VAR
from labgate.tools.ports import PortPicker

if TYPE_CHECKING:
    from labgate.config import Settings, SiteSettings
    from labgate.tools.catalog import Tool

log = logging.getLogger(__name__)

INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STOP_POLL = 0.05
_KILL_ROUNDS = 100
#: An instance process (or empty cgroup) younger than this is never taken for an orphan's:
#: its launch may not be in the record the caller read yet.
ORPHAN_MIN_AGE = 60.0
#: Seconds an orphan has between SIGTERM and SIGKILL.
ORPHAN_GRACE = 10.0
_warned_unsandboxed = False


def describe_exit(code: int) -> str:
    """Human words for an exit code as :class:`subprocess.Popen` reports it."""
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


#: Words for the states of ``/proc/<pid>/stat`` a process that outlives SIGKILL may be in.
_STATE_WORDS = {
    "D": "uninterruptible sleep",
    "T": "stopped",
    "t": "traced",
    "Z": "its main thread exited",
}


def _describe_processes(processes: dict[int, int]) -> str:
    """``pid (name, state)`` for each of ``processes`` (pid -> start time), for a report."""
    parts = []
    for pid in sorted(processes):
        info = read_proc(pid)
        if info is None or info.start_time != processes[pid]:
            parts.append(f"{pid} (gone since)")
            continue
        name = info.name.decode(errors="replace")
        words = _STATE_WORDS.get(info.state, "")
        parts.append(f"{pid} ({name}, state {info.state}{': ' + words if words else ''})")
    return ", ".join(parts)


def _socket_value(sock_dir: Path | None, *, sandboxed: bool) -> str:
    """``{socket}`` of a tool's command: where the tool sees its socket ("" none)."""
    if sock_dir is None:
        return ""
    return (
        f"{sockets.SANDBOX_DIR}/{sockets.SOCKET_NAME}"
        if sandboxed
        else str(sock_dir / sockets.SOCKET_NAME)
    )


def _prepare_sockets(sock_dir: Path, identity: Identity | None) -> None:
    """Make the instance's socket directory, the tool's uid's (InstanceStartError if not)."""
    try:
        if identity is None:
            sockets.prepare(sock_dir, None, None)
        else:
            sockets.prepare(sock_dir, identity.uid, identity.gid)
    except OSError as exc:
        raise InstanceStartError(f"cannot make the tool's socket directory: {exc}") from exc


def _discard_sockets(sock_dir: Path | None) -> None:
    """A launch failed: its socket directory goes."""
    if sock_dir is not None:
        sockets.remove(sock_dir)


def _listen(port: int) -> socket.socket:
    """A socket listening on ``127.0.0.1:port``, for a tool with ``private_network``.

    Bound here, in the host's network namespace, where the router reaches it;
    the tool (the token gate) serves on it from inside its own namespace.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise InstanceStartError(f"cannot listen on 127.0.0.1:{port}: {exc}") from exc
    return sock


def _account() -> str:
    """Name of the operating-system account the server runs as."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry, as in some containers
        return str(os.getuid())


def _executable(name: str, path: str, workspace: Path) -> str:
    """Absolute path of the command's executable, or a clear InstanceStartError."""
    if os.sep in name:
        candidate = str(workspace / name)  # absolute names ignore the workspace
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
        raise InstanceStartError(f"executable {name!r} does not exist or is not executable")
    found = shutil.which(name, path=path)
    if found is None:
        raise InstanceStartError(f"executable {name!r} not found on PATH ({path})")
    return os.path.abspath(found)


def _spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    command: list[str],
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(log_path, flags, 0o600)
    except OSError as exc:
        raise InstanceStartError(f"cannot open the log file {log_path}: {exc}") from exc
    try:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.write(fd, f"--- labgate {stamp}: starting {shlex.join(command)}\n".encode())
        # A new session: the tool outlives the server and is signalled as one group.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=pass_fds,
        )
    except OSError as exc:
        raise InstanceStartError(f"cannot start {command[0]}: {exc}") from exc
    finally:
        os.close(fd)


def tool_environment(
    spec: LaunchSpec,
    workspace: Path,
    tool_env: dict[str, str],
    python: str,
    user: str,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """A tool's whole environment: a few basics, the tool's, the launch's, ``extra``, labgate's.

    ``python``'s directory leads ``PATH`` (``{python}`` tools find their own
    interpreter's scripts); the slurm backend builds its jobs' environment here too.
    """
    python_bin = os.path.dirname(python)
    path = os.environ.get("PATH", os.defpath)
    env = {
        "PATH": path if python_bin in path.split(os.pathsep) else f"{python_bin}:{path}",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "HOME": str(workspace),
        "USER": user,
    }
    env.update(tool_env)
    env.update(spec.env)
    env.update(extra or {})
    # Set last so neither the tool file nor the launch can forge them.
    env.update(
        {
            MARKER_VAR: spec.instance_id,
            "LABGATE_INSTANCE_TOKEN": spec.secret,
            "LABGATE_BASE_URL": spec.base_url,
            "LABGATE_USER": spec.owner,
        }
    )
    return env


# --- the backend -------------------------------------------------------------


class ProcessOptions(BaseModel):
    """The ``options`` of a site with ``backend = "process"``."""

    model_config = ConfigDict(extra="forbid")

    nofile: int = Field(DEFAULT_NOFILE, ge=1, description="RLIMIT_NOFILE of instance processes.")
    pids: int = Field(
        cgroups.DEFAULT_PIDS, ge=1, description="pids.max of the instance's cgroup (tasks)."
    )
    extra_ro_binds: list[str] = Field(
        default_factory=list, description="Host paths made visible read-only inside the sandbox."
    )


class ProcessBackend(Backend):
    """Runs each instance as a local process tree, in a bubblewrap sandbox when possible."""

    name = "process"
    abstract = False
    tool_section = "process"
    tool_schema = ProcessSpec
    options_schema = ProcessOptions
    snapshot_kind = "archive"

    def __init__(self, settings: Settings | SiteSettings, options: JSON | None = None) -> None:
        super().__init__(settings, options)
        config = cast(ProcessOptions, self.site_options)
        self.nofile = config.nofile
        self.pids = config.pids
        self.extra_ro_binds = list(config.extra_ro_binds)
        #: Our own children, reaped by poll/stop so their exit code is known.
        self._children: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
        self._exited: OrderedDict[tuple[int, int], int] = OrderedDict()
        #: Ports given to instances lately (see :meth:`fresh_port`).
        self._ports = PortPicker()

    # --- what it declares ---------------------------------------------------------

    @classmethod
    def check_tool(cls, spec: Any) -> str | None:
        """A tool runs when every executable or module its ``requires`` names is here."""
        return cast(ProcessSpec, spec).missing_requirement()

    def doctor(self) -> list[Diagnosis]:
        """Whether the bubblewrap sandbox the settings ask for is here."""
        bwrap = shutil.which("bwrap")
        mode, root = self.settings.sandbox, os.geteuid() == 0
        if mode == "bwrap" and bwrap is None:
            return [
                Diagnosis(
                    "fail",
                    "sandbox = 'bwrap' but bubblewrap is not installed",
                    "apt-get install bubblewrap",
                )
            ]
        if mode == "auto" and bwrap is None and root:
            return [
                Diagnosis(
                    "fail",
                    "bubblewrap is not installed and labgate runs as root: launches are refused "
                    "(a tool would run as root)",
                    "apt-get install bubblewrap (or set sandbox = 'none' to run tools as root)",
                )
            ]
        if mode == "auto" and bwrap is None:
            return [
                Diagnosis(
                    "warn",
                    "bubblewrap is not installed: instances run unsandboxed and see every "
                    "workspace",
                    "apt-get install bubblewrap (or set sandbox = 'none' to accept it)",
                )
            ]
        if mode == "none":
            return [
                Diagnosis(
                    "warn",
                    "sandbox = 'none': instances run unsandboxed" + (", as root" if root else ""),
                    "install bubblewrap and set sandbox = 'auto'",
                )
            ]
        return []

    def doctor_tools(self, tools: list[Tool]) -> list[Diagnosis]:
        """Tools with ``private_network`` get no network namespace of their own unsandboxed."""
        if self.settings.sandbox != "none" and find_bwrap() is not None:
            return []
        names = [
            tool.name
            for tool in tools
            if cast(ProcessSpec, tool.parsed(self.tool_section, ProcessSpec)).private_network
        ]
        if not names:
            return []
        return [
            Diagnosis(
                "warn",
                f"without the sandbox {', '.join(names)} listen on an open loopback port behind "
                "the token gate: other local accounts reach the app without the instance token",
                "install bubblewrap and set sandbox = 'auto', or use a containers site",
            )
        ]

    # --- start -----------------------------------------------------------------

    def sandbox_path(self) -> str | None:
        """The ``bwrap`` to use, or None to run unsandboxed, per ``settings.sandbox``."""
        global _warned_unsandboxed
        mode = self.settings.sandbox
        if mode == "none":
            return None
        bwrap = find_bwrap()
        if bwrap is None and mode == "bwrap":
            raise InstanceStartError(
                "sandbox = 'bwrap' but bubblewrap is not installed (apt-get install bubblewrap)"
            )
        if bwrap is None and os.geteuid() == 0:
            # Unsandboxed, the tool would be root: every workspace, the key, the database.
            raise InstanceStartError(
                "labgate runs as root and bubblewrap is not installed, so the tool would run as "
                "root; install it (apt-get install bubblewrap), or set sandbox = 'none' to run "
                "tools as root on a machine only you use"
            )
        if bwrap is None and not _warned_unsandboxed:
            _warned_unsandboxed = True
            log.warning(
                "bubblewrap (bwrap) is not installed: process instances run UNSANDBOXED and "
                "can read every user's workspace. Install it (apt-get install bubblewrap) "
                "or set sandbox = 'none' to acknowledge."
            )
        return bwrap

    async def start(self, spec: LaunchSpec) -> Started:
        """Start the tool in its own session; return the state and loopback endpoint."""
        # Directory creation, PATH search and fork/exec all touch the disk: off the loop.
        return await asyncio.to_thread(self._launch, spec)

    def _launch(self, spec: LaunchSpec) -> Started:
        if not INSTANCE_ID_RE.match(spec.instance_id):
            raise InstanceStartError(f"invalid instance id {spec.instance_id!r}")
        reason = self.unavailable_reason(spec.tool)
        tool = spec.tool.parsed(self.tool_section, ProcessSpec) if reason is None else None
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name!r} cannot run here: {reason}")
        bwrap = self.sandbox_path()
        workspace = spec.workspace.expanduser().resolve()
        # A warm-pool instance (its workspace is one of the pool's) runs as a uid of its own,
        # never its owner's: the _pool account owns them all, and each goes to another user.
        pool = self._pool_workspace({"workspace": str(workspace)}) is not None
        try:
            # Unsandboxed the tool needs the server's own paths (a Python under /root): its
            # uid stays.
            identity = self.identity(spec.owner_id, pool=pool) if bwrap is not None else None
        except IdentityError as exc:
            raise InstanceStartError(f"cannot choose the uid the tool runs as: {exc}") from exc
        logs_dir = self.settings.logs_dir.resolve()
        try:
            workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
            logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InstanceStartError(f"cannot create the workspace or logs dir: {exc}") from exc
        if spec.snapshot is not None:
            restore_workspace(self.settings.snapshots_dir, spec.snapshot, workspace)
        if identity is not None:
            try:
                hand_over(workspace, identity, everything=spec.snapshot is not None)
            except OSError as exc:
                raise InstanceStartError(f"cannot give the workspace to its user: {exc}") from exc

        sock_dir = self._socket_dir(spec, tool, sandboxed=bwrap is not None)
        port = self.fresh_port() if sock_dir is None else 0
        values = template_values(
            port=port,
            base_url=spec.base_url,
            workspace=str(workspace),
            instance_id=spec.instance_id,
            user=spec.owner,
            instance_token=spec.secret,
            params=spec.params,
            socket=_socket_value(sock_dir, sandboxed=bwrap is not None),
        )
        try:
            command, tool_env = tool.render(values, on_socket=sock_dir is not None)
        except (KeyError, IndexError, ValueError) as exc:
            raise InstanceStartError(f"bad command template of {spec.tool.name!r}: {exc}") from exc
        env = self.environment(spec, workspace, tool_env)
        if identity is not None:
            env["USER"] = spec.owner  # the uid has no account name of its own
        command[0] = _executable(command[0], env["PATH"], workspace)
        argv = command
        fds: tuple[int, ...] = ()
        if bwrap is not None:
            try:
                plan = bwrap_argv(
                    bwrap,
                    workspace=workspace,
                    mounts=spec.mounts,
                    private=[self.settings.data_dir.resolve()],
                    extra_ro=self.extra_ro_binds,
                    switch_uid=identity is not None,
                    private_network=tool.private_network,
                    socket_dir=sock_dir,
                )
            except SandboxError as exc:
                raise InstanceStartError(f"cannot sandbox the tool: {exc}") from exc
            fds = plan.fds
            if not plan.shows(command[0]):
                close_fds(fds)
                raise InstanceStartError(
                    f"{command[0]} is not visible inside the sandbox; add its directory to "
                    "the backend option extra_ro_binds"
                )
            inner = command
            if identity is not None:
                inner = dropping_argv(identity.uid, identity.gid, str(workspace), command)
            argv = plan.argv + inner
        elif spec.mounts:
            # Unsandboxed nothing can be bound at /data/<name>: the tool is told the host
            # paths instead, and read-only rests on the files' own permissions.
            require_confined(spec.mounts)  # a check only: nothing is bound here
            env.update(mount_variables(spec.mounts, lambda mount: str(mount.source)))
        cpu, memory = spec.resources.cpu, spec.resources.memory
        limits = plan_limits(cpu, memory, spec.instance_id, self.nofile)
        cgroup = cgroups.create(spec.instance_id, cpu, limits.cpus, limits.memory, self.pids)
        limits = replace(limits, cgroup=cgroup)

        self._reap_all()
        log_path = logs_dir / f"{spec.instance_id}.log"
        listener: socket.socket | None = None
        try:
            if sock_dir is not None:
                _prepare_sockets(sock_dir, identity)
            if tool.private_network:
                listener = _listen(port)
                env[LISTEN_FD_VAR] = str(listener.fileno())
            passed = fds if listener is None else (*fds, listener.fileno())
            popen = _spawn(launcher_argv(limits, argv), env, workspace, log_path, command, passed)
        except InstanceStartError:
            if cgroup is not None:
                cgroups.remove(cgroup.paths)
            _discard_sockets(sock_dir)
            raise
        finally:
            close_fds(fds)  # bwrap (or the tool) holds its own copies now
            if listener is not None:
                listener.close()
        info = read_proc(popen.pid)
        start_time = info.start_time if info is not None else 0
        self._children[popen.pid] = (start_time, popen)
        state: JSON = {
            "instance_id": spec.instance_id,
            "pid": popen.pid,
            "pgid": popen.pid,
            "start_time": start_time,
            "boot_id": boot_id(),
            "port": port,
            "log": str(log_path),
            "workspace": str(workspace),
            "sandbox": bwrap is not None,
            "private_network": tool.private_network and bwrap is not None,
            "uid": identity.uid if identity is not None else None,
            "gid": identity.gid if identity is not None else None,
            # A uid nothing else ever runs as (a warm-pool instance's); kept through a claim.
            "own_uid": pool and identity is not None,
            "limits": limits.as_json(),
            "started_at": time.time(),
            "socket_dir": str(sock_dir) if sock_dir is not None else None,
        }
        if sock_dir is not None:
            return Started(state=state, endpoint=f"unix:{sock_dir / sockets.SOCKET_NAME}")
        return Started(state=state, endpoint=f"http://127.0.0.1:{port}")

    @property
    def sockets_dir(self) -> Path:
        """Where instances' socket directories are (:mod:`labgate.backends.sockets`)."""
        return self.settings.data_dir / "sockets"

    def _socket_dir(self, spec: LaunchSpec, tool: ProcessSpec, *, sandboxed: bool) -> Path | None:
        """The instance's socket directory when it is to listen on a Unix socket, else None."""
        if not spec.on_socket or tool.socket_command is None:
            return None
        path = sockets.socket_dir(self.sockets_dir, spec.instance_id)
        if not sandboxed and not sockets.fits(path):
            log.warning(
                "instance %s listens on a port: unsandboxed, its tool would bind a socket "
                "under %s, longer than a socket address holds (%d bytes); give the site a "
                "shorter data_dir",
                spec.instance_id,
                self.sockets_dir,
                sockets.MAX_PATH,
            )
            return None
        return path

    def identity(self, owner_id: int | None, *, pool: bool = False) -> Identity | None:
        """Who an instance of user ``owner_id`` runs as; None: the server's own account.

        ``pool``: a warm-pool instance, whose ``owner_id`` is the number of its own uid
        (:func:`labgate.backends.identity.pool_identity_number`).
        """
        return instance_identity(self.settings.instance_uid_base, owner_id, pool=pool)

    def fresh_port(self) -> int:
        """A free loopback port not given to another instance in the last minute."""
        return self._ports.pick()

    def environment(
        self, spec: LaunchSpec, workspace: Path, tool_env: dict[str, str]
    ) -> dict[str, str]:
        """The tool's whole environment: a few basics, the tool's, the launch's, labgate's.

        Labgate's marks come last (neither the tool file nor the launch can
        forge them): the instance id, and this deployment and site, by which
        :meth:`reconcile` finds instances no one knows of any more.
        """
        env = tool_environment(spec, workspace, tool_env, sys.executable, _account())
        env.update({DEPLOYMENT_VAR: self.deployment, SITE_VAR: self.site})
        return env

    @functools.cached_property
    def deployment(self) -> str:
        """This labgate's deployment id (:func:`~labgate.backends.deployment.deployment_id`)."""
        return deployment_id(self.settings.data_dir)

    # --- poll --------------------------------------------------------------------

    async def poll(self, state: JSON) -> Status:
        """Alive when the tracked pid exists, is not a zombie and has the saved start time."""
        pid, start = int(state["pid"]), int(state["start_time"])
        if state.get("boot_id") and state["boot_id"] != boot_id():
            return Status(alive=False, detail="process vanished (the machine rebooted)")
        code = self._exit_code(pid, start)
        if code is not None:
            return Status(alive=False, exit_code=code, detail=describe_exit(code))
        info = read_proc(pid)
        if info is None or info.start_time != start:
            return Status(alive=False, detail="process vanished")
        if info.zombie:  # exited, and its parent (another server process) has not reaped it
            code = os.waitstatus_to_exitcode(info.exit_status)
            return Status(alive=False, exit_code=code, detail=describe_exit(code))
        return Status(alive=True)

    async def cpu_seconds(self, state: JSON) -> float | None:
        """CPU time of every process of the instance (its tree, session and marked ones)."""
        instance_id = str(state["instance_id"])
        pid, start = int(state["pid"]), int(state["start_time"])

        def measure() -> float:
            return cpu_seconds(instance_processes(instance_id, pid, {pid: start}))

        return await asyncio.to_thread(measure)

    def _reap_all(self) -> None:
        """Reap every child of ours that has exited, polled or not: no zombies linger."""
        for pid, (start, _) in list(self._children.items()):
            self._exit_code(pid, start)

    def _exit_code(self, pid: int, start: int) -> int | None:
        """The exit code of our own child ``pid`` (reaping it), if it has exited."""
        if (pid, start) in self._exited:
            return self._exited[(pid, start)]
        child_start, popen = self._children.get(pid, (None, None))
        if popen is None or child_start != start or popen.poll() is None:
            return None
        # A start's worker thread reaps too (_reap_all): the other caller may be first.
        self._children.pop(pid, None)
        self._exited[(pid, start)] = popen.returncode
        while len(self._exited) > 4096:
            self._exited.popitem(last=False)
        return popen.returncode

    # --- stop --------------------------------------------------------------------

    async def stop(self, state: JSON, grace: float) -> None:
        """TERM the whole instance, wait up to ``grace`` seconds, KILL what is left.

        Returns once no process of the instance remains (zombies aside), seen
        by two scans in a row, the second begun after the last signal. Raises
        :class:`~labgate.errors.BackendError` naming the processes still there
        after :data:`_KILL_ROUNDS` rounds of SIGKILL (in uninterruptible sleep,
        or new ones appearing as fast as they are killed): the instance is not
        stopped. Never blocks the event loop: /proc is scanned in a worker thread.
        """
        instance_id = str(state["instance_id"])
        pid, start = int(state["pid"]), int(state["start_time"])
        if state.get("boot_id") and state["boot_id"] != boot_id():
            return
        # Under bwrap the tracked process is the outer bwrap: it waits for the sandbox and
        # passes on the tool's exit code. Signalling it would orphan the sandbox and lose
        # that code, so it is spared and exits by itself once its namespace is empty.
        spare = pid if state.get("sandbox") else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, grace)
        known: dict[int, int] = {pid: start}
        termed: set[tuple[int, int]] = set()
        # The first look is at a scan begun after this call: an older one shared with other
        # stops may predate a process just started (then nothing would be stopped).
        since: float | None = time.monotonic()
        while True:
            known = await asyncio.to_thread(instance_processes, instance_id, pid, known, since)
            since = None
            self._exit_code(pid, start)
            if not known or loop.time() >= deadline:
                break
            group = None
            if spare is None and not termed and known.get(pid) == start:
                # Also reaches children forked since the scan. The group id is the
                # leader's pid, which nobody else can hold while the leader lives.
                group = pid
                with contextlib.suppress(OSError):
                    os.killpg(group, signal.SIGTERM)
            fresh = set(known.items()) - termed
            for item in fresh:
                # Once each: a second TERM makes some servers (uvicorn) skip their cleanup.
                info = read_proc(item[0])
                if item[0] != spare and (group is None or info is None or info.pgrp != group):
                    signal_if_same(*item, signal.SIGTERM)
            termed |= fresh
            await asyncio.sleep(_STOP_POLL)
        # An instance found running is over only when a second scan, begun a moment after
        # the first empty one, is empty too: a process caught mid-exec (no environment yet)
        # whose parent had just died is in neither the first's markers nor its tree.
        checked = not termed
        alone = 0
        for _ in range(_KILL_ROUNDS):
            if not known and checked:
                break
            if known:
                checked = False
                targets = {p: s for p, s in known.items() if p != spare}
                alone = 0 if targets else alone + 1
                if alone > 10:  # the outer bwrap did not exit by itself
                    targets = known
                if targets:
                    log.info("instance %s: killing %d process(es)", instance_id, len(targets))
                if spare is None and known.get(pid) == start:
                    with contextlib.suppress(OSError):
                        os.killpg(pid, signal.SIGKILL)
                for item in targets.items():
                    signal_if_same(*item, signal.SIGKILL)
            else:
                checked = True
            await asyncio.sleep(_STOP_POLL)
            self._exit_code(pid, start)
            since = None if known else time.monotonic()
            known = await asyncio.to_thread(instance_processes, instance_id, pid, known, since)
        self._reap_all()
        if known:
            left = await asyncio.to_thread(_describe_processes, known)
            log.error("instance %s: processes survived SIGKILL: %s", instance_id, left)
            raise BackendError(
                f"instance {instance_id} is not stopped: {len(known)} of its processes "
                f"survived SIGKILL: {left}"
            )
        cgroup = (state.get("limits") or {}).get("cgroup")
        if cgroup:
            # Exiting tasks may linger in it for a moment; a sweep removes it otherwise.
            await asyncio.to_thread(cgroups.remove, list(cgroup["paths"]), 1.0)
        scratch = self._pool_workspace(state)
        if scratch is not None:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        if state.get("socket_dir") and INSTANCE_ID_RE.match(instance_id):
            # Where this backend puts it, not wherever the state says.
            path = sockets.socket_dir(self.sockets_dir, instance_id)
            await asyncio.to_thread(sockets.remove, path)
        if state.get("own_uid") and state.get("uid") is not None:
            # Nobody runs as this uid again: what its tool kept in the uid's keyrings would
            # stay in the kernel's memory, unread, for as long as the machine runs.
            problem = await asyncio.to_thread(clear_keyrings, int(state["uid"]))
            if problem is not None:
                log.warning(
                    "instance %s: keyrings of uid %s: %s", instance_id, state["uid"], problem
                )

    async def discard(self, instance_id: str, grace: float) -> None:
        """Stop every process carrying the instance's marker (no pid was recorded).

        The cgroups that start made go too: a launch of the same instance makes them
        again (it could not, and would run without limits, were they left).
        """
        await self.stop({"instance_id": instance_id, "pid": 0, "start_time": 0}, grace)
        paths = await asyncio.to_thread(cgroups.paths_of, instance_id)
        if paths:
            await asyncio.to_thread(cgroups.remove, paths, 1.0)
        if INSTANCE_ID_RE.match(instance_id):
            path = sockets.socket_dir(self.sockets_dir, instance_id)
            await asyncio.to_thread(sockets.remove, path)

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Stop this site's instances that are not in ``keep``; tidy what ended unseen.

        An orphan is an instance whose processes carry this deployment's and
        this site's marks (:meth:`environment`), started at least
        :data:`ORPHAN_MIN_AGE` seconds ago, that the caller does not know (a
        launch whose record was lost; a database restored from a backup older
        than the instance): it is stopped as :meth:`discard` does, after
        :data:`ORPHAN_GRACE` seconds of SIGTERM. Instances started by a labgate
        before these marks, another labgate's and another site's are left
        alone. Then empty cgroups and unused socket directories go. Returns
        the ids of the instances stopped.
        """
        keep = set(keep)
        found = await asyncio.to_thread(
            marked_instances, self.deployment, self.site, ORPHAN_MIN_AGE
        )
        # No id labgate gives: not one of its launches.
        orphans = sorted(i for i in found - keep if INSTANCE_ID_RE.match(i))
        # All at once: a restore may leave many, and the portal waits on a reconcile only
        # so long (stops share their scans of /proc).
        stopped = await asyncio.gather(*(self._stop_orphan(i) for i in orphans))
        await asyncio.to_thread(cgroups.sweep, keep, ORPHAN_MIN_AGE)
        await asyncio.to_thread(sockets.sweep, self.sockets_dir, keep)
        return [instance_id for instance_id, done in zip(orphans, stopped, strict=True) if done]

    async def _stop_orphan(self, instance_id: str) -> bool:
        """Stop an instance nobody knows of; whether it is gone."""
        site = self.site or "(unnamed)"
        log.warning(
            "site %s: instance %s runs with no record of it: stopping it", site, instance_id
        )
        try:
            await self.discard(instance_id, ORPHAN_GRACE)
        except BackendError as exc:
            log.warning("site %s: orphan %s: %s", site, instance_id, exc)
            return False
        return True

    # --- warm pools (see labgate.backends.claim) ----------------------------------

    def _pool_workspace(self, state: JSON) -> Path | None:
        """The instance's own warm-pool workspace (removed at stop), if it has one."""
        pool_dir = (self.settings.workspaces_dir / "_pool").resolve()
        path = Path(state.get("pool_workspace") or state.get("workspace") or "")
        return path if path.parent == pool_dir and path.name else None

    def claim_support(self, tool: Tool) -> str | None:
        """Only sandboxed instances can take on a workspace, and only with root's mounts."""
        if self.settings.sandbox == "none" or find_bwrap() is None:
            return "without the bubblewrap sandbox a running process cannot change workspace"
        if os.geteuid() != 0:
            return "mounting a workspace into a running sandbox needs root (CAP_SYS_ADMIN)"
        return None

    async def claim(self, state: JSON, claim: Claim) -> Claimed:
        """Mount the user's workspace over the pool workspace inside the instance's sandbox."""
        if not state.get("sandbox"):
            raise ClaimError("the instance runs without a sandbox")
        workspace = claim.workspace.expanduser().resolve()
        await asyncio.to_thread(workspace.mkdir, 0o700, True, True)
        # The pool instance runs as a uid of its own (never the user's, never another
        # instance's): the user's files, owned by the user's uid, are shown to it as its
        # own through an idmapped mount (see claim.py).
        idmap: tuple[int, int] | None = None
        running_as = state.get("uid")
        if running_as is not None and not state.get("own_uid"):
            # Started by an older labgate as the _pool account's uid, which every such pool
            # instance shares: its claimers would share it too (keyrings, ptrace rights).
            raise ClaimError("the instance runs as a uid other pool instances share")
        try:
            identity = self.identity(claim.owner_id) if running_as is not None else None
        except IdentityError as exc:
            raise ClaimError(f"cannot give the workspace to its user: {exc}") from exc
        if identity is not None and running_as is not None:
            try:
                await asyncio.to_thread(hand_over, workspace, identity)
            except OSError as exc:
                raise ClaimError(f"cannot give the workspace to its user: {exc}") from exc
            if identity.uid != running_as:
                idmap = (identity.uid, int(running_as))
        tracked = int(state["pid"])
        pid = await asyncio.to_thread(sandboxed_pid, str(state["instance_id"]), tracked)
        if pid is None:
            raise ClaimError("the instance's sandbox is gone")
        inside = str(state["workspace"])
        await mount_into(pid, workspace, inside, idmap)
        new_state = {**state, "workspace": str(workspace), "pool_workspace": inside}
        return Claimed(state=new_state, workspace=inside)

    # --- logs --------------------------------------------------------------------

    async def logs(self, state: JSON, lines: int = 100) -> str:
        """The last ``lines`` lines of the instance's log file."""
        return await asyncio.to_thread(tail, Path(state["log"]), lines)

    # --- snapshots (workspace archives, see labgate.backends.archive) -------------

    async def snapshot(self, state: JSON, request: SnapshotRequest) -> SnapshotResult:
        """Archive the instance's workspace into the snapshot store."""
        store, workspace = self.settings.snapshots_dir, Path(state["workspace"])
        return await asyncio.to_thread(save_workspace, workspace, store, request.snapshot_id)

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """The workspace archive in the snapshot store, if it is there (complete)."""
        store = self.settings.snapshots_dir
        return await asyncio.to_thread(
            find_archive, store, reference or f"{request.snapshot_id}{ARCHIVE_SUFFIX}"
        )

    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Remove a workspace archive from the snapshot store."""
        await asyncio.to_thread(delete_archive, self.settings.snapshots_dir, ref)
