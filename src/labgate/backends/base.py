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

A backend whose engine queues (a batch scheduler) may return from ``start``
with an empty ``endpoint``; the agent then calls ``place(state)``, which
waits (as long as the queue takes, sending progress notes) until the tool has
a place and returns the :class:`Started` with its endpoint, or raises
:class:`~labgate.errors.InstanceStartError` saying why it never will. Only
then does the health check's ``start_timeout`` begin.

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
``refresh_tools(tools)`` and ``tool_unavailable_here(tool)``
    What only the running engine can say about tools: the containers backend
    learns which of their images it holds, and a tool whose image it lacks
    and cannot pull is not available here, with the command that builds it.
    The agent refreshes it in the background; ``tool_unavailable_here``
    answers from what was learnt, at once. By default a backend has nothing
    to learn and answers as :meth:`Backend.unavailable_reason`.
``claim_support(tool)`` and ``claim(state, claim)``
    Hand a running warm-pool instance to a user: make their workspace the
    instance's (see :mod:`labgate.backends.claim`) and return the new state.
    ``claim_support`` says why not (a string) or None when it can.

What a backend declares (class attributes and class methods, read without
starting it; the portal, the catalog and ``labgate doctor`` use them):

``tool_section`` and ``tool_schema``
    The key of the backend's table in a tool file (``process``,
    ``container``) and the pydantic model that table must satisfy. The
    catalog keeps every table of a tool file raw and validates the one a
    backend reads with that backend's schema; :meth:`Backend.tool_spec`
    returns it validated. A tool without the table, or whose table fails the
    schema, cannot run on the backend (:meth:`Backend.unavailable_reason`
    says why).
``check_tool(spec)``
    Given the validated table, why the tool cannot run here (a missing
    executable, ...), or None. By default it can.
``options_schema``
    The pydantic model of a site's ``options`` for this backend.
    :meth:`Backend.parse_options` validates them with it when the backend is
    made for its site (``labgate serve`` refuses to start on a bad option,
    naming it) and ``self.site_options`` holds the result. By default a
    backend takes no options.
``snapshot_kind``
    What :meth:`Backend.snapshot` saves: ``image`` (a container image, which
    can be launched on any site of the backend when pushed to a registry),
    ``archive`` (a workspace archive, launched on the site that took it), or
    ``""`` when the backend takes no snapshots.
``doctor()``
    What ``labgate doctor`` should say about this site's engine: a list of
    :class:`Diagnosis` (ok, warn or fail, with the fix in words). By default
    there is nothing to say.

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
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from labgate.config import SiteSettings
from labgate.errors import InstanceStartError, LabgateError
from labgate.tools.catalog import describe_validation

# The plain data of a launch lives in labgate.wire; backends keep importing it from here.
from labgate.wire.launch import Mount as Mount
from labgate.wire.launch import Resources as Resources
from labgate.wire.launch import SnapshotRef as SnapshotRef
from labgate.wire.launch import SnapshotRequest as SnapshotRequest
from labgate.wire.launch import SnapshotResult as SnapshotResult
from labgate.wire.launch import mount_variables as mount_variables

if TYPE_CHECKING:
    from labgate.backends.claim import Claim, Claimed
    from labgate.config import Settings
    from labgate.tools.catalog import Tool

log = logging.getLogger(__name__)

BACKEND_GROUP = "labgate.backends"

JSON = dict[str, Any]
#: ``progress(instance_id, message, data)``: a note for the instance's event stream.
Progress = Callable[[str, str, JSON], Awaitable[None]]


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
    #: What the user chose among the site's allowed values (a Slurm partition, wall time...).
    options: dict[str, str] = field(default_factory=dict)
    #: A container image chosen at launch from the tool's allowlist; "" the tool's own.
    image: str = ""
    #: The tool's launch parameters, checked, by name: ``{param_<name>}`` in its templates.
    params: dict[str, str] = field(default_factory=dict)
    #: Only the site's agent connects to the instance (a tunneled site): a backend that can
    #: serves it on a Unix socket (the process backend, for a tool with a socket_command).
    on_socket: bool = False


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


class NoOptions(BaseModel):
    """The site options of a backend that takes none: any option is refused."""

    model_config = ConfigDict(extra="forbid")


class NoSection(BaseModel):
    """The tool section of a backend that declares none: any table passes."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class Diagnosis:
    """One thing :meth:`Backend.doctor` has to say about a site's engine."""

    level: str  # ok, warn, fail
    detail: str
    fix: str = ""
    #: Nothing more can be checked on this site (its engine does not answer).
    final: bool = False


class Backend(abc.ABC):
    """Drives one engine for one site. See the module docstring."""

    name: ClassVar[str] = ""
    #: Set ``abstract = True`` on an intermediate base class to skip the check.
    abstract: ClassVar[bool] = True
    #: The table of a tool file this backend reads (``[process]``); empty: none.
    tool_section: ClassVar[str] = ""
    #: The pydantic model of that table.
    tool_schema: ClassVar[type[BaseModel]] = NoSection
    #: The pydantic model of a site's ``options``.
    options_schema: ClassVar[type[BaseModel]] = NoOptions
    #: ``image``, ``archive`` or ``""`` (no snapshots): what :meth:`snapshot` saves.
    snapshot_kind: ClassVar[str] = ""
    #: The engine queues starts itself (a batch scheduler): the portal's start queue
    #: (labgate.scheduler.startqueue) then leaves its sites alone unless
    #: ``capacity.starts`` says otherwise.
    queues_starts: ClassVar[bool] = False

    def __init__(self, settings: Settings | SiteSettings, options: JSON | None = None) -> None:
        #: The site machine's settings (never the portal's secrets): paths, sandbox, registry.
        self.settings: SiteSettings = (
            settings if isinstance(settings, SiteSettings) else settings.site_settings()
        )
        self.options = options or {}
        #: ``options`` validated by :attr:`options_schema`.
        self.site_options = self.parse_options(self.options)
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

    # --- what the backend declares ------------------------------------------------

    @classmethod
    def parse_options(cls, options: JSON) -> BaseModel:
        """A site's ``options`` validated by :attr:`options_schema`; ValueError says why not."""
        try:
            return cls.options_schema.model_validate(options)
        except ValidationError as exc:
            # The cause stays: start-up names each refused option (options.<name>).
            raise ValueError(f"{cls.name} backend options: {describe_validation(exc)}") from exc

    @classmethod
    def tool_spec(cls, tool: Tool) -> BaseModel | None:
        """The tool's table for this backend, validated; None when it has none.

        Raises :class:`~labgate.tools.catalog.ToolSectionError` when the table
        does not satisfy :attr:`tool_schema`.
        """
        if not cls.tool_section:
            return None
        return tool.parsed(cls.tool_section, cls.tool_schema)

    @classmethod
    def launch_choices(cls, options: JSON) -> JSON:
        """What users may choose at launch on a site with these ``options``; by default nothing.

        ``{name: {"default": ..., "allowed": [...]}}``: shown to users with the
        site, and sent back in a launch's ``options``.
        """
        return {}

    @classmethod
    def check_tool(cls, spec: Any) -> str | None:
        """Why a tool with this validated table cannot run here, or None when it can."""
        return None

    @classmethod
    def unavailable_reason(cls, tool: Tool) -> str | None:
        """Why ``tool`` cannot run on this backend, or None when it can."""
        from labgate.tools.catalog import ToolSectionError

        if not cls.tool_section:
            return None
        try:
            spec = cls.tool_spec(tool)
        except ToolSectionError as exc:
            return str(exc)
        if spec is None:
            return f"no [{cls.tool_section}] section"
        return cls.check_tool(spec)

    async def refresh_tools(self, tools: Collection[Tool]) -> None:  # noqa: B027 - optional hook
        """Learn what only the engine can say about ``tools`` (which images it holds).

        Called by the agent in the background every few seconds; may block on
        the engine (keep it under a few seconds). By default nothing to learn.
        """

    def tool_unavailable_here(self, tool: Tool) -> str | None:
        """Why ``tool`` cannot run on this site now, or None: answered at once.

        :meth:`unavailable_reason`, plus what :meth:`refresh_tools` learnt.
        """
        return self.unavailable_reason(tool)

    def doctor(self) -> list[Diagnosis]:
        """What ``labgate doctor`` should say about this site's engine."""
        return []

    def doctor_tools(self, tools: list[Tool]) -> list[Diagnosis]:
        """More of ``labgate doctor``, once :meth:`doctor` found the engine answering.

        ``tools`` are the catalog's tools this site can run (e.g. are their
        images here?). By default there is nothing more to say.
        """
        return []

    # --- what the backend does ------------------------------------------------------

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

    async def place(self, state: JSON) -> Started:
        """Wait until a queued instance has a place; its endpoint. Only for queueing backends."""
        raise InstanceStartError(f"the {self.name} backend returned no endpoint")

    async def cpu_seconds(self, state: JSON) -> float | None:
        """CPU seconds the instance's processes used so far; None when the engine cannot say.

        Asked only when a start's budget runs out, to tell a tool still busy
        starting (it gets its ``start_grace``) from one that hangs.
        """
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine connections when the site shuts down."""

    async def health(self) -> str | None:
        """What keeps this site from working now (its engine does not answer), or None.

        Asked for ``/readyz`` and ``/metrics`` (at most every few seconds): keep it
        quick; by default a backend is healthy.
        """
        return None

    def workspaces_root(self) -> Path | None:
        """Where this site keeps users' workspaces, when not where its agent says; None: there.

        The Slurm backend keeps them on a filesystem its nodes share, which the
        jobs' owners can reach (the agent's ``<data_dir>`` is private to it).
        """
        return None

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

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """The stored snapshot, if it is there and complete; None when it is not.

        ``reference`` names a snapshot recorded as ready (is it still there?);
        without it, look where a save of ``request`` puts its result (did a
        save cut short by a restart finish?). Raises :class:`SnapshotUnsupported`
        when this backend cannot tell, any other error when it cannot ask now.
        """
        raise SnapshotUnsupported(f"the {self.name} backend cannot look for snapshots")

    async def collect_snapshots(self, known: Collection[str]) -> list[str]:
        """Remove stored snapshots whose ids are not in ``known``; what was removed.

        The garbage collection of snapshots deleted while their storage could
        not be reached. By default there is nothing to collect.
        """
        return []

    async def delete_snapshot(self, ref: SnapshotRef) -> None:  # noqa: B027 - optional hook
        """Remove a snapshot's stored data; idempotent. By default there is none."""

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Remove instances the engine runs for this site whose ids are not in ``keep``."""
        return []

    async def discard(self, instance_id: str, grace: float) -> None:  # noqa: B027 - optional
        """Remove whatever a start of ``instance_id`` left here, knowing only its id.

        For a start whose state was never recorded (its agent was killed
        mid-start): the instance is found by what carries its id (a process's
        marker variable, a container's label, a job's name). Idempotent;
        nothing there is fine. By default nothing is done: :meth:`reconcile`
        removes what no one knows.
        """

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


def installed_backends() -> dict[str, type[Backend]]:
    """Every installed backend class by name; one that fails to load is logged and left out."""
    found: dict[str, type[Backend]] = {}
    for name in sorted(available_backends()):
        try:
            found[name] = load_backend(name)
        except (ImportError, BackendNotFound) as exc:
            # An optional engine's library missing (docker) must not hide the others.
            log.warning("backend %r cannot be loaded: %s", name, exc)
    return found
