"""Real Podman and a real image registry for the containers tests.

One ``podman system service`` (the Docker Engine API on a unix socket in a
temporary directory) and one registry (Debian's ``docker-registry``, the
CNCF distribution registry, on a random loopback port with its storage in a
temporary directory) serve the whole test run; both start on first use and
stop when the run ends. Podman gets the run's own ``containers.conf`` and
``registries.conf`` through ``CONTAINERS_CONF`` and
``CONTAINERS_REGISTRIES_CONF``, so the machine's files are left alone; what
the run does change on the machine is listed in docs/development.md. The
test images come from
``scripts/build-test-images.sh`` (cached, so a rerun takes a second).

Outside CI the tests that need them skip when Podman or the registry is
missing; with ``CI=true`` they fail instead. Every test gets its own
deployment label, and whatever it leaves behind (containers, workspace
volumes) is removed after it; snapshot images and the registry go at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"
DEMO_IMAGE = "localhost/labgate/demo:latest"
BUSYBOX_IMAGE = "localhost/labgate/busybox:latest"
#: This test run: deployment labels and registry paths start with it.
RUN = f"t{secrets.token_hex(3)}"
_counter = itertools.count(1)

CONTAINERS_CONF = """\
# Written by labgate's tests (see MACHINE-NOTES): runc and cgroupfs work here,
# crun and raised rlimits do not.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
#: What every Podman process of the run gets in its environment: its own containers.conf
#: and registries.conf (set when the engine starts).
ENGINE_ENV: dict[str, str] = {}
#: The ``containers`` user's ids for ``--userns=auto``: the top half of the id space,
#: far above the ranges useradd hands to accounts (100000 and up).
SUBIDS = "containers:2147483647:2147483648\n"


def need(reason: str) -> None:
    """Skip (fail in CI) when a dependency of the containers tests is missing."""
    if IN_CI:
        pytest.fail(f"CI must run the containers tests: {reason}")
    pytest.skip(reason)


@dataclass
class Registry:
    """A registry on loopback; ``url`` is what the ``snapshot_registry`` setting takes."""

    host: str
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def namespace(self) -> str:
        """``snapshot_registry`` for one test: its own path in the registry."""
        return f"{self.url}/{RUN}-{next(_counter)}"


@dataclass
class Engine:
    """A Podman service speaking the Docker Engine API."""

    base_url: str
    process: subprocess.Popen[bytes]
    directory: Path
    client: Any

    def site(self, name: str = "box", *, deployment: str, **options: Any) -> dict[str, Any]:
        """A containers site on this engine, as the ``sites`` setting takes it."""
        return {
            "name": name,
            "backend": "containers",
            "options": {"base_url": self.base_url, "deployment": deployment, **options},
        }

    def containers_of(self, deployment: str) -> list[str]:
        """Ids of every container (running or not) labelled with ``deployment``."""
        found = self.client.api.containers(
            all=True, filters={"label": f"labgate.deployment={deployment}"}
        )
        return [str(item["Id"]) for item in found]

    def remove(self, container_id: str) -> None:
        """Remove a container as someone else than labgate would (``podman rm -f``).

        Podman can fail "shm: device or resource busy" on a container that is
        still being cleaned up; a moment later it is gone or removable.
        """
        for attempt in range(10):
            try:
                self.client.api.remove_container(container_id, force=True)
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if "resource busy" not in str(exc) or attempt == 9:
                    raise
            time.sleep(0.2 * (attempt + 1))

    def clean(self, deployment: str) -> None:
        """Remove the containers and workspace volumes of one deployment."""
        for container_id in self.containers_of(deployment):
            with contextlib.suppress(Exception):
                self.client.api.remove_container(container_id, force=True, v=True)
        for volume in self.client.volumes.list(
            filters={"label": f"labgate.deployment={deployment}"}
        ):
            with contextlib.suppress(Exception):
                volume.remove(force=True)


_engine: Engine | None = None
_registry: Registry | None = None
_failure: str | None = None


def _wait(check: Any, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start: {log.read_text()[-2000:]}")


def _start_registry() -> Registry:
    binary = shutil.which("docker-registry")
    if binary is None:
        raise LookupError("docker-registry is not installed: apt-get install docker-registry")
    directory = Path(tempfile.mkdtemp(prefix="labgate-registry-"))
    host = f"127.0.0.1:{free_port()}"
    config = directory / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {directory / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: {host}\n"
    )
    log = directory / "registry.log"
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=log.open("ab"), stderr=subprocess.STDOUT
    )
    import httpx

    _wait(lambda: httpx.get(f"http://{host}/v2/", timeout=1).status_code == 200, "registry", log)
    return Registry(host, process, directory)


def _start_engine(registry: Registry) -> Engine:
    if shutil.which("podman") is None or shutil.which("runc") is None:
        raise LookupError("podman is not installed: apt-get install podman runc")
    if os.geteuid() != 0:
        raise LookupError("the containers tests need root (rootful Podman)")
    import docker

    reserve_container_ids()
    directory = Path(tempfile.mkdtemp(prefix="labgate-podman-"))
    # This run's engine settings, for its Podman processes only: the machine's own
    # /etc/containers/containers.conf is neither read nor written (docs/development.md).
    conf = directory / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    ENGINE_ENV["CONTAINERS_CONF"] = str(conf)
    # The test registry speaks plain HTTP: this service (only) may use it so.
    registries = directory / "registries.conf"
    registries.write_text(
        f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{registry.host}"\n'
        "insecure = true\n"
    )
    socket_path = directory / "podman.sock"
    log = directory / "podman.log"
    ENGINE_ENV["CONTAINERS_REGISTRIES_CONF"] = str(registries)
    env = {**os.environ, **ENGINE_ENV}
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    base_url = f"unix://{socket_path}"
    _wait(socket_path.exists, "podman system service", log)
    client = docker.DockerClient(base_url=base_url, version="auto", timeout=120)
    _wait(client.ping, "podman system service", log)
    return Engine(base_url, process, directory, client)


def podman_service(
    socket_path: Path, log: Path, storage: Path | None = None
) -> subprocess.Popen[bytes]:
    """Another ``podman system service`` on ``socket_path``, ready; the caller stops it.

    It shares the run's container storage: a test stops it to have "the
    engine down" for one site without touching the run's own service. With
    ``storage`` it has its own, empty (an engine that has none of the images).
    """
    own = (
        []
        if storage is None
        else ["--root", str(storage / "root"), "--runroot", str(storage / "run")]
    )
    process = subprocess.Popen(
        ["podman", *own, "system", "service", "--time=0", f"unix://{socket_path}"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **ENGINE_ENV},
    )
    import docker

    def answers() -> bool:
        client = docker.DockerClient(base_url=f"unix://{socket_path}", version="auto", timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    _wait(answers, "podman system service", log)
    return process


#: What Podman before 4.4 answers when the container's process exits as it reads its cgroup.
EXIT_RACE = 'Internal Server Error ("read /proc/2082/cgroup: no such process")'


@dataclass
class ExitRace:
    """What :func:`exit_race` did: containers it started, and those whose inspect it failed."""

    started: list[str]
    tripped: list[str]


@contextlib.contextmanager
def exit_race(api: Any) -> Iterator[ExitRace]:
    """Podman 4.3's race (podman#16383) on ``api``, a Docker SDK ``APIClient``, meanwhile.

    The engine really starts each container; its answer to the start and to
    the first inspect of each name or id after it are replaced by the error
    Podman gives when the process exits as it reads its cgroup.
    """
    race = ExitRace([], [])
    real_start, real_inspect = api.start, api.inspect_container

    def start(container: str, *args: Any, **kwargs: Any) -> None:
        real_start(container, *args, **kwargs)
        race.started.append(container)
        raise docker.errors.APIError("500 Server Error", explanation=EXIT_RACE)

    def inspect_container(container: str) -> Any:
        if race.started and container not in race.tripped:
            race.tripped.append(container)
            raise docker.errors.APIError("500 Server Error", explanation=EXIT_RACE)
        return real_inspect(container)

    api.start, api.inspect_container = start, inspect_container
    try:
        yield race
    finally:
        api.start, api.inspect_container = real_start, real_inspect


def reserve_container_ids() -> None:
    """Give Podman's ``containers`` user its id range (the backend's ``userns_range``).

    Podman reads it when its service starts; .ci/run writes the same line.
    """
    for name in ("/etc/subuid", "/etc/subgid"):
        path = Path(name)
        text = path.read_text() if path.exists() else ""
        if not any(line.startswith("containers:") for line in text.splitlines()):
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + SUBIDS)


def _build_images() -> None:
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-test-images.sh")],
        env={**os.environ, **ENGINE_ENV},
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/build-test-images.sh failed:\n{result.stderr[-3000:]}")


def _shutdown() -> None:
    if _engine is not None:
        with contextlib.suppress(Exception):
            for image in _engine.client.images.list():
                if any(f"/{RUN}-" in tag for tag in image.tags):
                    for tag in image.tags:
                        _engine.client.images.remove(tag, force=True)
        with contextlib.suppress(Exception):
            _engine.client.close()
    for service in (_engine, _registry):
        if service is None:
            continue
        service.process.terminate()
        try:
            service.process.wait(10)
        except subprocess.TimeoutExpired:
            service.process.kill()
        shutil.rmtree(service.directory, ignore_errors=True)


def engine_and_registry() -> tuple[Engine, Registry]:
    """The run's Podman service and registry, started (and the images built) once."""
    global _engine, _registry, _failure
    if _failure is not None:
        need(_failure)
    if _engine is None or _registry is None:
        try:
            if shutil.which("podman") is None or shutil.which("runc") is None:
                raise LookupError("podman is not installed: apt-get install podman runc")
            if _registry is None:
                _registry = _start_registry()
                atexit.register(_shutdown)
            _engine = _start_engine(_registry)
            _build_images()
        except LookupError as exc:
            _failure = str(exc)
            need(_failure)
    assert _engine is not None and _registry is not None
    return _engine, _registry


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The Podman service of this test run."""
    return engine_and_registry()[0]


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The image registry of this test run."""
    return engine_and_registry()[1]


@pytest.fixture
def deployment(engine: Engine) -> Iterator[str]:
    """A deployment label of this test alone; its containers and volumes go afterwards."""
    value = f"{RUN}-{next(_counter)}"
    yield value
    engine.clean(value)
