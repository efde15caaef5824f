"""The containers backend: each instance is a container, through the Docker Engine API.

It speaks the Docker Engine API with the ``docker`` SDK, so the engine is a
Docker daemon or Podman's compatible service (``podman system service``).
See ``docs/backends/containers.md`` for the operator's side.

- **Start**: the tool's image (or a snapshot's) is used when the engine has
  it, pulled otherwise, with progress notes in the instance's event stream.
  The container gets the CPU and memory of the launch, the owner's workspace
  volume at the tool's ``workspace`` path, labels naming labgate, this
  deployment, the site, the instance and the owner, and the tool's port
  published on a loopback address only (or, with the ``network`` option, no
  published port: the router reaches the container on that network). Its
  ``LABGATE_API_URL`` is one it can reach (``api_relay.py``).
- **Isolation** (``container_security.py``): no capabilities,
  ``no-new-privileges``, a non-root user, and with rootful Podman a range of
  host ids per user (kept on the workspace volume); mounts that would show
  the engine are refused.
- **Workspaces** are named volumes, one per user (``workspace_volume``
  option), created on first use and never removed by labgate: their files
  survive every stop, restart and deletion of instances.
- **Stop** asks the container to stop, then removes it (and its anonymous
  volumes); until then its logs stay readable.
- **Reconcile** removes containers labelled with this deployment and site
  whose instance labgate does not know or has finished.
- **Snapshots** commit the container (secrets cleared from the image), tag
  it, and push it to the ``snapshot_registry``.

Every SDK call blocks, so each runs in a worker thread. The saved state is
the container id and name, which is all poll, stop and logs need after a
restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labgate.backends import container_doctor
from labgate.backends import container_security as security
from labgate.backends.api_relay import ApiRelay, is_loopback_url
from labgate.backends.base import (
    JSON,
    Backend,
    Diagnosis,
    LaunchSpec,
    SnapshotRef,
    SnapshotRequest,
    SnapshotResult,
    SnapshotUnsupported,
    Started,
    Status,
)
from labgate.backends.confine import require_confined
from labgate.backends.deployment import deployment_id
from labgate.backends.image_presence import ImagePresence
from labgate.backends.images import (
    LOCAL_SNAPSHOTS,
    PullProgress,
    Registry,
    iterate_in_thread,
    stream_digest,
)
from labgate.backends.images import stream_error as stream_error_of
from labgate.errors import BackendError, ConfigError, InstanceStartError
from labgate.tools.catalog import ContainerSpec, Tool, template_values
from labgate.tools.ports import PortPicker

try:
    import docker  # type: ignore[import-untyped]
    from docker.errors import DockerException, ImageNotFound, NotFound  # type: ignore[import-untyped]
    from docker.types import DeviceRequest  # type: ignore[import-untyped]
    from docker.utils import parse_repository_tag  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - docker is in the containers extra
    raise ImportError(
        "the containers backend needs the docker package: pip install 'labgate[containers]'"
    ) from exc

if TYPE_CHECKING:
    from labgate.config import Settings, SiteSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a snapshot's tag looks like (its id, labgate.security.new_id).
SNAPSHOT_TAG_RE = re.compile(r"^[a-z0-9]{12}$")
INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LABEL_MANAGED = "labgate.managed"
LABEL_DEPLOYMENT = "labgate.deployment"
LABEL_SITE = "labgate.site"
LABEL_INSTANCE = "labgate.instance"
LABEL_OWNER = "labgate.owner"
LABEL_TOOL = "labgate.tool"
LABEL_SNAPSHOT = "labgate.snapshot"
#: Labels that make a container labgate's: cleared from committed snapshot images.
INSTANCE_LABELS = (
    LABEL_MANAGED,
    LABEL_DEPLOYMENT,
    LABEL_SITE,
    LABEL_INSTANCE,
    LABEL_OWNER,
    LABEL_TOOL,
)
_ENGINE_ERRORS = (DockerException, OSError)
REMOVE_ATTEMPTS = 6
#: Inspections of a container Podman trips over (see :func:`is_exit_race`).
EXIT_RACE_ATTEMPTS = 5


class ContainerOptions(BaseModel):
    """The ``options`` of a site with ``backend = "containers"``."""

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(
        "", description="Engine API URL, e.g. unix:///run/podman/podman.sock; empty: DOCKER_HOST."
    )
    timeout: float = Field(120.0, gt=0, description="Seconds an engine API call may take.")
    network: str = Field(
        "", description="Network to attach containers to; the router reaches them on it."
    )
    publish_host: str = Field(
        "127.0.0.1", description="Loopback address tool ports are published on (no network)."
    )
    workspace_volume: str = Field(
        "labgate-{deployment}-{user}", description="Name of a user's workspace volume."
    )
    deployment: str = Field(
        "", description="Label value that scopes this labgate's containers; empty: generated."
    )
    pull: Literal["missing", "always", "never"] = Field(
        "missing", description="When to pull images: missing, always or never."
    )
    gpu: bool = Field(False, description="The engine can hand GPUs to containers.")
    cap_drop: list[str] = Field(
        default_factory=lambda: ["ALL"], description='Capabilities taken; must hold "ALL".'
    )
    cap_add: list[str] = Field(
        default_factory=list, description="Capabilities given back (a short allowed list)."
    )
    security_opt: list[str] = Field(
        default_factory=lambda: ["no-new-privileges"],
        description="Engine security options; no-new-privileges is always among them.",
    )
    pids_limit: int = Field(1024, ge=1, description="Most processes per container.")
    default_user: str = Field(
        "1000:1000", description="uid:gid when neither the tool nor the image names a non-root one."
    )
    userns: str = Field(
        "auto", description="User namespace: auto (a range per user), host, or 0:<host id>:<n>."
    )
    userns_range: str = Field(
        "2147483647:2147483648", description="Host ids userns=auto hands out (/etc/subuid)."
    )
    userns_size: int = Field(65536, ge=1, description="Ids in one user's range (userns=auto).")
    read_only: bool = Field(False, description="Read-only root filesystem (tmpfs /tmp).")
    init: bool = Field(True, description="Run an init (tini, catatonit) as the container's pid 1.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra container labels.")
    task_image: str = Field(
        "",
        description="Base image of batch tasks that list Python requirements but name no "
        "image; its Python must be the site's version.",
    )
    api_url: str = Field(
        "",
        description="LABGATE_API_URL for containers (busy reports); empty: the portal's, "
        "through a relay on the engine's network gateway when that is on loopback.",
    )

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"api_url must be an http:// or https:// URL, not {value!r}")
        return value.rstrip("/")

    @field_validator("publish_host")
    @classmethod
    def _loopback_only(cls, value: str) -> str:
        try:
            loopback = ipaddress.ip_address(value).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"publish_host must be a loopback address, not {value!r}: tools are reached "
                "through the router only (use the network option for a private network)"
            )
        return value

    _cap_drop = field_validator("cap_drop")(security.check_cap_drop)
    _cap_add = field_validator("cap_add")(security.check_cap_add)
    _security_opt = field_validator("security_opt")(security.check_security_opt)
    _default_user = field_validator("default_user")(security.check_user)
    _userns = field_validator("userns")(security.check_userns)
    _userns_range = field_validator("userns_range")(security.check_range)

    @field_validator("workspace_volume")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        names = set(re.findall(r"{([^{}]*)}", value))
        if not names <= {"user", "deployment", "site"}:
            raise ValueError("workspace_volume may use {user}, {deployment} and {site}")
        if "{user}" not in value:
            raise ValueError("workspace_volume must contain {user}: one volume per user")
        return value


def explain(exc: BaseException) -> str:
    """The engine's own words for an SDK error."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip() or exc.__class__.__name__


def describe_exit(state: dict[str, Any]) -> str:
    """Human words for a stopped container's ``State``."""
    if state.get("OOMKilled"):
        return "was killed: it used more than its memory limit"
    code = state.get("ExitCode")
    error = state.get("Error")
    text = f"exited with code {code}" if code is not None else "stopped"
    return f"{text} ({error})" if error else text


def is_gone(exc: BaseException) -> bool:
    """Whether an SDK error says the container does not exist.

    Podman answers 500 "no such container" instead of 404 when the container
    goes while it is being asked about.
    """
    return isinstance(exc, NotFound) or "no such container" in explain(exc).lower()


def is_exit_race(exc: BaseException) -> bool:
    """Whether an engine error is Podman reading the cgroup of a process that just exited.

    Podman before 4.4 fails a ``start`` or an ``inspect`` with "read
    /proc/PID/cgroup: no such process" when the container's process exits at
    that moment (podman#16383): the container did run, and asking again shows
    it exited, with its code and output.
    """
    return "/cgroup: no such process" in explain(exc)


def start_container(api: Any, container_id: str) -> None:
    """Start the container; one that exits while Podman starts it counts as started.

    What it did is then read as for any container that exits at once (see
    :func:`is_exit_race`).
    """
    try:
        api.start(container_id)
    except DockerException as exc:
        if not is_exit_race(exc):
            raise
        log.info("container %s exited while the engine started it: %s", container_id, explain(exc))


def inspect_settled(api: Any, container_id: str) -> dict[str, Any]:
    """The container's ``inspect``, asked again while Podman trips over its exit."""
    for attempt in range(EXIT_RACE_ATTEMPTS - 1):
        try:
            return cast("dict[str, Any]", api.inspect_container(container_id))
        except DockerException as exc:
            if not is_exit_race(exc):
                raise
        time.sleep(0.1 * (attempt + 1))
    return cast("dict[str, Any]", api.inspect_container(container_id))


def url_host(host: str) -> str:
    """A host for a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


class ContainerBackend(Backend):
    """Runs each instance as a container on a Docker or Podman engine."""

    name = "containers"
    abstract = False
    tool_section = "container"
    tool_schema = ContainerSpec
    options_schema = ContainerOptions
    snapshot_kind = "image"

    def __init__(self, settings: Settings | SiteSettings, options: JSON | None = None) -> None:
        super().__init__(settings, options)
        self.config = cast(ContainerOptions, self.site_options)
        self.deployment = self.config.deployment or deployment_id(settings.data_dir)
        self.registry = Registry.parse(
            settings.snapshot_registry,
            settings.snapshot_registry_username,
            settings.snapshot_registry_password.get_secret_value(),
        )
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._relay: ApiRelay | None = None
        self._relay_lock = asyncio.Lock()
        self._engine_kind: str | None = None
        # One user's id range is chosen once, when their workspace volume is made.
        self._volume_lock = threading.Lock()
        #: Host ports for tools' published ports (no ``network``).
        self._ports = PortPicker(self.config.publish_host)
        #: Which tools' images the engine holds (refresh_tools), by image.
        self.images = ImagePresence(self.config.pull)

    # --- the engine --------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The docker SDK client, created on first use.

        Only worker threads touch it (creating it asks the engine its API
        version): every engine call goes through :meth:`_engine`.
        """
        with self._client_lock:
            if self._client is None:
                kwargs: dict[str, Any] = {"timeout": int(self.config.timeout)}
                if self.config.base_url:
                    self._client = docker.DockerClient(
                        base_url=self.config.base_url, version="auto", **kwargs
                    )
                else:
                    self._client = docker.from_env(version="auto", **kwargs)
            return self._client

    async def _engine(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in a worker thread."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    @property
    def engine_address(self) -> str:
        """Where the engine is asked: the site's ``base_url``, else ``DOCKER_HOST``'s value."""
        import os

        return (
            self.config.base_url
            or os.environ.get("DOCKER_HOST")
            or ("unix:///var/run/docker.sock (the default: no base_url, no DOCKER_HOST)")
        )

    def container_name(self, instance_id: str) -> str:
        """The container of an instance: ``labgate-<deployment>-<instance id>``."""
        return f"labgate-{self.deployment}-{instance_id}"

    def volume_name(self, owner: str) -> str:
        """The workspace volume of a user."""
        return self.config.workspace_volume.format(
            user=owner, deployment=self.deployment, site=self.site or "site"
        )

    def labels(self, spec: LaunchSpec) -> dict[str, str]:
        """Labels that identify an instance's container as labgate's."""
        return {
            **self.config.labels,
            LABEL_MANAGED: "true",
            LABEL_DEPLOYMENT: self.deployment,
            LABEL_SITE: self.site,
            LABEL_INSTANCE: spec.instance_id,
            LABEL_OWNER: spec.owner,
            LABEL_TOOL: spec.tool.name,
        }

    # --- start -------------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> Started:
        """Make sure the image is there, then create and start the container."""
        if not INSTANCE_ID_RE.match(spec.instance_id):
            raise InstanceStartError(f"invalid instance id {spec.instance_id!r}")
        reason = self.unavailable_reason(spec.tool)
        tool = self._section(spec) if reason is None else None
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name!r} cannot run here: {reason}")
        if tool.gpus and not self.config.gpu:
            raise InstanceStartError(
                f"tool {spec.tool.name!r} asks for GPUs, but this site has none (option gpu)"
            )
        image = tool.image
        if spec.image:
            # The portal checked the user's groups; a site takes only images the tool lists.
            if spec.image not in tool.allowed_images():
                raise InstanceStartError(
                    f"image {spec.image} is not among the images tool {spec.tool.name!r} allows"
                )
            image = spec.image
        if spec.snapshot is not None:
            if spec.snapshot.kind != "image":
                raise InstanceStartError(
                    f"snapshot {spec.snapshot.id} is a workspace archive, not an image"
                )
            image = spec.snapshot.reference
        values = template_values(
            port=tool.port,
            base_url=spec.base_url,
            workspace=tool.workspace,
            instance_id=spec.instance_id,
            user=spec.owner,
            instance_token=spec.secret,
            params=spec.params,
        )
        try:
            command, args, tool_env = tool.render(values)
        except (KeyError, IndexError, ValueError) as exc:
            raise InstanceStartError(
                f"bad container template of {spec.tool.name!r}: {exc}"
            ) from exc
        env = {**tool_env, **spec.env}
        # Set last so neither the tool file nor the launch can forge them.
        env.update(
            {
                "LABGATE_INSTANCE_ID": spec.instance_id,
                "LABGATE_INSTANCE_TOKEN": spec.secret,
                "LABGATE_BASE_URL": spec.base_url,
                "LABGATE_USER": spec.owner,
            }
        )
        try:
            await self._reach_labgate(spec.instance_id, env)
            await self._ensure_image(spec.instance_id, image)
            return await self._engine(self._run, spec, image, command, args, env)
        except _ENGINE_ERRORS as exc:
            raise InstanceStartError(
                f"container engine at {self.engine_address}: {explain(exc)}"
            ) from exc

    async def reach_labgate(self, ref: str, env: dict[str, str]) -> None:
        """Make ``env``'s LABGATE_API_URL one a container reaches (see :meth:`_reach_labgate`)."""
        await self._reach_labgate(ref, env)

    async def _reach_labgate(self, instance_id: str, env: dict[str, str]) -> None:
        """Give the container a LABGATE_API_URL it can reach (see labgate.backends.api_relay)."""
        portal_url = env.get("LABGATE_API_URL", "")
        if self.config.api_url:
            env["LABGATE_API_URL"] = self.config.api_url
            return
        if not portal_url or not is_loopback_url(portal_url):
            return
        async with self._relay_lock:
            relay = self._relay
            if relay is None or relay.upstream != portal_url.rstrip("/"):
                try:
                    gateway = await self._engine(self._gateway)
                    relay = ApiRelay(gateway, portal_url)
                    await relay.start()
                except (*_ENGINE_ERRORS, LookupError) as exc:
                    problem = explain(exc) if isinstance(exc, _ENGINE_ERRORS) else str(exc)
                    log.warning("no busy-report relay for containers: %s", problem)
                    await self.progress_note(
                        instance_id,
                        f"busy reports cannot reach labgate from this container ({problem}); "
                        "set the site's api_url",
                    )
                    return
                if self._relay is not None:
                    await self._relay.close()
                self._relay = relay
        env["LABGATE_API_URL"] = relay.url

    def _gateway(self) -> str:
        """The host's address on the containers' network (its IPv4 gateway)."""
        network = self.config.network or (
            "podman" if self.engine_kind().startswith("podman") else "bridge"
        )
        attrs = self.client.api.inspect_network(network)
        for config in (attrs.get("IPAM") or {}).get("Config") or []:
            gateway = str(config.get("Gateway") or "")
            if gateway and ":" not in gateway:
                return gateway
        raise LookupError(f"the network {network!r} has no IPv4 gateway")

    async def _ensure_image(self, instance_id: str, image: str) -> None:
        present = await self._engine(self._has_image, image)
        self.images.learn(image, present)
        if present and self.config.pull != "always":
            return
        if not present and self.config.pull == "never":
            raise InstanceStartError(f"image {image} is not on the engine and pull is 'never'")
        await self._pull(instance_id, image)

    def has_image(self, image: str) -> bool:
        """Whether the engine holds ``image`` (blocking)."""
        return self._has_image(image)

    async def refresh_tools(self, tools: Collection[Tool]) -> None:
        """Ask the engine which of the tools' images it holds."""
        images = [section.image for tool in tools if (section := self._section_or_none(tool))]
        await self._engine(self.images.refresh, images, self._has_image)

    def tool_unavailable_here(self, tool: Tool) -> str | None:
        """The tool's table, then its image: one this site cannot get is a reason."""
        reason = self.unavailable_reason(tool)
        section = self._section_or_none(tool) if reason is None else None
        if section is None:
            return reason
        return self.images.missing_reason(self.site, tool.name, section.image, bool(section.build))

    def _section_or_none(self, tool: Tool) -> ContainerSpec | None:
        try:
            return self.tool_section_of(tool)
        except ValueError:
            return None  # unavailable_reason says why

    def tool_section_of(self, tool: Tool) -> ContainerSpec | None:
        """A tool's ``[container]`` table, validated (None without one)."""
        return tool.parsed(self.tool_section, ContainerSpec)

    def doctor_tools(self, tools: list[Tool]) -> list[Diagnosis]:
        """The snapshot registry, the tools' images, and a throwaway container."""
        found = container_doctor.registry_checks(self)
        images, present = container_doctor.image_checks(self, tools)
        found += images
        if present:
            found.append(container_doctor.runtime_check(self, present))
        elif tools:
            found.append(
                Diagnosis(
                    "warn",
                    "no tool's image is on the engine, so no container was tried",
                    "build or pull one, then run `labgate doctor` again",
                )
            )
        return found

    def _has_image(self, image: str) -> bool:
        try:
            self.client.api.inspect_image(image)
        except (NotFound, ImageNotFound):
            return False
        return True

    async def _pull(self, instance_id: str, image: str) -> None:
        repository, tag = parse_repository_tag(image)
        auth = self.registry.auth_config() if self.registry and self.registry.holds(image) else None
        progress = PullProgress("pulling", image)
        await self.progress_note(instance_id, f"pulling image {image}", image=image)

        def lines() -> Any:
            return self.client.api.pull(
                repository, tag=tag or "latest", stream=True, decode=True, auth_config=auth
            )

        try:
            async for line in iterate_in_thread(lines):
                problem = stream_error_of(line)
                if problem is not None:
                    raise InstanceStartError(f"cannot pull image {image}: {problem}")
                note = progress.update(line)
                if note is not None:
                    await self.progress_note(instance_id, note, image=image, **progress.summary())
        except _ENGINE_ERRORS as exc:
            raise InstanceStartError(f"cannot pull image {image}: {explain(exc)}") from exc
        if not await self._engine(self._has_image, image):
            raise InstanceStartError(f"cannot pull image {image}: the engine does not have it")
        self.images.learn(image, True)
        await self.progress_note(instance_id, f"pulled image {image}", image=image)

    # --- isolation: engine kind, user namespace, user ---------------------------------

    def engine_kind(self) -> str:
        """``podman``, ``podman-rootless``, ``docker`` or ``docker-userns``, asked once."""
        if self._engine_kind is None:
            api = self.client.api
            self._engine_kind = security.engine_kind(api.version(), api.info())
        return self._engine_kind

    def _section(self, spec: LaunchSpec) -> ContainerSpec | None:
        """The launched tool's ``[container]`` table, validated."""
        return spec.tool.parsed(self.tool_section, ContainerSpec)

    async def health(self) -> str | None:
        """None while the engine answers a ping; otherwise which engine, and why."""
        try:
            await self._engine(self._ping)
        except Exception as exc:
            return f"the container engine at {self.engine_address} does not answer: {explain(exc)}"
        return None

    def _ping(self) -> None:
        self.client.api.ping()

    def doctor(self) -> list[Diagnosis]:
        """Whether the engine answers, and whether containers get user namespaces."""
        try:
            self.client.ping()  # making the client already asks the engine its API version
        except Exception as exc:
            silent = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
            return [
                Diagnosis(
                    "fail",
                    f"the {self.name} engine does not answer: {silent}",
                    "start the engine (e.g. `podman system service`) or fix the site's base_url",
                    final=True,
                )
            ]
        problem: str | None
        try:
            problem = self.userns_problem()
        except Exception as exc:  # the engine answered ping but not info
            problem = f"cannot ask the engine: {exc}".splitlines()[0]
        if problem is None:
            return []
        return [
            Diagnosis(
                "warn",
                problem,
                "use rootful Podman with userns = 'auto' "
                "(docs/backends/containers.md#user-namespaces)",
            )
        ]

    def userns_problem(self) -> str | None:
        """Why containers here share the host's ids (uid 0 inside is root outside), or None."""
        if self.config.userns == "host":
            return "userns = 'host': uid 0 in a container is root on the host"
        kind = self.engine_kind()
        if kind == "docker":
            return (
                "Docker takes no per-container user namespace: uid 0 in a container is root "
                "on the host unless the daemon remaps (userns-remap)"
            )
        return None

    def _userns_pool(self) -> security.IdRange:
        pool = security.IdRange.parse(self.config.userns_range)
        if pool is None:  # checked with the options, so only a programming error gets here
            raise ConfigError(f"userns_range {self.config.userns_range!r} is not a uid range")
        return pool

    def _site_mapping(self) -> security.IdRange | None:
        """The id range of every container when userns names one; None for auto and host."""
        match = security.MAPPING_RE.match(self.config.userns)
        return security.IdRange(int(match.group(1)), int(match.group(2))) if match else None

    def _wants_ranges(self) -> bool:
        """Whether labgate maps ids itself: Podman as root, userns not 'host'."""
        if self.config.userns == "host":
            return False
        kind = self.engine_kind()
        if kind == "podman":
            return True
        if self._site_mapping() is not None:
            raise InstanceStartError(
                f"userns {self.config.userns!r} needs rootful Podman; this engine is {kind}"
            )
        return False  # rootless Podman and remapping Docker map already; plain Docker cannot

    def _taken_ranges(self) -> list[security.IdRange]:
        volumes = self.client.api.volumes(filters={"label": security.LABEL_USERNS}) or {}
        found = []
        for volume in volumes.get("Volumes") or []:
            value = (volume.get("Labels") or {}).get(security.LABEL_USERNS, "")
            parsed = security.IdRange.parse(value)
            if parsed is not None:
                found.append(parsed)
        return found

    def ensure_volume(self, owner: str, user: str) -> tuple[str, security.IdRange | None]:
        """The owner's workspace volume and its id range, made now if missing (blocking)."""
        return self._ensure_volume(owner, user)

    def _ensure_volume(self, owner: str, user: str) -> tuple[str, security.IdRange | None]:
        """The owner's workspace volume and its id range (None: the host's ids)."""
        name = self.volume_name(owner)
        ranges = self._wants_ranges()
        with self._volume_lock:
            try:
                attrs = self.client.api.inspect_volume(name)
            except NotFound:
                return name, self._create_volume(name, owner, user, ranges)
        mapping = self._site_mapping()
        if not ranges or mapping is not None:
            return name, mapping if ranges else None
        label = (attrs.get("Labels") or {}).get(security.LABEL_USERNS, "")
        known = security.IdRange.parse(label)
        if known is None:
            # Made before labgate mapped ids (or with userns = 'host'): its files belong to
            # the host's ids, which a new range would hide. docs: moving such a volume.
            log.warning("workspace volume %s has no id range: its containers use host ids", name)
        return name, known

    def _create_volume(
        self, name: str, owner: str, user: str, ranges: bool
    ) -> security.IdRange | None:
        labels = {
            LABEL_MANAGED: "true",
            LABEL_DEPLOYMENT: self.deployment,
            LABEL_OWNER: owner,
            "labgate.workspace": "true",
        }
        id_range = None
        if ranges:
            id_range = self._site_mapping() or security.allocate(
                self._userns_pool(), self.config.userns_size, self._taken_ranges()
            )
            labels[security.LABEL_USERNS] = id_range.label()
        options = None
        ids = security.numeric_ids(user)
        if ids is not None and self.engine_kind().startswith("podman"):
            # The mount point belongs to the user the container runs as (Podman's local
            # driver: o=uid,gid); the image's files are still copied in on first use.
            uid, gid = (id_range.host_id(i) for i in ids) if id_range else ids
            options = {"o": f"uid={uid},gid={gid}"}
        self.client.api.create_volume(name, labels=labels, driver_opts=options)
        return id_range

    def _run_user(self, tool_user: str, image: str) -> str:
        attrs = self.client.api.inspect_image(image)
        image_user = str((attrs.get("Config") or {}).get("User") or "")
        return security.run_user(tool_user, image_user, self.config.default_user)

    def remove_quietly(self, ref: str) -> None:
        """Remove a container and its anonymous volumes; one that is gone already is fine."""
        # Podman 4.3 with a user namespace: removing a container that has just stopped
        # can race its own clean-up and fail "shm: device or resource busy"; a moment
        # later the container is gone or removable.
        for attempt in range(REMOVE_ATTEMPTS):
            try:
                self.client.api.remove_container(ref, v=True, force=True)
                return
            except DockerException as exc:
                if is_gone(exc):
                    return
                if "resource busy" not in explain(exc) or attempt == REMOVE_ATTEMPTS - 1:
                    raise
            time.sleep(0.2 * (attempt + 1))

    def _run(
        self,
        spec: LaunchSpec,
        image: str,
        command: list[str] | None,
        args: list[str] | None,
        env: dict[str, str],
    ) -> Started:
        tool = self._section(spec)
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name} has no container image")
        name = self.container_name(spec.instance_id)
        for mount in spec.mounts:
            exposed = security.engine_mount(mount.source, self.config.base_url)
            if exposed is not None:
                raise InstanceStartError(
                    f"mount {mount.target} would show the container engine ({exposed})"
                )
        user = self._run_user(tool.user, image)
        volume, id_range = self._ensure_volume(spec.owner, user)
        # A stale container of an earlier attempt at this launch (labgate restarted mid-start).
        self.remove_quietly(name)
        volumes = {volume: {"bind": tool.workspace, "mode": "rw"}}
        # The engine binds by name when the container starts: check each source just before.
        require_confined(spec.mounts)
        for mount in spec.mounts:
            mode = "ro" if mount.read_only else "rw"
            volumes[str(mount.source)] = {"bind": mount.target, "mode": mode}
        container_id = self._create(spec, image, command, args, env, volumes, user, id_range)
        try:
            start_container(self.client.api, container_id)
            endpoint = self._endpoint(container_id, tool.port)
        except BaseException:
            self.remove_quietly(container_id)
            raise
        state: JSON = {
            "container_id": container_id,
            "name": name,
            "image": image,
            "volume": volume,
            "instance_id": spec.instance_id,
            # Names only: a snapshot clears them from the committed image.
            "env_keys": sorted(env),
        }
        return Started(state=state, endpoint=endpoint)

    def _create(
        self,
        spec: LaunchSpec,
        image: str,
        command: list[str] | None,
        args: list[str] | None,
        env: dict[str, str],
        volumes: dict[str, dict[str, str]],
        user: str,
        id_range: security.IdRange | None,
    ) -> str:
        """Create the container (not started); its id.

        The low-level API, because the SDK's ``userns_mode`` accepts only "host".
        """
        tool = self._section(spec)
        if tool is None:
            raise InstanceStartError(f"tool {spec.tool.name} has no container image")
        api = self.client.api
        memory = spec.resources.memory
        host: dict[str, Any] = {
            "binds": volumes,
            "nano_cpus": security.nano_cpus(spec.resources.cpu),
            "mem_limit": memory,
            "memswap_limit": memory,  # no swap beyond the memory limit
            "cap_drop": self.config.cap_drop,
            "cap_add": self.config.cap_add or None,
            "security_opt": security.security_options(self.config.security_opt),
            "pids_limit": self.config.pids_limit,
            "init": self.config.init,
        }
        if self.config.read_only:
            host["read_only"] = True
            if not self.engine_kind().startswith("podman"):  # Podman adds these tmpfs itself
                tmpfs = "rw,nosuid,nodev"
                host["tmpfs"] = {"/tmp": tmpfs, "/run": tmpfs}  # noqa: S108 - inside the container
        if tool.gpus:
            host["device_requests"] = [DeviceRequest(count=tool.gpus, capabilities=[["gpu"]])]
        create: dict[str, Any] = {}
        if self.config.network:
            host["network_mode"] = self.config.network
            create["networking_config"] = api.create_networking_config(
                {self.config.network: api.create_endpoint_config()}
            )
        else:
            # A host port labgate picks below the kernel's ephemeral range, not one the engine
            # picks in it: Podman publishes with DNAT rules on local traffic, and a rule
            # outliving its container catches connections to that port, such as those of a
            # program the kernel gave the port since.
            published = (self.config.publish_host, self._ports.pick())
            host["port_bindings"] = {f"{tool.port}/tcp": published}
            create["ports"] = [tool.port]
        host_config = api.create_host_config(**host)
        if id_range is not None:
            host_config["UsernsMode"] = id_range.userns_mode()
        created = api.create_container(
            image,
            command=args,
            entrypoint=command,
            environment=env,
            labels=self.labels(spec),
            volumes=[bind["bind"] for bind in volumes.values()],
            host_config=host_config,
            name=self.container_name(spec.instance_id),
            user=user,
            working_dir=tool.working_dir or None,
            detach=True,
            **create,
        )
        return str(created["Id"])

    def _endpoint(self, container_id: str, port: int) -> str:
        attrs = inspect_settled(self.client.api, container_id)
        if not attrs["State"].get("Running"):
            tail = self._logs(container_id, 20)
            raise InstanceStartError(
                f"the container {describe_exit(attrs['State'])} at once; last output:\n{tail}"
            )
        networks = attrs["NetworkSettings"].get("Networks") or {}
        if self.config.network:
            address = (networks.get(self.config.network) or {}).get("IPAddress")
            if not address:
                raise InstanceStartError(f"the container has no address on {self.config.network}")
            return f"http://{url_host(address)}:{port}"
        bindings = (attrs["NetworkSettings"].get("Ports") or {}).get(f"{port}/tcp") or []
        if not bindings:
            raise InstanceStartError(f"the engine did not publish port {port}")
        host = bindings[0].get("HostIp") or self.config.publish_host
        if host in ("0.0.0.0", "::"):  # never expected: we ask for loopback
            host = self.config.publish_host
        return f"http://{url_host(host)}:{bindings[0]['HostPort']}"

    # --- poll, stop, logs ----------------------------------------------------------

    async def poll(self, state: JSON) -> Status:
        """Alive while the container runs; gone or exited otherwise.

        When the engine cannot be asked the instance counts as alive (and a
        warning is logged): an engine hiccup must not turn instances ``lost``.
        """
        try:
            attrs = await self._engine(self._inspect, state["container_id"])
        except _ENGINE_ERRORS as exc:
            if is_gone(exc):
                return Status(alive=False, detail="container vanished")
            log.warning("cannot poll container %s: %s", state.get("name"), explain(exc))
            return Status(alive=True, detail=f"engine unreachable: {explain(exc)}")
        engine_state = attrs.get("State") or {}
        if engine_state.get("Running"):
            return Status(alive=True)
        code = engine_state.get("ExitCode")
        return Status(alive=False, exit_code=code, detail=describe_exit(engine_state))

    def _inspect(self, container_id: str) -> dict[str, Any]:
        attrs: dict[str, Any] = self.client.api.inspect_container(container_id)
        return attrs

    async def stop(self, state: JSON, grace: float) -> None:
        """Stop the container (TERM, KILL after ``grace`` seconds), then remove it."""
        await self._engine(self._stop, state["container_id"], grace)

    def _stop(self, container_id: str, grace: float) -> None:
        try:
            self.client.api.stop(container_id, timeout=max(0, math.ceil(grace)))
        except DockerException as exc:
            if is_gone(exc):
                return
            # E.g. already stopping: the forced removal below ends it.
            log.info("stopping container %s: %s", container_id[:12], explain(exc))
        self.remove_quietly(container_id)

    async def logs(self, state: JSON, lines: int = 100) -> str:
        """The last ``lines`` lines the container wrote (stdout and stderr)."""
        try:
            return str(await self._engine(self._logs, state["container_id"], lines))
        except _ENGINE_ERRORS as exc:
            return f"(logs unavailable: {explain(exc)})"

    def _logs(self, container_id: str, lines: int) -> str:
        if lines <= 0:
            return ""
        try:
            data = self.client.api.logs(container_id, stdout=True, stderr=True, tail=lines)
        except DockerException as exc:
            if is_gone(exc):
                return ""
            raise
        return bytes(data).decode("utf-8", errors="replace")

    async def close(self) -> None:
        """Close the engine connection pool and the busy-report relay."""
        if self._relay is not None:
            relay, self._relay = self._relay, None
            await relay.close()
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    # --- reconcile -----------------------------------------------------------------

    async def reconcile(self, keep: Collection[str]) -> list[str]:
        """Remove this site's containers whose instance is not in ``keep``."""
        return list(await self._engine(self._reconcile, set(keep)))

    async def discard(self, instance_id: str, grace: float) -> None:
        """Remove this site's container labelled with the instance (no id was recorded)."""
        await self._engine(self._discard, instance_id)

    def _discard(self, instance_id: str) -> None:
        found = self.client.api.containers(
            all=True, filters={"label": f"{LABEL_INSTANCE}={instance_id}"}
        )
        for item in found:
            labels = item.get("Labels") or {}
            ours = labels.get(LABEL_MANAGED) == "true" and labels.get(LABEL_SITE) == self.site
            if ours and labels.get(LABEL_DEPLOYMENT) == self.deployment:
                log.info("removing container %s of instance %s", item["Id"][:12], instance_id)
                self.remove_quietly(item["Id"])

    def _reconcile(self, keep: set[str]) -> list[str]:
        # One label in the filter (engines differ on how several combine), the rest here.
        found = self.client.api.containers(
            all=True, filters={"label": f"{LABEL_DEPLOYMENT}={self.deployment}"}
        )
        removed = []
        for item in found:
            labels = item.get("Labels") or {}
            if labels.get(LABEL_MANAGED) != "true" or labels.get(LABEL_SITE) != self.site:
                continue
            instance_id = labels.get(LABEL_INSTANCE, "")
            if instance_id in keep:
                continue
            log.info("removing orphan container %s (instance %s)", item["Id"][:12], instance_id)
            try:
                self.remove_quietly(item["Id"])
            except DockerException as exc:
                log.warning("cannot remove orphan container %s: %s", item["Id"][:12], explain(exc))
                continue
            removed.append(instance_id)
        return removed

    # --- snapshots -----------------------------------------------------------------

    def snapshot_repository(self, request: SnapshotRequest) -> str:
        """``<registry>/<owner>/<tool>``, or a local-only name without a registry."""
        if self.registry is None:
            return f"{LOCAL_SNAPSHOTS}/{request.owner}/{request.tool}"
        return self.registry.repository(request.owner, request.tool)

    async def snapshot(self, state: JSON, request: SnapshotRequest) -> SnapshotResult:
        """Commit the container, tag it ``<repository>:<snapshot id>`` and push it."""
        iid, sid = request.instance_id, request.snapshot_id
        repository, tag = self.snapshot_repository(request), request.snapshot_id
        reference = f"{repository}:{tag}"
        await self.progress_note(iid, f"snapshot {sid}: committing the container", snapshot=sid)
        try:
            image = await self._engine(self._commit, state, repository, tag, request)
            size = int(image.get("Size") or 0)
            digest = str(image["Id"])
            if not digest.startswith("sha256:"):
                digest = f"sha256:{digest}"
            if self.registry is not None:
                digest = await self._push(iid, sid, repository, tag)
        except _ENGINE_ERRORS as exc:
            await self._engine(self._untag, reference)
            raise BackendError(f"snapshot {sid}: {explain(exc)}") from exc
        except BackendError:
            await self._engine(self._untag, reference)
            raise
        await self.progress_note(
            iid, f"snapshot {sid}: saved as {reference}", snapshot=sid, digest=digest, size=size
        )
        return SnapshotResult(kind="image", reference=reference, digest=digest, size=size)

    def _commit(
        self, state: JSON, repository: str, tag: str, request: SnapshotRequest
    ) -> dict[str, Any]:
        container = self.client.api.inspect_container(state["container_id"])
        if (container.get("HostConfig") or {}).get("UsernsMode") not in (None, "", "host"):
            # Podman 4.3 commits such a container's files with their host ids (the user's
            # range, near 2^31): no launch could use the image. docs: User namespaces.
            raise BackendError(
                f"snapshot {request.snapshot_id}: image snapshots of a container with its own "
                "user namespace are not supported on this engine (site option userns = 'host' "
                "allows them)"
            )
        base_env = self._image_env(container.get("Image") or state.get("image", ""))
        # The instance's environment holds its token (and whatever the tool file put
        # there): the image gets the base image's values back, or empty ones.
        changes = [
            f"ENV {key}={json.dumps(base_env.get(key, ''))}" for key in state.get("env_keys", [])
        ]
        changes += [f'LABEL {label}=""' for label in INSTANCE_LABELS]
        changes.append(f"LABEL {LABEL_SNAPSHOT}={json.dumps(request.snapshot_id)}")
        self.client.api.commit(
            state["container_id"], repository=repository, tag=tag, changes=changes, pause=True
        )
        result: dict[str, Any] = self.client.api.inspect_image(f"{repository}:{tag}")
        return result

    def _image_env(self, image: str) -> dict[str, str]:
        try:
            attrs = self.client.api.inspect_image(image)
        except DockerException:
            return {}
        pairs = (item.partition("=") for item in (attrs.get("Config") or {}).get("Env") or [])
        return {key: value for key, _, value in pairs}

    def _untag(self, reference: str) -> None:
        try:
            self.client.api.remove_image(reference)
        except DockerException as exc:
            log.info("removing image %s: %s", reference, explain(exc))

    async def _push(self, instance_id: str, sid: str, repository: str, tag: str) -> str:
        if self.registry is None:
            raise BackendError(f"snapshot {sid}: this site has no snapshot registry to push to")
        progress = PullProgress(f"snapshot {sid}: pushing", f"{repository}:{tag}")
        await self.progress_note(
            instance_id, f"snapshot {sid}: pushing to {self.registry.host}", snapshot=sid
        )
        auth = self.registry.auth_config()

        def lines() -> Any:
            return self.client.api.push(
                repository, tag=tag, stream=True, decode=True, auth_config=auth
            )

        digest = None
        async for line in iterate_in_thread(lines):
            problem = stream_error_of(line)
            if problem is not None:
                raise BackendError(f"snapshot {sid}: cannot push {repository}:{tag}: {problem}")
            digest = stream_digest(line) or digest
            note = progress.update(line)
            if note is not None:
                await self.progress_note(instance_id, note, snapshot=sid, **progress.summary())
        if digest is None:
            try:
                digest = await self.registry.manifest_digest(repository, tag)
            except OSError as exc:
                log.warning("cannot ask the registry for %s:%s: %s", repository, tag, exc)
        if digest is None:
            raise BackendError(f"snapshot {sid}: the registry did not confirm {repository}:{tag}")
        return digest

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """The snapshot's image in the registry (or, without one, on this engine)."""
        if not reference:
            reference = f"{self.snapshot_repository(request)}:{request.snapshot_id}"
        repository, tag = parse_repository_tag(reference)
        if self.registry is not None and self.registry.holds(reference):
            digest = await self.registry.find_manifest(repository, tag or "latest")
            if digest is None:
                return None
            image = await self._engine(self._image_or_none, reference)
            size = int((image or {}).get("Size") or 0)
            return SnapshotResult(kind="image", reference=reference, digest=digest, size=size)
        if not reference.startswith(LOCAL_SNAPSHOTS + "/"):
            raise SnapshotUnsupported(
                f"{reference} is neither in this site's registry nor kept on its engine"
            )
        image = await self._engine(self._image_or_none, reference)
        if image is None:
            return None
        digest = str(image["Id"])
        digest = digest if digest.startswith("sha256:") else f"sha256:{digest}"
        return SnapshotResult(
            kind="image", reference=reference, digest=digest, size=int(image.get("Size") or 0)
        )

    def _image_or_none(self, reference: str) -> dict[str, Any] | None:
        try:
            image: dict[str, Any] = self.client.api.inspect_image(reference)
        except ImageNotFound:
            return None
        except DockerException as exc:
            if "image not known" in explain(exc).lower() or "no such image" in explain(exc).lower():
                return None
            raise
        return image

    async def collect_snapshots(self, known: Collection[str]) -> list[str]:
        """Remove snapshot images no record names: registry manifests, then engine tags.

        Only tags that are snapshot ids, in repositories under this site's
        ``snapshot_registry`` namespace (which must be this labgate's alone),
        and images on the engine labelled ``labgate.snapshot``.
        """
        removed: list[str] = []
        # Without a namespace the whole registry would be labgate's to prune: it is not.
        if self.registry is not None and self.registry.namespace:
            for repository, tags in (await self.registry.snapshot_tags()).items():
                removed += await self._collect_repository(repository, tags, known)
        removed += await self._engine(self._collect_local, set(known))
        return removed

    async def _collect_repository(
        self, repository: str, tags: list[str], known: Collection[str]
    ) -> list[str]:
        registry = self.registry
        if registry is None:
            return []
        orphans = [tag for tag in tags if SNAPSHOT_TAG_RE.match(tag) and tag not in known]
        if not orphans:
            return []
        # Deleting a manifest deletes every tag of it: spare those another tag still needs.
        kept = {await registry.find_manifest(repository, tag) for tag in tags if tag not in orphans}
        removed = []
        for tag in orphans:
            digest = await registry.find_manifest(repository, tag)
            if digest is None or digest in kept:
                continue
            if await registry.delete_manifest(repository, digest):
                log.info("collected snapshot image %s:%s", repository, tag)
                removed.append(f"{repository}:{tag}")
        return removed

    def _collect_local(self, known: set[str]) -> list[str]:
        removed = []
        for image in self.client.api.images(filters={"label": LABEL_SNAPSHOT}):
            snapshot = ((image.get("Labels") or {}).get(LABEL_SNAPSHOT)) or ""
            if not snapshot or snapshot in known:
                continue
            for tag in image.get("RepoTags") or []:
                if tag.endswith(f":{snapshot}"):
                    self._untag(tag)
                    removed.append(tag)
        return removed

    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Remove the image from the engine and its manifest from the registry."""
        if ref.kind != "image":
            return
        await self._engine(self._untag, ref.reference)
        if self.registry is None or not self.registry.holds(ref.reference):
            return
        if not ref.digest.startswith("sha256:"):
            return
        repository, _ = parse_repository_tag(ref.reference)
        try:
            await self.registry.delete_manifest(repository, ref.digest)
        except Exception as exc:
            raise BackendError(f"cannot delete {ref.reference} from the registry: {exc}") from exc
