"""The site agent protocol: the JSON messages on an agent's one connection to the portal.

An agent dials out to ``/api/v1/agent/connect`` (a WebSocket through the
router's public port) with ``Authorization: Bearer <site token>``. Text
messages carry the JSON below. The instance tunnel's bytes do not travel
here: for a tunneled site the portal sends ``tunnel`` tickets and the agent
dials separate data connections to the router with them
(:mod:`labgate.wire.tunnel`). Every message names its ``type``; every
message from either side carries the protocol version ``v`` and a peer
refuses a version it does not speak, naming both.

The order on every (re)connect::

    portal -> agent   welcome    the site's name, backend and options, the tool catalog
    agent  -> portal  hello      the agent's version, what it can run, every instance it holds
    both ways         heartbeat  every ``heartbeat`` seconds
    portal -> agent   command    {id, op, args}: launch, stop, adopt, logs, snapshot, run_task, ...
    agent  -> portal  result     {id, ok, value | error}: exactly one per command id
    agent  -> portal  report     {seq, report}: state changes and progress of instances,
                                 and of batch task attempts (kind "task")
    portal -> agent   ack        {seq}: reports up to ``seq`` are applied
    portal -> agent   tunnel     {ticket, routers}: for the tunnel's data connections
                                 (tunneled sites: after the hello, then with every
                                 heartbeat), and the routers to keep one with

Commands are idempotent by id: an agent that sees an id again answers with
the first answer and does nothing twice. Reports are numbered per agent
process (``boot`` + ``seq``); the agent keeps every unacknowledged report
and sends it again after a reconnect, and the portal drops a report it has
applied already.

Why WebSocket and not HTTP/2: the connection must pass through the router's
public port (HTTP/1.1 with Upgrade, which it already proxies) and through
site firewalls and proxies that speak HTTP/1.1; each message is a frame
with no request overhead; and the tunnel's own per-stream credit gives the
per-stream flow control HTTP/2 would have given.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

#: 2: tunnel bytes left this connection for data connections to the router (tickets).
PROTOCOL_VERSION = 2
CONNECT_PATH = "/api/v1/agent/connect"

JSON = dict[str, Any]
#: Why a site cannot run a tool, in its agent's words: shown on every user's tools page,
#: so an agent gets no more room than a reason needs.
Reason = Annotated[str, Field(max_length=2000)]
#: A group volume's name as an agent reports it (the portal keeps only plain ones).
GroupName = Annotated[str, Field(max_length=64)]
#: Most group volumes an agent reports.
MAX_GROUPS = 10_000


class Message(BaseModel):
    """Every message: its type and the protocol version."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = PROTOCOL_VERSION


class MountMsg(BaseModel):
    """A mount of a launch (:class:`labgate.wire.launch.Mount`)."""

    source: str
    target: str
    read_only: bool = True
    root: str | None = None


class SnapshotRefMsg(BaseModel):
    """A stored snapshot (:class:`labgate.wire.launch.SnapshotRef`)."""

    id: str
    kind: str
    reference: str
    digest: str = ""


class LaunchSpecMsg(BaseModel):
    """A launch spec. ``workspace`` is relative: the site puts it under its own workspaces."""

    instance_id: str
    owner: str
    owner_id: int | None = None
    tool: JSON
    base_url: str
    workspace: str
    cpu: float
    memory: int
    secret: str
    env: dict[str, str] = Field(default_factory=dict)
    mounts: list[MountMsg] = Field(default_factory=list)
    snapshot: SnapshotRefMsg | None = None
    #: A container image chosen from the tool's allowlist ("" the tool's own).
    image: str = ""
    #: What the user chose among the site's allowed values (a Slurm partition, wall time...).
    options: dict[str, str] = Field(default_factory=dict)
    params: dict[str, str] = Field(default_factory=dict)
    #: Only the agent connects to the instance: serve it on a Unix socket where the tool can.
    on_socket: bool = False


class AdoptionMsg(BaseModel):
    """An instance handed back to its site (:class:`labgate.agent.site.Adoption`)."""

    spec: LaunchSpecMsg
    state: str
    backend_state: JSON
    endpoint: str
    remaining_start_time: float = 0.0


class ClaimMsg(BaseModel):
    """A warm-pool claim; ``workspace`` is relative, as in a launch spec."""

    instance_id: str
    owner: str
    workspace: str
    owner_id: int | None = None


class SnapshotRequestMsg(BaseModel):
    """What to save (:class:`labgate.wire.launch.SnapshotRequest`)."""

    snapshot_id: str
    instance_id: str
    owner: str
    tool: str


class SnapshotResultMsg(BaseModel):
    """What was saved (:class:`labgate.wire.launch.SnapshotResult`)."""

    kind: str
    reference: str
    digest: str
    size: int


class FetchRequestMsg(BaseModel):
    """A URL dataset to fetch into the site's cache (:class:`labgate.wire.launch.FetchRequest`)."""

    instance_id: str
    url: str
    entry: str
    max_bytes: int
    expected_size: int | None = None
    checksum: str = ""
    allow_private: bool = False


class FetchedMsg(BaseModel):
    """A finished cache entry at the site (:class:`labgate.agent.fetch.Fetched`)."""

    directory: str
    file: str
    size: int
    checksum: str
    verified: bool
    cached: bool = False


class ReportMsg(BaseModel):
    """A site's report on one instance (:class:`labgate.wire.site.Report`)."""

    instance_id: str
    state: str
    kind: str = "state"
    message: str = ""
    backend_state: JSON | None = None
    endpoint: str | None = None
    log_tail: str = ""
    data: JSON = Field(default_factory=dict)


class Held(BaseModel):
    """An instance an agent holds, as it says in its hello."""

    instance_id: str
    #: ``starting`` (waiting for the health check) or ``running``.
    state: str
    backend_state: JSON
    endpoint: str


class Welcome(Message):
    """The portal's first message: what the site is and what the catalog holds."""

    type: Literal["welcome"] = "welcome"
    site: str
    backend: str
    options: JSON = Field(default_factory=dict)
    data_root: str | None = None
    #: Where the site keeps its group volumes (None: it has none); the agent reports
    #: which are there (:attr:`Hello.groups`).
    group_root: str | None = None
    reach: str = "direct"
    #: Seconds between heartbeats, both ways.
    heartbeat: float = 10.0
    #: Every tool of the portal's catalog, as its JSON form.
    tools: list[JSON] = Field(default_factory=list)


class Hello(Message):
    """The agent's first message: itself, what it can run and every instance it holds."""

    type: Literal["hello"] = "hello"
    site: str
    agent_version: str
    hostname: str = ""
    #: Changes every time the agent process starts; report numbers count within it.
    boot: str
    backend: str
    snapshot_kind: str = ""
    #: The site machine's CPU cores (0: not said): the default of its start capacity.
    cores: int = Field(0, ge=0, le=1_000_000)
    #: Per tool of the catalog: why it cannot run here, or None when it can.
    tools: dict[str, Reason | None] = Field(default_factory=dict)
    #: Per tool: why running instances cannot be handed to users, or None when they can.
    claims: dict[str, Reason | None] = Field(default_factory=dict)
    instances: list[Held] = Field(default_factory=list)
    #: The group volumes under the site's ``group_root``: the plain names of the
    #: directories there (None: no ``group_root``).
    groups: list[GroupName] | None = Field(None, max_length=MAX_GROUPS)


class Heartbeat(Message):
    """I am here; sent both ways every ``heartbeat`` seconds."""

    type: Literal["heartbeat"] = "heartbeat"
    time: float
    #: Instances the agent watches (agent to portal only).
    instances: int = 0
    #: What keeps the site from working now, e.g. its engine is down ("": nothing).
    health: str = ""
    #: Per tool, as in the hello, when that changed since the agent last said (an image
    #: built or removed on its engine); None: unchanged (agent to portal only).
    tools: dict[str, Reason | None] | None = None
    #: The group volumes, as in the hello, when they changed since the agent last said
    #: (a directory made or removed under ``group_root``); None: unchanged.
    groups: list[GroupName] | None = Field(None, max_length=MAX_GROUPS)


class Command(Message):
    """Something the portal asks of the site; answered by one :class:`Result`."""

    type: Literal["command"] = "command"
    id: str
    op: Literal[
        "launch",
        "stop",
        "adopt",
        "logs",
        "snapshot",
        "find_snapshot",
        "collect_snapshots",
        "delete_snapshot",
        "reconcile",
        "claim",
        "fetch_dataset",
        # Batch tasks (labgate.agent.task_ops).
        "run_task",
        "cancel_task",
        "adopt_task",
        "task_logs",
        "task_results",
        "forget_task",
    ]
    args: JSON = Field(default_factory=dict)


class Result(Message):
    """The answer to one command."""

    type: Literal["result"] = "result"
    id: str
    ok: bool
    value: Any = None
    error: str = ""
    #: The error's code (``claim_failed``, ``snapshot_unsupported``...), when it had one.
    code: str = ""
    status: int = 0


class ReportEnvelope(Message):
    """A report, numbered within the agent process's ``boot``."""

    type: Literal["report"] = "report"
    seq: int
    report: ReportMsg


class Ack(Message):
    """Reports up to and including ``seq`` are applied."""

    type: Literal["ack"] = "ack"
    seq: int


class TunnelTicket(Message):
    """What opens the tunnel's data connections to the routers, for a minute or so.

    ``routers``: the address of every router to keep a data connection with;
    empty: the one the agent reaches the portal through.
    """

    type: Literal["tunnel"] = "tunnel"
    ticket: str
    routers: list[str] = Field(default_factory=list)


AnyMessage = Annotated[
    Welcome | Hello | Heartbeat | Command | Result | ReportEnvelope | Ack | TunnelTicket,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


class ProtocolError(ValueError):
    """A message that is not valid JSON of this protocol, or of another version."""


def parse(text: str | bytes) -> AnyMessage:
    """One message from its JSON text; raises :class:`ProtocolError`."""
    try:
        message = _ADAPTER.validate_json(text)
    except ValueError as exc:
        raise ProtocolError(f"not a message of the agent protocol: {exc}") from None
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"agent protocol version {message.v} is not {PROTOCOL_VERSION}, which this side speaks"
        )
    return message


def dump(message: Message) -> str:
    """A message as its JSON text."""
    return message.model_dump_json()
