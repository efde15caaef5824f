"""The one small base class every backend implements.

A backend drives one engine (local processes, a Docker Engine API) for one
site. The site agent owns it and calls it; the portal
never does. To write one, subclass :class:`Backend`, set ``name`` and
override every abstract method:

``start(spec)``
    Called once per launch. Start the tool and return a :class:`Started`
    with an opaque JSON-able ``state`` (pid, container id, job id...) and the
    ``endpoint`` (``http://host:port``) the router will proxy to. Raise
    :class:`~labgate.errors.InstanceStartError` with a clear reason when it
    cannot start. Must not wait for the tool to be healthy: the agent does.

``poll(state)``
    Called every few seconds, and once after a restart to re-attach from the
    saved state. Return a :class:`Status`: alive or not, and why not.

``stop(state, grace)``
    Stop the tool and everything it started: ask politely, then force after
    ``grace`` seconds. Must be idempotent: stopping a gone instance is fine.

``logs(state, lines)``
    The last ``lines`` lines of the tool's output, as text.

Optional hooks (the defaults say "not supported" or do nothing):

``snapshot(state, request)``
    Save the instance (commit its container image, archive its workspace)
    and return a :class:`SnapshotResult`. A launch whose
    ``LaunchSpec.snapshot`` is set starts from such a snapshot.
``delete_snapshot(ref)``
    Remove a snapshot's stored data; idempotent.
``reconcile(keep)``
    Remove what the engine runs for this site that labgate does not know
    (ids not in ``keep``); return the instance ids removed. The agent calls
    it at start-up and periodically.
``claim_support(tool)`` and ``claim(state, claim)``
    Hand a running warm-pool instance to a user: make their workspace the
    instance's (see :mod:`labgate.backends.claim`) and return the new state.
    ``claim_support`` says why not (a string) or None when it can.

The agent calls :meth:`Backend.attach` once with the site's name and a
progress callback; :meth:`Backend.progress_note` sends notes (image pull,
push) into an instance's event stream.

Backends are found through the ``labgate.backends`` entry-point group, so a
third-party package adds one the same way the built-ins are registered.
A subclass that leaves an abstract method unimplemented is refused when the
class is defined, not when it is first used.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from labgate.errors import LabgateError

if TYPE_CHECKING:
    from labgate.backends.claim import Claim, Claimed
    from labgate.config import Settings
    from labgate.tools.catalog import Tool

BACKEND_GROUP = "labgate.backends"

JSON = dict[str, Any]
#: ``progress(instance_id, message, data)``: a note for the instance's event stream.
Progress = Callable[[str, str, JSON], Awaitable[None]]


@dataclass(frozen=True)
class Resources:
    """CPU cores and memory bytes requested for an instance."""

    cpu: float = 1.0
    memory: int = 1024**3

    def as_json(self) -> JSON:
        """Plain JSON form, as stored on the instance."""
        return {"cpu": self.cpu, "memory": self.memory}


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the instance."""

    source: Path
    target: str
    read_only: bool = True
    #: The directory ``source`` must stay inside (a site's data root): backends open
    #: ``source`` below it with no symbolic link followed (labgate.backends.confine).
    root: Path | None = None

    @property
    def env_var(self) -> str:
        """``LABGATE_DATA_<NAME>``, telling the tool where the mount is (``/data/iris`` → IRIS)."""
        last = self.target.rstrip("/").rsplit("/", 1)[-1]
        name = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in last)
        return f"LABGATE_DATA_{name.upper()}"


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one instance."""

    instance_id: str
    owner: str
    tool: Tool
    base_url: str
    workspace: Path
    resources: Resources
    #: Secret shared by the instance and the router; the router sends it as
    #: ``Authorization: token <secret>`` so only proxied traffic gets in.
    secret: str
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    #: Start from this snapshot instead of the tool's own image or an empty workspace.
    snapshot: SnapshotRef | None = None
    #: The owner's user id: the process backend, run as root, derives the instance's uid from it.
    owner_id: int | None = None


@dataclass(frozen=True)
class SnapshotRef:
    """A stored snapshot, as a backend needs it to launch from it or delete it."""

    id: str
    #: ``image`` (a container image) or ``archive`` (a workspace archive).
    kind: str
    #: Image reference (``registry/repo:tag``) or archive file name in the snapshot store.
    reference: str
    digest: str = ""


@dataclass(frozen=True)
class SnapshotRequest:
    """What :meth:`Backend.snapshot` is asked to save."""

    snapshot_id: str
    instance_id: str
    owner: str
    tool: str


@dataclass(frozen=True)
class SnapshotResult:
    """What :meth:`Backend.snapshot` saved."""

    kind: str
    reference: str
    #: Manifest digest of a pushed image, image id of a local one, sha256 of an archive.
    digest: str
    size: int


class SnapshotUnsupported(LabgateError):
    """The backend of the instance's site cannot take snapshots."""

    status = 409
    default_code = "snapshot_unsupported"


@dataclass(frozen=True)
class Started:
    """What :meth:`Backend.start` returns."""

    state: JSON
    endpoint: str


@dataclass(frozen=True)
class Status:
    """What :meth:`Backend.poll` returns."""

    alive: bool
    exit_code: int | None = None
    detail: str = ""


class BackendNotFound(LabgateError):
    """No backend of that name is installed."""

    status = 400
    default_code = "unknown_backend"


class Backend(abc.ABC):
    """Drives one engine for one site. See the module docstring."""

    name: ClassVar[str] = ""
    #: Set ``abstract = True`` on an intermediate base class to skip the check.
    abstract: ClassVar[bool] = True

    def __init__(self, settings: Settings, options: JSON | None = None) -> None:
        self.settings = settings
        self.options = options or {}
        #: The site this backend serves and where progress notes go; see :meth:`attach`.
        self.site = ""
        self._progress: Progress | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("abstract", False):
            return
        missing = sorted(
            name
            for name in dir(cls)
            if getattr(getattr(cls, name, None), "__isabstractmethod__", False)
        )
        if missing:
            raise TypeError(f"backend {cls.__name__} must implement: {', '.join(missing)}")

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> Started:
        """Start the tool; return its state and endpoint without waiting for health."""

    @abc.abstractmethod
    async def poll(self, state: JSON) -> Status:
        """Whether the instance described by ``state`` is still alive."""

    @abc.abstractmethod
    async def stop(self, state: JSON, grace: float) -> None:
        """Stop the instance and everything it started; idempotent."""

    @abc.abstractmethod
    async def logs(self, state: JSON, lines: int = 100) -> str:
        """The last ``lines`` lines of the tool's output."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine connections when the site shuts down."""

    def attach(self, site: str, progress: Progress | None = None) -> None:
        """Called once by the site agent: the site's name and its progress callback."""
        self.site = site
        self._progress = progress

    async def progress_note(self, instance_id: str, message: str, **data: Any) -> None:
        """Send a note (``pulling image``, ``pushing``) to the instance's event stream."""
        if self._progress is not None:
            await self._progress(instance_id, message, data)

    async def snapshot(self, state: JSON, request: SnapshotRequest) -> SnapshotResult:
        """Save the running instance; by default snapshots are not supported."""
        raise SnapshotUnsupported(f"the {self.name} backend cannot take snapshots")

    async def delete_snapshot(self, ref: SnapshotRef) -> None:  # noqa: B027 - optional hook
        """Remove a snapshot's stored data; idempotent. By default there is none."""

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Remove instances the engine runs for this site whose ids are not in ``keep``."""
        return []

    def claim_support(self, tool: Tool) -> str | None:
        """Why a running instance of ``tool`` cannot take on a user here, or None if it can."""
        return f"the {self.name} backend cannot give a running instance another workspace"

    async def claim(self, state: JSON, claim: Claim) -> Claimed:
        """Give a running warm-pool instance the user's workspace; return its new state."""
        from labgate.backends.claim import ClaimError

        raise ClaimError(f"the {self.name} backend cannot give a running instance a workspace")


def available_backends() -> dict[str, str]:
    """Short names of installed backends mapped to their import paths."""
    return {ep.name: ep.value for ep in entry_points(group=BACKEND_GROUP)}


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``."""
    for ep in entry_points(group=BACKEND_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise BackendNotFound(f"entry point {name!r} is not a labgate backend")
            return cls
    known = ", ".join(sorted(available_backends())) or "none"
    raise BackendNotFound(f"unknown backend {name!r} (installed: {known})")
