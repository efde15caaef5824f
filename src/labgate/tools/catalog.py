"""The tool catalog: tool definitions read from TOML files.

Built-in tools ship in ``labgate/tools/builtin/*.toml``; an operator adds more
in ``tools_dir``. A file that does not parse or validate is reported with its
name and the reason and skipped: one bad file never stops the server. A file
in ``tools_dir`` replaces a built-in of the same name.

A tool file looks like::

    name = "demo"
    title = "Demo"
    description = "..."
    supports_prefix = true
    health_path = "/api/health"
    start_timeout = 30      # seconds from the start of its process to a healthy answer
    start_grace = 0         # more seconds while the process is alive and using CPU
    start_cost = 0.25       # cores its start keeps busy (the site's start queue)

    [resources]
    cpu = 0.5
    memory = "256M"

    [process]
    command = ["{python}", "-m", "labgate.tools.demo", "--port", "{port}",
               "--base-url", "{base_url}"]
    requires = ["python"]   # executables or importable modules that must exist
    env = { DEMO_GREETING = "hello" }
    # optional: the same tool on a Unix socket, for sites that serve instances on one
    socket_command = ["{python}", "-m", "labgate.tools.demo", "--socket", "{socket}",
                      "--base-url", "{base_url}"]

    [container]             # how the containers backend starts it
    image = "localhost/labgate/demo:latest"
    args = ["python3", "-m", "labgate.tools.demo", "--host", "0.0.0.0",
            "--port", "{port}", "--base-url", "{base_url}"]
    port = 8888
    workspace = "/home/labgate"

Every other table (``[process]``, ``[container]``, a third-party backend's
``[echo]``) belongs to a backend: the tool keeps it raw in ``sections`` and
the backend that declares it (``Backend.tool_section``) validates it with its
own schema (``Backend.tool_schema``). The catalog sits below the backends
and knows none of them: :func:`labgate.backends.registry.load_catalog` loads it
and checks every table with the installed backends up front (a table no
installed backend reads, or one that fails its backend's schema, is a warning
in ``Catalog.problems`` and the tool still loads; it just cannot run on that
backend), and :func:`labgate.backends.registry.tool_unavailable_reason` says
why a tool cannot run on a backend. :class:`ProcessSpec` and
:class:`ContainerSpec` are the schemas of the built-in backends.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import string
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from labgate.tools.params import PARAM_NAME_RE, ToolParam, param_placeholders
from labgate.units import Size
from labgate.wire.launch import Resources

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).parent / "builtin"
NAME_RE = r"^[a-z][a-z0-9-]{0,62}$"
PLACEHOLDERS = frozenset({"port", "base_url", "workspace", "python", "instance_id", "user"})
_FORMATTER = string.Formatter()
# The instance token is a secret: allowed in environment values, never on a
# command line where `ps` would show it to other local users.
ENV_PLACEHOLDERS = PLACEHOLDERS | {"instance_token"}
#: A ``socket_command`` listens on ``{socket}`` and has no ``{port}``.
SOCKET_PLACEHOLDERS = (PLACEHOLDERS - {"port"}) | {"socket"}
PARAM_PREFIX = "param_"
M = TypeVar("M", bound=BaseModel)


class ToolResources(BaseModel):
    """Default and maximum resources of a tool."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(1.0, gt=0, le=1024)
    memory: Size = 1024**3
    max_cpu: float = Field(8.0, gt=0, le=1024)
    max_memory: Size = 32 * 1024**3

    def default(self) -> Resources:
        """The resources a launch gets when it asks for none."""
        return Resources(cpu=self.cpu, memory=self.memory)


class ProcessSpec(BaseModel):
    """How the process backend starts a tool."""

    model_config = ConfigDict(extra="forbid")

    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    requires: list[str] = Field(default_factory=list)
    #: The command that installs what ``requires`` names (shown when something is missing).
    install: str = Field("", max_length=500)
    #: Run in a network namespace of its own (only its own loopback) when sandboxed: the
    #: process backend listens on ``{port}`` in the host's namespace and hands the socket in
    #: (``$LABGATE_LISTEN_FD``, which the token gate serves on). For apps that cannot check
    #: the instance token nor serve on a Unix socket; they get no other network.
    private_network: bool = False
    #: The command that makes the tool listen on the Unix socket ``{socket}`` instead of
    #: ``{port}``: a site whose agent alone reaches its instances (a tunneled site) runs it.
    #: None: the tool always listens on ``{port}``.
    socket_command: list[str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _placeholders(self) -> ProcessSpec:
        self.check_placeholders()
        if self.socket_command is not None and self.private_network:
            raise ValueError("a tool with private_network cannot have a socket_command")
        return self

    def check_placeholders(self) -> None:
        """Refuse unknown ``{placeholders}`` in the command and environment templates."""
        _check_template(self.command, PLACEHOLDERS, "command")
        _check_template(self.env.values(), ENV_PLACEHOLDERS, "env")
        if self.socket_command is not None:
            _check_template(self.socket_command, SOCKET_PLACEHOLDERS, "socket_command")
            if not any("{socket}" in part for part in self.socket_command):
                raise ValueError("socket_command must listen on {socket}")
            if any("port" in _fields(value) for value in self.env.values()):
                raise ValueError("env cannot use {port} in a tool with a socket_command")

    def missing_requirement(self) -> str | None:
        """Why the command cannot run on this machine (a requirement is missing), or None.

        A requirement is an executable on ``PATH``, an importable Python module, or an
        absolute path that must exist; ``a|b`` is met by either.
        """
        for requirement in self.requires:
            if not any(_present(alternative) for alternative in requirement.split("|")):
                fix = f"; install it with: {self.install}" if self.install else ""
                return f"requires {requirement!r}, which is not installed{fix}"
        return None

    def render(
        self, values: dict[str, str], *, on_socket: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        """The command (``socket_command`` when ``on_socket``) and environment with their
        placeholders filled in."""
        template = self.socket_command if on_socket and self.socket_command else self.command
        command = [part.format(**values) for part in template]
        env = {key: value.format(**values) for key, value in self.env.items()}
        return command, env


#: In a container ``{workspace}`` is the workspace's mount point; there is no ``{python}``.
CONTAINER_PLACEHOLDERS = PLACEHOLDERS - {"python"}
CONTAINER_ENV_PLACEHOLDERS = CONTAINER_PLACEHOLDERS | {"instance_token"}


class ContainerSpec(BaseModel):
    """How the containers backend starts a tool (Docker Engine API: Docker or Podman)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=512)
    #: Replaces the image's ENTRYPOINT when set (Kubernetes' ``command``).
    command: list[str] | None = None
    #: Replaces the image's CMD when set (Kubernetes' ``args``).
    args: list[str] | None = None
    #: The port the tool listens on inside the container (on 0.0.0.0).
    port: int = Field(8888, ge=1, le=65535)
    env: dict[str, str] = Field(default_factory=dict)
    #: ``uid[:gid]`` or a user name of the image; empty means the image's USER.
    user: str = ""
    working_dir: str = ""
    #: Where the owner's workspace volume is mounted.
    workspace: str = Field("/workspace", pattern=r"^/")
    #: GPUs to request as device requests (-1: all); needs the site option ``gpu``.
    gpus: int = Field(0, ge=-1)
    #: Other images a launch may choose (``"image": ...``), for everyone.
    images: list[str] = Field(default_factory=list, max_length=100)
    #: Images only members of a group may choose: group name -> images.
    group_images: dict[str, list[str]] = Field(default_factory=dict)
    #: A directory next to the tool file with a Containerfile that builds ``image``
    #: (``labgate image build``).
    build: str = Field("", max_length=200, pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]*/?)*$")

    @model_validator(mode="after")
    def _placeholders(self) -> ContainerSpec:
        self.check_placeholders()
        return self

    def allowed_images(self, groups: Iterable[str] | None = None) -> list[str]:
        """The images a launch may choose: ``image``, ``images``, then those of ``groups``.

        ``groups=None``: every group's (what a site accepts; the portal checks
        the user's groups).
        """
        chosen = [self.image, *self.images]
        for group, images in sorted(self.group_images.items()):
            if groups is None or group in groups:
                chosen += images
        return list(dict.fromkeys(chosen))

    def check_placeholders(self) -> None:
        """Refuse unknown ``{placeholders}`` in the command, args and environment."""
        _check_template(self.command or [], CONTAINER_PLACEHOLDERS, "container.command")
        _check_template(self.args or [], CONTAINER_PLACEHOLDERS, "container.args")
        _check_template(self.env.values(), CONTAINER_ENV_PLACEHOLDERS, "container.env")

    def render(
        self, values: dict[str, str]
    ) -> tuple[list[str] | None, list[str] | None, dict[str, str]]:
        """Command, args and environment with their placeholders filled in."""
        command = None if self.command is None else [p.format(**values) for p in self.command]
        args = None if self.args is None else [p.format(**values) for p in self.args]
        env = {key: value.format(**values) for key, value in self.env.items()}
        return command, args, env


def _present(requirement: str) -> bool:
    """Whether one requirement (executable, Python module or absolute path) is here."""
    if requirement == "python" or shutil.which(requirement):
        return True
    if requirement.startswith("/"):
        return Path(requirement).exists()
    try:
        return importlib.util.find_spec(requirement) is not None
    except (ImportError, ValueError):  # a bad name is not importable
        return False


def _fields(template: str) -> set[str]:
    """The placeholders of a (checked) template."""
    return {name for _, name, _, _ in _FORMATTER.parse(template) if name is not None}


def _check_template(parts: Iterable[str], allowed: frozenset[str], where: str) -> None:
    """Refuse what ``str.format`` would not fill from ``allowed`` (``{{`` is a brace).

    ``{param_<name>}`` is a launch parameter's value: the tool checks that it declares it.
    """
    known = ", ".join(sorted(allowed))
    for part in parts:
        try:
            fields = _fields(part)
        except ValueError as problem:
            raise ValueError(f"bad braces in {where}: {part!r} ({problem})") from None
        for name in fields:
            if name not in allowed and not name.startswith(PARAM_PREFIX):
                raise ValueError(f"unknown placeholder {{{name}}} in {where} (known: {known})")


class Tool(BaseModel):
    """A catalog entry: how to start one web tool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RE)
    title: str = Field(min_length=1, max_length=100)
    description: str = ""
    icon: str = ""
    supports_prefix: bool = True
    health_path: str = "/"
    start_timeout: float = Field(60.0, gt=0, le=3600)
    #: Seconds more a start gets when its budget ends while the tool is alive and busy.
    start_grace: float = Field(0.0, ge=0, le=3600)
    #: Cores a start keeps busy: how much of its site's start capacity it takes.
    start_cost: float = Field(1.0, gt=0, le=1024)
    idle_timeout: float = Field(3600.0, ge=0)
    #: Seconds an instance may run before it is stopped; 0: no limit of the tool's own.
    max_lifetime: float = Field(0.0, ge=0)
    #: Path under the tool's base URL told about a warm-pool claim (labgate.backends.claim).
    claim_path: str = ""
    resources: ToolResources = Field(default_factory=ToolResources)
    #: Launch parameters (``[params.<name>]``), in the order the launch form shows them.
    params: dict[str, ToolParam] = Field(default_factory=dict)
    #: The backends' tables (``process``, ``container``, ...), raw, by table name.
    sections: dict[str, dict[str, Any]] = Field(default_factory=dict)
    source: str = Field("", exclude=True)
    _parsed: dict[str, BaseModel] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_sections(cls, data: Any) -> Any:
        """Every table that is not a field of its own is a backend's section.

        A section may also be given as a model (``process=ProcessSpec(...)``),
        kept as the table it came from, or as None (no table).
        """
        if not isinstance(data, dict):
            return data
        fields, sections = {}, dict(data.get("sections") or {})
        for key, value in data.items():
            if key in cls.model_fields:
                fields[key] = value
            elif value is None:
                continue  # ``process=None``: no such table
            elif isinstance(value, BaseModel):
                sections[key] = value.model_dump(exclude_unset=True)
            elif isinstance(value, dict):
                sections[key] = value
            else:
                fields[key] = value  # refused by extra="forbid", with its name
        fields["sections"] = sections
        return fields

    def model_post_init(self, __context: Any) -> None:
        """Cross-field checks that pydantic's field validators cannot express."""
        if not self.health_path.startswith("/"):
            raise ValueError("health_path must start with /")
        if self.claim_path and not self.claim_path.startswith("/"):
            raise ValueError("claim_path must start with /")
        for name in self.params:
            if re.fullmatch(PARAM_NAME_RE, name) is None:
                raise ValueError(f"params.{name}: a name is lowercase letters, digits and _")
        for name in sorted(_param_references(self.sections)):
            if name not in self.params:
                raise ValueError(f"{{{PARAM_PREFIX}{name}}} names no parameter of this tool")

    def parsed(self, section: str, schema: type[M]) -> M | None:
        """The ``[section]`` table validated by ``schema``; None when the tool has none.

        Raises :class:`ToolSectionError` with the reason when it does not validate.
        """
        cached = self._parsed.get(section)
        if isinstance(cached, schema):
            return cached
        raw = self.sections.get(section)
        if raw is None:
            return None
        try:
            spec = schema.model_validate(raw)
        except ValidationError as exc:
            raise ToolSectionError(f"[{section}] {describe_validation(exc)}") from None
        except ValueError as exc:
            raise ToolSectionError(f"[{section}] {exc}") from None
        self._parsed[section] = spec
        return spec


def _param_references(value: Any) -> set[str]:
    """The parameter names a backend table's templates use (``{param_<name>}``)."""
    found: set[str] = set()
    if isinstance(value, str):
        try:
            fields = [name for _, name, _, _ in _FORMATTER.parse(value) if name]
        except ValueError:
            return found  # the backend's schema says what is wrong with it
        found.update(f[len(PARAM_PREFIX) :] for f in fields if f.startswith(PARAM_PREFIX))
    elif isinstance(value, dict):
        for item in value.values():
            found |= _param_references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _param_references(item)
    return found


class ToolSectionError(ValueError):
    """A tool's backend table does not satisfy the backend's schema; the message says why."""


class CatalogProblem(BaseModel):
    """A tool file that could not be loaded."""

    file: str
    reason: str


class Catalog:
    """The tools known to this portal, by name."""

    def __init__(self, tools: Iterable[Tool], problems: Iterable[CatalogProblem] = ()) -> None:
        self.tools = {tool.name: tool for tool in tools}
        self.problems = list(problems)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, if any."""
        return self.tools.get(name)

    def __iter__(self) -> Any:
        return iter(sorted(self.tools.values(), key=lambda tool: tool.name))

    def __len__(self) -> int:
        return len(self.tools)

    @classmethod
    def load(cls, extra_dir: Path | None = None) -> Catalog:
        """Built-in tools, then the ones in ``extra_dir`` (which win on name clashes)."""
        tools: dict[str, Tool] = {}
        problems: list[CatalogProblem] = []
        directories = [BUILTIN_DIR] + ([extra_dir] if extra_dir is not None else [])
        for directory in directories:
            if not directory.is_dir():
                problems.append(CatalogProblem(file=str(directory), reason="not a directory"))
                continue
            for path in sorted(directory.glob("*.toml")):
                try:
                    tool = load_tool_file(path)
                except ToolFileError as exc:
                    log.warning("skipping tool file %s: %s", path, exc)
                    problems.append(CatalogProblem(file=str(path), reason=str(exc)))
                    continue
                tools[tool.name] = tool
        return cls(tools.values(), problems)


def describe_validation(exc: ValidationError, whole: str = "") -> str:
    """A pydantic error in one line: ``field: message; ...`` (``whole`` names a fieldless one)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or whole
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


class ToolFileError(ValueError):
    """A tool file cannot be used; the message says why."""


def load_tool_file(path: Path) -> Tool:
    """Parse and validate one tool file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolFileError(f"cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ToolFileError(f"invalid TOML: {exc}") from exc
    try:
        return Tool.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise ToolFileError(describe_validation(exc, "file")) from exc


def template_values(
    *,
    port: int,
    base_url: str,
    workspace: str,
    instance_id: str,
    user: str,
    instance_token: str,
    params: dict[str, str] | None = None,
    socket: str = "",
) -> dict[str, str]:
    """Values for a process command and environment template (and ``{param_<name>}``)."""
    return {
        **param_placeholders(params or {}),
        "instance_token": instance_token,
        "port": str(port),
        "socket": socket,
        "base_url": base_url,
        "workspace": workspace,
        "python": sys.executable,
        "instance_id": instance_id,
        "user": user,
    }
