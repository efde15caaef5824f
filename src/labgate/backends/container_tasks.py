"""Batch task attempts as containers on a containers site's engine (Docker or Podman).

The site's task executor (:mod:`labgate.agent.taskcontainer`) uses these
blocking calls, each in a worker thread:

- :func:`env_image` makes the image of a task's ``environment.python``
  requirements once per distinct (base image, list): the requirements are
  installed by the site's own ``pip`` into a build context
  (``pip install --target``), then a generated ``Containerfile``
  (``FROM <base>`` + ``COPY`` + ``ENV PYTHONPATH``) is built by the engine with
  no network, so nothing is pulled from a container registry. The base image's
  Python must be the site's Python version (compiled wheels are chosen for it).
- :func:`create_task` starts one attempt's container: the attempt's results
  directory bind-mounted at ``/labgate/results`` (its working directory), the
  task's limits (cpu, memory), and the site's isolation (dropped capabilities,
  ``no-new-privileges``, pids limit, the owner's user-namespace range).
- :func:`inspect_task`, :func:`task_logs`, :func:`stop_task`,
  :func:`remove_task` follow it.

Task containers carry the deployment and site labels and ``labgate.task``,
but not ``labgate.managed``: the instance reconciliation leaves them alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The containers extra; labgate.backends.containers says what to install without it.
from docker.errors import DockerException, ImageNotFound, NotFound  # type: ignore[import-untyped]

from labgate.backends import container_security as security
from labgate.backends.containers import (
    LABEL_SNAPSHOT,
    ContainerBackend,
    inspect_settled,
    start_container,
)
from labgate.backends.images import LOCAL_SNAPSHOTS
from labgate.backends.wheels import Reader, read_wheels, reader_key
from labgate.errors import BadRequest

#: What a failing engine call raises.
ENGINE_ERRORS: tuple[type[BaseException], ...] = (DockerException, OSError)
#: The label that names a task attempt's container.
LABEL_TASK = "labgate.task"
#: Where a task's results directory is inside its container (its working directory).
RESULTS_MOUNT = "/labgate/results"
#: Where the callable runner (labgate's ``taskcall.py``) is mounted read-only.
TASKCALL_MOUNT = "/labgate/taskcall.py"
#: Where a requirements image holds its packages (on ``PYTHONPATH``).
ENV_PREFIX = "/opt/labgate-env"
#: Repository of the images made for requirements lists.
ENV_REPOSITORY = "localhost/labgate-task-env"
#: The label of a requirements image (the tag's hash).
LABEL_TASK_ENV = "org.labgate.task-env"
#: Longest a requirements install may take (seconds).
PIP_TIMEOUT = 1800.0
#: Lines of pip's or the build's output kept in a failed preparation's reason.
FAILED_TAIL = 20

Say = Callable[[str], None]

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def env_tag(base: str, requirements: list[str], reader: Reader | None = None) -> str:
    """The image of ``requirements`` on ``base`` (the same for the list in any order),
    its wheel files read as ``reader`` (:func:`labgate.backends.wheels.reader_key`)."""
    listed = sorted(r.strip() for r in requirements if r.strip())
    canonical = json.dumps([base, listed, *reader_key(requirements, reader)])
    return f"{ENV_REPOSITORY}:{hashlib.sha256(canonical.encode()).hexdigest()[:20]}"


def has_image(backend: ContainerBackend, image: str) -> bool:
    """Whether the engine holds ``image``."""
    try:
        backend.client.api.inspect_image(image)
    except (NotFound, ImageNotFound):
        return False
    return True


def refuse_private_name(backend: ContainerBackend, image: str) -> None:
    """Refuse, before anything is pulled, a name in labgate's own repositories.

    Image snapshots (``localhost/labgate-snapshots/…``, or anything under
    the ``snapshot_registry``) and requirements images
    (``localhost/labgate-task-env:…``) each hold one user's work: their files,
    or packages from wheel files only they could read. A task names its image
    itself, so it may name none of these (:func:`refuse_private_image` checks
    what a name resolves to).
    """
    private = [LOCAL_SNAPSHOTS + "/", ENV_REPOSITORY + ":", ENV_REPOSITORY + "@"]
    if backend.registry is not None:
        private.append(backend.registry.repository() + "/")
    if image.startswith(tuple(private)):
        raise BadRequest(
            f"image {image} is one of labgate's own (an instance snapshot or a task's "
            "requirements image): a task names an image of a registry or of the site"
        )


def refuse_private_image(backend: ContainerBackend, image: str) -> None:
    """Refuse ``image`` when what the engine resolves it to is a snapshot or requirements image.

    Checked by the image's labels, whatever named it: another tag, its id, or
    the prefix of an id the engine completes.
    """
    labels = (backend.client.api.inspect_image(image).get("Config") or {}).get("Labels") or {}
    if labels.get(LABEL_SNAPSHOT) or LABEL_TASK_ENV in labels:
        raise BadRequest(
            f"image {image} is an instance snapshot or a task's requirements image: "
            "a task may not run one (each holds one user's work)"
        )


def ensure_image(backend: ContainerBackend, image: str, say: Say) -> None:
    """Pull ``image`` when the engine lacks it (as the site's ``pull`` option allows)."""
    if has_image(backend, image):
        return
    if backend.config.pull == "never":
        raise BadRequest(f"image {image} is not on the engine and the site's pull is 'never'")
    say(f"pulling image {image}")
    try:
        backend.client.images.pull(image)
    except DockerException as exc:
        raise BadRequest(f"cannot pull image {image}: {exc}") from None
    if not has_image(backend, image):
        raise BadRequest(f"cannot pull image {image}: the engine does not have it")


def env_image(
    backend: ContainerBackend,
    base: str,
    requirements: list[str],
    say: Say,
    reader: Reader | None = None,
) -> str:
    """The image of ``requirements`` on ``base``, built now if the engine has none; its
    wheel files are read as ``reader`` (:func:`labgate.backends.wheels.read_wheels`)."""
    tag = env_tag(base, requirements, reader)
    with _locks_guard:
        lock = _locks.setdefault(tag, threading.Lock())
    with lock:
        if has_image(backend, tag):
            return tag
        ensure_image(backend, base, say)
        say(
            f"preparing image {tag} ({len(requirements)} requirement(s) on {base}); "
            "once per distinct list, reused after"
        )
        with (
            tempfile.TemporaryDirectory(prefix="labgate-task-env-") as context,
            tempfile.TemporaryDirectory(prefix="labgate-task-wheels-") as wheels,
        ):
            root = Path(context)  # the build's context: what wheels were read stays out
            _pip_install(root / "env", read_wheels(requirements, reader, Path(wheels)))
            (root / "Containerfile").write_text(
                f"FROM {base}\n"
                f"COPY env {ENV_PREFIX}\n"
                f"ENV PYTHONPATH={ENV_PREFIX} PATH={ENV_PREFIX}/bin:/usr/local/sbin:"
                "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
                f'LABEL {LABEL_TASK_ENV}="{tag.rsplit(":", 1)[1]}"\n'
            )
            _build(backend, root, tag)
        say(f"image {tag} ready")
    return tag


def _pip_install(target: Path, requirements: list[str]) -> None:
    """Install ``requirements`` (checked by the site's task executor: names with versions
    and wheels, ``labgate.agent.taskenv.requirement_refusal``) into ``target``.

    Wheels only (the site's pip runs as the agent: building from source runs the
    distribution's code), and wheel files or URLs without their dependencies (one
    may name a directory, which pip would build).
    """
    wheels = [r.strip() for r in requirements if r.strip().lower().endswith(".whl")]
    indexed = [r.strip() for r in requirements if r.strip() and r.strip() not in wheels]
    base = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--quiet",
        "--no-compile",
        "--target",
        str(target),
    ]
    steps = ([[*base, *indexed]] if indexed else []) + (
        [[*base, "--no-deps", *wheels]] if wheels else []
    )
    for step in steps:
        try:
            done = subprocess.run(
                step,
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT,
                check=False,
                cwd=target.parent,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BadRequest(f"preparing the Python environment failed: {exc}") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-FAILED_TAIL:])
            raise BadRequest(f"preparing the Python environment failed:\n{tail}")
    target.mkdir(exist_ok=True)  # an empty list still makes the directory COPY wants


def _build(backend: ContainerBackend, context: Path, tag: str) -> None:
    lines: list[str] = []
    try:
        for line in backend.client.api.build(
            path=str(context),
            dockerfile="Containerfile",
            tag=tag,
            rm=True,
            forcerm=True,
            decode=True,
            pull=False,
            network_mode="none",
        ):
            detail = line.get("errorDetail") or {}
            problem = str(line.get("error") or detail.get("message") or "").strip()
            if problem:
                raise BadRequest(f"building image {tag} failed: {problem}")
            text = str(line.get("stream") or "").rstrip()
            if text:
                lines.append(text)
    except DockerException as exc:
        raise BadRequest(f"building image {tag} failed: {exc}") from None
    if not has_image(backend, tag):
        tail = "\n".join(lines[-FAILED_TAIL:])
        raise BadRequest(f"building image {tag} failed: the engine made no image\n{tail}")


def container_name(backend: ContainerBackend, attempt_id: str) -> str:
    """The container of a task attempt."""
    return f"labgate-{backend.deployment}-task-{attempt_id}"


def argv(spec: dict[str, Any]) -> list[str]:
    """What the container runs: the command, or the callable through ``taskcall.py``."""
    if spec.get("callable"):
        return ["python3", TASKCALL_MOUNT, str(spec["callable"])]
    raw = spec.get("command")
    if isinstance(raw, str):
        return ["/bin/sh", "-c", raw]
    return [str(arg) for arg in raw or []]


def create_task(
    backend: ContainerBackend,
    spec: dict[str, Any],
    directory: Path,
    image: str,
    taskcall: Path,
) -> str:
    """Create and start the container of one attempt (``spec`` is its ``task.json``); its id."""
    api = backend.client.api
    attrs = api.inspect_image(image)
    image_user = str((attrs.get("Config") or {}).get("User") or "")
    user = security.run_user("", image_user, backend.config.default_user)
    id_range = _id_range(backend, str(spec.get("owner", "")), user)
    results = directory / "results"
    results.mkdir(parents=True, exist_ok=True)
    ids = security.numeric_ids(user)
    if ids is not None:
        # The container's user (in its id range) owns the results directory, only it.
        uid, gid = (id_range.host_id(i) for i in ids) if id_range is not None else ids
        os.chown(results, uid, gid)
    binds = {str(results): {"bind": RESULTS_MOUNT, "mode": "rw"}}
    if spec.get("callable"):
        binds[str(taskcall)] = {"bind": TASKCALL_MOUNT, "mode": "ro"}
    memory = int(spec.get("memory_mib") or 0)
    host: dict[str, Any] = {
        "binds": binds,
        "nano_cpus": security.nano_cpus(float(spec.get("cpu") or 1.0)),
        "cap_drop": backend.config.cap_drop,
        "cap_add": backend.config.cap_add or None,
        "security_opt": security.security_options(backend.config.security_opt),
        "pids_limit": backend.config.pids_limit,
        "init": backend.config.init,
    }
    if memory:
        host["mem_limit"] = host["memswap_limit"] = f"{memory}m"
    if backend.config.network:
        host["network_mode"] = backend.config.network
    host_config = api.create_host_config(**host)
    if id_range is not None:
        host_config["UsernsMode"] = id_range.userns_mode()
    env = {
        **{str(k): str(v) for k, v in (spec.get("env") or {}).items()},
        "HOME": RESULTS_MOUNT,
        "LABGATE_RUN_ID": str(spec.get("run_id", "")),
        "LABGATE_TASK": str(spec.get("task", "")),
        "LABGATE_ATTEMPT": str(spec.get("attempt", 1)),
        "LABGATE_RESULTS_DIR": RESULTS_MOUNT,
        "LABGATE_RESULT": f"{RESULTS_MOUNT}/.labgate-result.json",
        "LABGATE_TASK_ARGS": json.dumps(spec.get("args") or {}),
        "LABGATE_ATTEMPT_ID": str(spec["attempt_id"]),
        # Made reachable from a container by the executor (the busy-report relay).
        "LABGATE_API_URL": str(spec.get("api_url", "")),
        "LABGATE_TASK_TOKEN": str(spec.get("token", "")),
    }
    name = container_name(backend, str(spec["attempt_id"]))
    remove_task(backend, name)  # a leftover of a start cut short (a restart meanwhile)
    created = api.create_container(
        image,
        entrypoint=argv(spec),
        command=[],
        environment=env,
        labels={
            **backend.config.labels,
            "labgate.deployment": backend.deployment,
            "labgate.site": backend.site,
            "labgate.owner": str(spec.get("owner", "")),
            LABEL_TASK: str(spec["attempt_id"]),
        },
        volumes=[bind["bind"] for bind in binds.values()],
        host_config=host_config,
        name=name,
        user=user,
        working_dir=RESULTS_MOUNT,
        detach=True,
    )
    container_id = str(created["Id"])
    try:
        start_container(api, container_id)
    except BaseException:
        remove_task(backend, container_id)
        raise
    return container_id


def _id_range(backend: ContainerBackend, owner: str, user: str) -> security.IdRange | None:
    """The owner's id range (the one of their workspace volume), or None for the host's ids."""
    if not owner:
        raise BadRequest("a task attempt without an owner cannot run in a container")
    _volume, id_range = backend.ensure_volume(owner, user)
    return id_range


def inspect_task(backend: ContainerBackend, name: str) -> dict[str, Any] | None:
    """The container's engine state (``State``), None when it is gone."""
    try:
        attrs = inspect_settled(backend.client.api, name)
    except NotFound:
        return None
    return dict(attrs.get("State") or {})


#: Most of a task container's output kept at its site (bytes, its end).
MAX_TASK_LOG = 16 * 1024 * 1024


def task_logs(backend: ContainerBackend, name: str, limit: int = MAX_TASK_LOG) -> bytes:
    """The end of what the container wrote (stdout and stderr), at most ``limit`` bytes.

    Read as a stream and only its end kept: a task may write gigabytes, and the
    agent (on a local site, the portal's process) holds ``limit`` at most.
    """
    kept = bytearray()
    try:
        for chunk in backend.client.api.logs(
            name, stdout=True, stderr=True, stream=True, follow=False
        ):
            kept += chunk
            if len(kept) > 2 * limit:
                del kept[: len(kept) - limit]
    except NotFound:
        return b""
    return bytes(kept[-limit:])


def stop_task(backend: ContainerBackend, name: str, grace: float) -> None:
    """Stop the container (TERM, then KILL after ``grace`` seconds); it stays for its logs."""
    try:
        backend.client.api.stop(name, timeout=max(1, int(grace)))
    except NotFound:
        return


def remove_task(backend: ContainerBackend, ref: str) -> None:
    """Remove the container (gone already is fine)."""
    backend.remove_quietly(ref)
