"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd on this machine.

Started once per test session (see the ``slurm_cluster`` fixture in
``tests/backends/conftest_slurm.py`` users) from Debian's ``slurm-wlm`` and
``munge``, as ``MACHINE-NOTES.md`` describes: a key for munge, munged as user
munge, a ``slurm.conf`` of one node with this machine's name, and both Slurm
daemons in the foreground so the session can stop them; with ``slurmdbd``
installed also accounting, as real clusters keep it: a private MariaDB and
slurmdbd, so ``sacct`` answers. Its configuration,
state and logs live in a temporary directory; its ports are free ones, so it
never touches a cluster the machine may run for something else.

Jobs run as their owners' Unix accounts (the backend's default ``run_as =
"owner"``): :func:`owner_accounts` creates the test users' accounts
(:data:`ACCOUNTS`, normal uids from 1000 up, no home, no login), a shared
directory those accounts can pass through (``/tmp/pytest-of-root`` cannot
be: it is mode 0700) for the jobs' directories and workspaces, and a Python
they can run that imports labgate (the tests' own may live under ``/root``).

Outside CI the tests skip when the packages are missing (saying what to
install); with ``CI=true`` they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
INSTALL = "apt-get install slurm-wlm munge slurmdbd mariadb-server (and run as root)"
#: The node's CPUs as Slurm counts them; tests fill it with jobs of one CPU each.
NODE_CPUS = 2
MUNGE_SOCKET = "/run/munge/munge.socket.2"
#: The test users' Unix accounts on the cluster: labgate user name -> account.
ACCOUNTS = {name: f"lgslurm-{name}" for name in ("alice", "bob", "admin", "carol")}


def need(reason: str) -> None:
    """Skip (fail in CI) when the cluster cannot be started."""
    if IN_CI:
        pytest.fail(f"CI must run the Slurm tests: {reason}")
    pytest.skip(f"{reason}: {INSTALL}")


def free_port() -> int:
    """A free TCP port on this machine."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port: int = sock.getsockname()[1]
        return port


def outward_address() -> str | None:
    """This machine's address on its default route's interface (no packet is sent), or None.

    What a compute node's address is to a router on another host: a job's relay
    listens there while its tool listens on loopback only.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@dataclass
class Cluster:
    """A running one-node cluster: its config file and what the backend options need."""

    root: Path
    conf: Path
    node: str
    daemons: list[subprocess.Popen[bytes]]
    #: Where jobs' directories and workspaces go: every account may pass through.
    shared: Path | None = None
    #: A Python the test accounts can run, with labgate importable.
    python: str = ""

    @property
    def env(self) -> dict[str, str]:
        """The environment Slurm's commands need to find this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True) -> str:
        """Run a Slurm command against this cluster; its output."""
        done = subprocess.run(
            argv, env=self.env, capture_output=True, text=True, timeout=30, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout

    def options(self, **extra: object) -> dict[str, object]:
        """Site options of a ``slurm`` site on this cluster (its jobs run as the test accounts)."""
        found: dict[str, object] = {"slurm_conf": str(self.conf), "poll_interval": 0.3}
        if self.python:
            found.update(python=self.python, accounts=dict(ACCOUNTS))
        return {**found, **extra}

    def area(self, prefix: str = "test-") -> Path:
        """A new directory under :attr:`shared` (mode 0711), for one test's jobs and workspaces."""
        if self.shared is None:
            raise RuntimeError("the cluster was started without owner_accounts")
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.shared))
        path.chmod(0o711)
        return path

    def cancel_all(self) -> None:
        """Cancel every job, whoever's (tests leave the node empty for the next one)."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).split()
        if jobs:
            self.run("scancel", "--full", *jobs, check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False).strip():
                return
            time.sleep(0.2)

    def log(self, name: str) -> str:
        """The tail of a daemon's log (slurmctld, slurmd), for failure messages."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _munge_works() -> bool:
    munge, unmunge = shutil.which("munge"), shutil.which("unmunge")
    if munge is None or unmunge is None:
        return False
    cred = subprocess.run([munge, "-n"], capture_output=True, timeout=10, check=False)
    if cred.returncode != 0:
        return False
    back = subprocess.run([unmunge], input=cred.stdout, capture_output=True, timeout=10)
    return back.returncode == 0


def _start_munge() -> None:
    """munged as user munge, with a key made here when the package left none."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    for directory in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.chown(directory, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
    deadline = time.monotonic() + 15
    while not _munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged did not start")
        time.sleep(0.1)


def slurm_conf(root: Path, node: str, dbd_port: int | None = None) -> str:
    """The ``slurm.conf`` of the test cluster: one node, two partitions, fast timeouts.

    With ``dbd_port``, jobs are accounted by the slurmdbd listening there (``sacct``).
    """
    ctld, slurmd = free_port(), free_port()
    accounting = (
        f"AccountingStorageType=accounting_storage/slurmdbd\n"
        f"AccountingStorageHost={node}\nAccountingStoragePort={dbd_port}\n"
        if dbd_port is not None
        else "AccountingStorageType=accounting_storage/none\n"
    )
    return (
        accounting
        + f"""\
ClusterName=labgate
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1,sched_min_interval=100000
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
KillWait=2
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
NodeName={node} CPUs={NODE_CPUS} State=UNKNOWN
PartitionName=interactive Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=batch Nodes={node} MaxTime=INFINITE State=UP
"""
    )


@contextlib.contextmanager
def start_cluster() -> Iterator[Cluster]:
    """Start munge and a one-node cluster; stop the Slurm daemons (and their jobs) after."""
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged") if not _which(c)]
    if missing:
        need(f"missing {', '.join(missing)}")
    if os.geteuid() != 0:
        need("the Slurm test cluster runs its daemons as root")
    _start_munge()
    root = Path(tempfile.mkdtemp(prefix="labgate-slurm-"))
    # The test accounts' sbatch reads slurm.conf: they pass through, list nothing.
    root.chmod(0o711)
    for sub in ("state", "spool"):
        (root / sub).mkdir(mode=0o700)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen[bytes]] = []
    cluster = Cluster(root, conf, node, daemons)
    try:
        dbd_port = _start_accounting(cluster) if _which("slurmdbd") else None
        conf.write_text(slurm_conf(root, node, dbd_port))
        for argv in (["slurmctld", "-D", "-c", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
            out = (root / f"{argv[0]}.out").open("wb")
            daemons.append(
                subprocess.Popen(
                    [_which(argv[0]) or argv[0], *argv[1:]],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        _wait_idle(cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


def _start_accounting(cluster: Cluster) -> int:
    """A private MariaDB and slurmdbd, so ``sacct`` answers as on a real cluster; slurmdbd's port.

    MariaDB keeps its files in the cluster's directory and listens on a free
    loopback port; slurmdbd reads ``slurmdbd.conf`` next to ``slurm.conf``.
    """
    root, node = cluster.root, cluster.node
    mariadbd = _which("mariadbd")
    if mariadbd is None:
        need("slurmdbd is installed but mariadbd is not (apt-get install mariadb-server)")
    data = root / "mysql"
    subprocess.run(
        ["mariadb-install-db", f"--datadir={data}", "--user=root", "--skip-test-db",
         "--auth-root-authentication-method=normal"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    db_port, dbd_port = free_port(), free_port()
    log = (root / "mariadb.log").open("wb")
    cluster.daemons.append(
        subprocess.Popen(
            [mariadbd or "mariadbd", "--no-defaults", f"--datadir={data}", "--user=root",
             f"--port={db_port}", "--bind-address=127.0.0.1", f"--socket={root}/mysql.sock",
             f"--pid-file={root}/mysql.pid", "--skip-log-bin", "--innodb-buffer-pool-size=32M"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    )  # fmt: skip
    dbd_conf = root / "slurmdbd.conf"
    dbd_conf.write_text(
        f"AuthType=auth/munge\nDbdHost={node}\nDbdPort={dbd_port}\nSlurmUser=root\n"
        f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
        f"StoragePort={db_port}\nStorageUser=root\nStorageLoc=slurm_acct_db\n"
        f"LogFile={root}/slurmdbd.log\nPidFile={root}/slurmdbd.pid\n"
    )
    dbd_conf.chmod(0o600)
    _wait_for(
        lambda: subprocess.run(
            ["mariadb", "--no-defaults", "-h", "127.0.0.1", "-P", str(db_port), "-u", "root",
             "-e", "select 1"],
            capture_output=True, timeout=10, check=False,
        ).returncode == 0,
        "MariaDB",
        cluster,
    )  # fmt: skip
    env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
    out = (root / "slurmdbd.out").open("wb")
    cluster.daemons.append(
        subprocess.Popen(
            [_which("slurmdbd") or "slurmdbd", "-D"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    )  # fmt: skip
    # The conf slurmdbd needs to find it must exist before sacctmgr can talk to it.
    cluster.conf.write_text(slurm_conf(root, node, dbd_port))
    _wait_for(
        lambda: cluster.run("sacctmgr", "-i", "add", "cluster", "labgate", check=False) != ""
        or "labgate" in cluster.run("sacctmgr", "-n", "list", "cluster", "format=cluster",
                                    check=False),
        "slurmdbd",
        cluster,
    )  # fmt: skip
    return dbd_port


def _wait_for(check: Callable[[], bool], what: str, cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for daemon in cluster.daemons:
            if daemon.poll() is not None:
                raise RuntimeError(f"{what}: a daemon exited ({daemon.args}): see {cluster.root}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout}s: see {cluster.root}")
        time.sleep(0.2)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _wait_idle(cluster: Cluster, timeout: float = 60) -> None:
    """Wait until the node is up and idle (slurmd registered with slurmctld)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for daemon in cluster.daemons:
            if daemon.poll() is not None:
                raise RuntimeError(
                    f"a Slurm daemon exited ({daemon.returncode}):\n"
                    f"{cluster.log('slurmctld')}\n{cluster.log('slurmd')}"
                )
        state = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).strip()
        if state.startswith("idle"):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"the Slurm node is not idle after {timeout}s (state {state!r}):\n"
        f"{cluster.log('slurmctld')}\n{cluster.log('slurmd')}"
    )


@contextlib.contextmanager
def owner_accounts(cluster: Cluster) -> Iterator[dict[str, str]]:
    """The test users' accounts, the shared directory and the accounts' Python; undone after.

    Accounts that exist already (a previous session's) are used and left; the
    ones made here are removed at the end.
    """
    if _which("useradd") is None:
        need("useradd is missing (Debian: passwd)")
    made = []
    shared = Path(tempfile.mkdtemp(prefix="labgate-slurm-shared-"))
    shared.chmod(0o711)
    try:
        for account in ACCOUNTS.values():
            try:
                pwd.getpwnam(account)
            except KeyError:
                subprocess.run(
                    [_which("useradd") or "useradd", "--no-create-home", "--user-group",
                     "--shell", "/usr/sbin/nologin", account],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip
                made.append(account)
        cluster.shared = shared
        cluster.python = node_python(shared, ACCOUNTS["alice"])
        yield dict(ACCOUNTS)
    finally:
        cluster.shared, cluster.python = None, ""
        # userdel refuses an account whose job still runs: end the jobs first.
        with contextlib.suppress(Exception):
            cluster.cancel_all()
        shutil.rmtree(shared, ignore_errors=True)
        for account in made:
            subprocess.run(
                [_which("userdel") or "userdel", account], capture_output=True, timeout=30
            )


def node_python(shared: Path, account: str) -> str:
    """A Python ``account`` can run that imports labgate (and the tests' packages).

    The tests' own interpreter when the account can run it; else a venv in
    ``shared`` on the system's Python of the same version, which imports the
    tests' site-packages (the same ABI).
    """

    def works(python: str) -> bool:
        done = subprocess.run(
            ["runuser", "-u", account, "--", python, "-c", "import labgate.tools.demo"],
            capture_output=True, timeout=60, check=False, cwd="/",
        )  # fmt: skip
        return done.returncode == 0

    if works(sys.executable):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/bin:/usr/local/bin")
    if system is None:
        need(f"the test accounts cannot run {sys.executable} and there is no /usr/bin/{version}")
    venv = shared / "python"
    subprocess.run([system or version, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    tests_site = sysconfig.get_path("purelib")
    (site / "labgate_tests.pth").write_text(f"import site; site.addsitedir({tests_site!r})\n")
    python = str(venv / "bin" / "python")
    if not works(python):
        need(f"the test accounts cannot import labgate with {python}")
    return python
