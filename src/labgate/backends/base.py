"""The one small base class every backend implements.

A backend drives one engine (local processes, a Docker Engine API, Slurm,
Kubernetes) for one site. The site agent owns it and calls it; the portal
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

Backends are found through the ``labgate.backends`` entry-point group, so a
third-party package adds one the same way the built-ins are registered.
A subclass that leaves an abstract method unimplemented is refused when the
class is defined, not when it is first used.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from labgate.errors import LabgateError

if TYPE_CHECKING:
    from labgate.config import Settings
    from labgate.tools.catalog import Tool

BACKEND_GROUP = "labgate.backends"

JSON = dict[str, Any]


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
