"""Request and response bodies of the REST API; request bodies are strict (labgate.types)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, model_validator

from labgate.types import Strict

USER_NAME = r"^[a-z][a-z0-9_.-]{0,31}$"


class LoginIn(Strict):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    provider: str | None = Field(
        None, max_length=64, description="A password provider (local, an LDAP one); default first."
    )


class SessionOut(BaseModel):
    user: UserOut
    csrf_token: str | None = Field(
        None, description="Send as X-CSRF-Token on cookie-authenticated changes."
    )
    scopes: list[str]
    via: str


class UserIn(Strict):
    name: str = Field(pattern=USER_NAME, description="Lower-case login name.")
    password: str | None = Field(None, min_length=8, max_length=1024)
    is_admin: bool = False


class UserPatch(Strict):
    is_admin: bool | None = None
    disabled: bool | None = None
    data_provider: StrictBool | None = Field(
        None, description="Grant (true) or revoke (false) the role that registers datasets."
    )


class PasswordIn(Strict):
    password: str = Field(min_length=8, max_length=1024)
    current_password: str | None = Field(
        None, max_length=1024, description="Required when changing your own password."
    )


class IdentityOut(BaseModel):
    provider: str
    subject: str = Field(description="The provider's stable id of the person.")
    email: str
    created_at: datetime
    last_login_at: datetime | None


class UserOut(BaseModel):
    name: str
    is_admin: bool
    data_provider: bool = Field(description="May register datasets (admins may anyway).")
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None
    identities: list[IdentityOut] | None = Field(
        None, description="Accounts at identity providers linked to it (GET /users/{name})."
    )


class UserCreated(UserOut):
    password: str | None = Field(None, description="The generated password, shown once.")


class TokenIn(Strict):
    note: str = Field("", max_length=200)
    scopes: list[str] | None = Field(
        None, description="Defaults to every scope of the user except admin."
    )
    expires_in: int | None = Field(None, gt=0, le=10 * 365 * 24 * 3600, description="Seconds.")


class TokenOut(BaseModel):
    id: int
    prefix: str
    note: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    user: str


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself, shown once.")


class ToolOut(BaseModel):
    name: str
    title: str
    description: str
    icon: str
    supports_prefix: bool
    resources: dict[str, Any]
    available: bool
    unavailable_reason: str | None
    images: list[str] = Field(
        default_factory=list,
        description='Container images you may launch it with ("image"), its own first; '
        "shown by GET /api/v1/tools/{name}.",
    )
    params: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Launch parameters by name, in form order: type, label, help, default, "
        "choices, min, max, pattern, max_length, accept, required.",
    )
    last_params: dict[str, str] = Field(
        default_factory=dict, description="The values you gave your newest instance of it."
    )


#: ``local``, or where a network site's agent is (``waiting``: it never connected).
SiteStatus = Literal["local", "connected", "disconnected", "waiting", "revoked"]


class SiteOut(BaseModel):
    name: str
    backend: str
    instances: int
    labels: dict[str, Any]
    live: bool = Field(True, description="Connected to this portal (in-process sites always are).")
    capacity: dict[str, Any] = Field(
        default_factory=dict,
        description="cpu, memory, max_instances; 0 means unlimited.",
    )
    use: dict[str, Any] = Field(
        default_factory=dict, description="cpu, memory, instances of its active instances."
    )
    start_capacity: float = Field(
        0,
        description="Cores it gives to starting tools at once (its start queue); 0: no queue.",
    )
    data_root: str | None = None
    group_root: str | None = Field(
        None, description="Where its shared group volumes are, on the site's machine."
    )
    inventory: dict[str, Any] | None = Field(
        None, description="The last inventory push: reported_at, ttl, replicas, stale."
    )
    kind: Literal["local", "network"] = Field(
        "local", description="local: from the settings, in process; network: its agent dials in."
    )
    reach: Literal["direct", "tunnel"] = Field(
        "direct", description="How the router reaches its instances."
    )
    status: SiteStatus = Field(
        "local",
        description="A network site's agent: connected, disconnected, waiting (never "
        "connected) or revoked (no token); local for sites of the settings.",
    )
    connected_since: datetime | None = Field(None, description="While its agent is connected.")
    disconnected_since: datetime | None = Field(None, description="When its agent last left.")
    last_heartbeat: datetime | None = None
    agent_version: str = ""
    agent: dict[str, Any] | None = Field(
        None, description="What its agent reported (hostname, tools, snapshot kind); admins only."
    )
    token_issued_at: datetime | None = Field(
        None, description="When its enrolment token was made; admins only."
    )
    choices: dict[str, Any] = Field(
        default_factory=dict,
        description="What users may choose at launch (a launch's options): per name its "
        "default and allowed values (Slurm: partition, gres, time...).",
    )
    options: dict[str, Any] | None = Field(
        None, description="A network site's backend options; admins only."
    )


class SiteWithToken(SiteOut):
    token: str = Field(description="The agent's enrolment token, shown only this once.")


class LaunchIn(Strict):
    tool: str | None = Field(
        None, min_length=1, max_length=64, description="Required unless snapshot is given."
    )
    resources: dict[str, Any] | None = Field(
        None, description='e.g. {"cpu": 2, "memory": "4G"}; limited by the tool.'
    )
    site: str | None = Field(None, max_length=64)
    dataset: str | None = Field(
        None, max_length=2048, description="Run next to this dataset (DOI, Handle, URL…), mounted."
    )
    labels: dict[str, str] | None = Field(None, description="Labels the site must carry.")
    snapshot: str | None = Field(
        None, max_length=32, description="Start from this snapshot (yours or shared with you)."
    )
    group: str | None = Field(
        None, max_length=64, description="Group to charge; default: the first of yours with room."
    )
    options: dict[str, str] | None = Field(
        None,
        max_length=16,
        description='Choices among the site\'s allowed values, e.g. {"partition": "gpu"} (Slurm).',
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=512,
        description="A container image from the tool's allowlist (GET /api/v1/tools/{name}).",
    )
    params: dict[str, Any] | None = Field(
        None,
        max_length=32,
        description='Values of the tool\'s launch parameters, e.g. {"app": "app.py"}; a bad '
        "one is a 422 invalid_param naming it.",
    )

    @model_validator(mode="after")
    def _tool_or_snapshot(self) -> LaunchIn:
        if self.tool is None and self.snapshot is None:
            raise ValueError("give a tool, a snapshot, or both")
        if self.image is not None and self.snapshot is not None:
            raise ValueError("a launch from a snapshot runs the snapshot's image: no image")
        return self


class QueueOut(BaseModel):
    site: str
    position: int = Field(description="1: the next to start.")
    estimate: int = Field(description="Seconds until its start is expected to begin.")


class InstanceOut(BaseModel):
    id: str
    tool: str
    owner: str
    site: str | None
    state: str
    reason: str
    url: str
    resources: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    ready_at: datetime | None
    stopped_at: datetime | None
    endpoint: str | None = Field(None, description="Upstream address; admins only.")
    dataset: str | None = Field(None, description="The dataset it was launched with.")
    mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="What is mounted: dataset, target, read_only."
    )
    snapshot: str | None = Field(None, description="The snapshot it was launched from.")
    activity: ActivityOut | None = Field(
        None, description="What the routers saw: last request, bytes, open WebSockets."
    )
    keep_alive_until: datetime | None = Field(
        None, description="Idle culling spares the instance until then (its owner asked)."
    )
    pool: str | None = Field(None, description="The warm pool (tool@site) it waits in, unclaimed.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="What was chosen among the site's allowed values."
    )
    shared: bool = Field(False, description="Whether its owner shares it with anyone.")
    access: str = Field(
        "owner", description="What you may do: owner, admin, use (reach it) or view (see it)."
    )
    queue: QueueOut | None = Field(
        None, description="Its place in its site's start queue, while it is queued."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="The tool's launch parameters it was given."
    )


class ActivityOut(BaseModel):
    last_request: datetime | None
    bytes_in: int
    bytes_out: int
    open_websockets: int


class EventOut(BaseModel):
    id: int
    instance: str
    kind: str
    state: str
    message: str
    data: dict[str, Any]
    created_at: datetime


class LogsOut(BaseModel):
    instance: str
    lines: int
    text: str


SessionOut.model_rebuild()
InstanceOut.model_rebuild()
