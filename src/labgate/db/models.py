"""SQLAlchemy models: users, API tokens, sessions, sites, instances, events, datasets, snapshots.

Timestamps are timezone-aware UTC. JSON columns hold backend state and
resources, whose shape belongs to the backend and the scheduler.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that always comes back timezone-aware UTC (SQLite drops zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention for Alembic."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class InstanceState(enum.StrEnum):
    """Where an instance is in its life; see ARCHITECTURE.md."""

    #: Admitted and placed, waiting in its site's start queue (labgate.scheduler.startqueue).
    queued = "queued"
    pending = "pending"
    starting = "starting"
    running = "running"
    #: Its site's agent is not connected: the instance may still run there.
    unreachable = "unreachable"
    stopping = "stopping"
    stopped = "stopped"
    failed = "failed"
    lost = "lost"

    @property
    def terminal(self) -> bool:
        """Whether no further transition can happen."""
        return self in TERMINAL_STATES

    @property
    def active(self) -> bool:
        """Whether the instance counts against the user's limit."""
        return self in ACTIVE_STATES


TERMINAL_STATES = frozenset({InstanceState.stopped, InstanceState.failed, InstanceState.lost})
ACTIVE_STATES = frozenset(
    {
        InstanceState.queued,
        InstanceState.pending,
        InstanceState.starting,
        InstanceState.running,
        InstanceState.unreachable,
    }
)

#: The allowed transitions; anything else is a bug or a race and is refused.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    # Out of the start queue to be started, or stopped by its owner before that.
    InstanceState.queued: frozenset(
        {InstanceState.pending, InstanceState.failed, InstanceState.stopping}
    ),
    InstanceState.pending: frozenset(
        {InstanceState.starting, InstanceState.failed, InstanceState.stopping}
    ),
    InstanceState.starting: frozenset(
        {
            InstanceState.running,
            InstanceState.failed,
            InstanceState.stopping,
            InstanceState.lost,
            InstanceState.unreachable,
        }
    ),
    InstanceState.running: frozenset(
        {InstanceState.stopping, InstanceState.lost, InstanceState.unreachable}
    ),
    # Back when the agent returns and still holds it; lost when it does not, or never returns.
    InstanceState.unreachable: frozenset(
        {
            InstanceState.starting,
            InstanceState.running,
            InstanceState.failed,
            InstanceState.stopping,
            InstanceState.lost,
        }
    ),
    InstanceState.stopping: frozenset({InstanceState.stopped, InstanceState.lost}),
    InstanceState.stopped: frozenset(),
    InstanceState.failed: frozenset(),
    InstanceState.lost: frozenset(),
}


class User(Base):
    """A local account.

    Ids are never given out again (SQLite's AUTOINCREMENT, migration 0013; PostgreSQL's
    sequence never goes back): a deleted user's id must not pass to a new account.
    """

    __tablename__ = "users"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255), default="")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    #: May register datasets (granted by an admin); admins may anyway.
    data_provider: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Sessions issued before this are invalid (password change, disable).
    sessions_valid_after: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)

    tokens: Mapped[list[ApiToken]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )


class ApiToken(Base):
    """An API token; only its hash is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(200), default="")
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship(back_populates="tokens")


class RevokedSession(Base):
    """A browser session ended by logout before its cookie expired."""

    __tablename__ = "revoked_sessions"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class OAuthGrant(Base):
    """A code labgate's OpenID Connect provider gave out, then the access token it became.

    Shared by every portal replica (migration 0015): a code from one is
    exchanged at another, a token from one answered by another's
    ``/oauth/userinfo`` (:mod:`labgate.portal.oauth`). Only hashes of the code
    and token are stored. ``token_hash`` is set by the one exchange that
    claims the code; ``expires_at`` is the code's expiry until then, the
    token's after; ``revoked`` ends the token (the code used twice, or the
    grant seen ended once). Rows past ``expires_at`` are deleted.
    """

    __tablename__ = "oauth_grants"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    client_id: Mapped[str] = mapped_column(String(255))
    user_id: Mapped[int] = mapped_column(Integer)
    #: The portal session the person said yes in.
    session_id: Mapped[str] = mapped_column(String(64))
    #: When they said yes (compared with the user's ``sessions_valid_after``).
    issued_at: Mapped[datetime] = mapped_column()
    redirect_uri: Mapped[str] = mapped_column(Text)
    nonce: Mapped[str] = mapped_column(Text, default="")
    challenge: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime] = mapped_column(index=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class SiteKind(enum.StrEnum):
    """Where a site's agent runs."""

    #: Defined in the settings; its agent runs in the portal's process.
    local = "local"
    #: Added with ``labgate site add``; its agent runs on the site's machine and dials in.
    network = "network"


class SiteReach(enum.StrEnum):
    """How the router reaches a site's instances."""

    #: The router connects to the endpoint the site reports.
    direct = "direct"
    #: Through the agent's own connection: nothing can connect into the site.
    tunnel = "tunnel"


class Site(Base):
    """A place where instances run."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    backend: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The last heartbeat of its agent (network sites).
    last_seen_at: Mapped[datetime | None] = mapped_column(default=None)
    #: :class:`SiteKind`: ``local`` (from the settings) or ``network`` (``site add``).
    kind: Mapped[str] = mapped_column(String(16), default=SiteKind.local.value)
    #: :class:`SiteReach`: ``direct`` or ``tunnel``.
    reach: Mapped[str] = mapped_column(String(16), default=SiteReach.direct.value)
    #: SHA-256 of the agent's enrolment token (labgate.security.hash_token); None: revoked.
    token_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    token_issued_at: Mapped[datetime | None] = mapped_column(default=None)
    #: What the connected agent said of itself: version, and hostname, tools, snapshot kind.
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    agent_info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Set while an agent is connected (since when), None otherwise.
    connected_at: Mapped[datetime | None] = mapped_column(default=None)
    #: When the last agent connection ended.
    disconnected_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The epoch of the agent's current connection (tunneled sites): the routers of every
    #: portal take its tunnel tickets (labgate.portal.tunnel_routers). None: no tunnel.
    tunnel_epoch: Mapped[str | None] = mapped_column(String(32), default=None)


class Instance(Base):
    """One running tool for one owner."""

    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_owner_state", "owner_id", "state"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    tool: Mapped[str] = mapped_column(String(64))
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"), default=None)
    state: Mapped[InstanceState] = mapped_column(
        Enum(InstanceState, native_enum=False, length=16), default=InstanceState.pending, index=True
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    resources: Mapped[dict[str, Any]] = mapped_column(default=dict)
    backend_state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    endpoint: Mapped[str] = mapped_column(String(255), default="")
    #: Sealed (labgate.security.SecretBox): the secret itself is never stored.
    secret: Mapped[str] = mapped_column(String(128), default="")
    #: The dataset the instance was launched with, if any. Not a foreign key: adding one
    #: to this table on SQLite means rebuilding it; deleting a dataset clears it instead.
    dataset_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    #: What is mounted: ``[{"dataset", "source", "target", "read_only"}]``, fixed at launch.
    mounts: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    #: What the user chose among its site's allowed values (a Slurm partition, wall time).
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    ready_at: Mapped[datetime | None] = mapped_column(default=None)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    #: The snapshot this instance was launched from, if any. A plain column (see
    #: migration 0003); it outlives the snapshot, which then reads as None.
    snapshot_id: Mapped[str | None] = mapped_column(String(32), default=None)
    #: The container image the launch chose from its tool's allowlist; "" the tool's own
    #: (migration 0007).
    image: Mapped[str] = mapped_column(String(512), default="", server_default="")
    #: ``tool@site`` while the instance waits, unclaimed, in a warm pool (migration 0004).
    pool: Mapped[str | None] = mapped_column(String(130), default=None, index=True)
    #: A warm-pool instance's number, from the counter ``pool_uid`` (migration 0014): the
    #: process backend runs it as a uid of its own (labgate.backends.identity), no other
    #: instance's, before and after its claim. None: not started for a pool.
    pool_uid: Mapped[int | None] = mapped_column(BigInteger, default=None, index=True, unique=True)
    #: The owner asked that idle culling spare the instance until then.
    keep_alive_until: Mapped[datetime | None] = mapped_column(default=None)
    #: Last "busy" report of the tool itself, or the claim from a warm pool.
    last_activity_at: Mapped[datetime | None] = mapped_column(default=None)
    #: The launch parameters' checked values, by name (migration 0008, labgate.tools.params).
    params: Mapped[dict[str, str]] = mapped_column(JSON, default=dict, server_default="{}")
    #: Counts the row's updates (migration 0009): an update made from an older read
    #: fails and its transaction runs again (``Database.transact``), so no state is lost.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    __mapper_args__ = {"version_id_col": version}

    owner: Mapped[User] = relationship()
    site: Mapped[Site | None] = relationship()
    snapshot: Mapped[Snapshot | None] = relationship(
        primaryjoin="foreign(Instance.snapshot_id) == Snapshot.id", lazy="joined", viewonly=True
    )
    events: Mapped[list[InstanceEvent]] = relationship(
        back_populates="instance", cascade="all, delete-orphan", order_by="InstanceEvent.id"
    )

    @property
    def site_name(self) -> str | None:
        """The name of the instance's site (None: it has none)."""
        return self.site.name if self.site is not None else None


def with_owner_and_site() -> tuple[Any, ...]:
    """Loader options for a list of instances whose owners and sites are read.

    Two queries for the whole list rather than two per instance.
    """
    return (selectinload(Instance.owner), selectinload(Instance.site))


class InstanceEvent(Base):
    """A transition or progress note of an instance; the source of its event stream."""

    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: ``state`` for transitions, ``progress`` for notes on the way.
    kind: Mapped[str] = mapped_column(String(16), default="state")
    state: Mapped[InstanceState] = mapped_column(Enum(InstanceState, native_enum=False, length=16))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)

    instance: Mapped[Instance] = relationship(back_populates="events")


class Dataset(Base):
    """A registered identifier (DOI, Handle, ARK, URN, URL) and its metadata."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The canonical form (``labgate.resolver.identifiers``): one row per dataset.
    identifier: Mapped[str] = mapped_column(String(2048), unique=True)
    scheme: Mapped[str] = mapped_column(String(8))
    #: Short name: the dataset is mounted at ``/data/<name>``.
    name: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(500), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    license: Mapped[str] = mapped_column(String(200), default="")
    landing_page: Mapped[str] = mapped_column(String(2048), default="")
    #: ``<algorithm>:<hex digest>`` of the content a URL dataset fetches, when known.
    checksum: Mapped[str] = mapped_column(String(200), default="")
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Replica(Base):
    """A copy of a dataset on a site: a path under the site's data root (or cache)."""

    __tablename__ = "replicas"
    __table_args__ = (
        UniqueConstraint("dataset_id", "site_id", name="uq_replicas_dataset_site"),
        Index("ix_replicas_site_reported", "site_id", "reported_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    checksum: Mapped[str] = mapped_column(String(200), default="")
    verified_at: Mapped[datetime | None] = mapped_column(default=None)
    #: ``registered`` (API), ``inventory`` (a site's push) or ``cache`` (fetched by labgate).
    source: Mapped[str] = mapped_column(String(16), default="registered")
    #: When the replica was last registered or reported; an inventory push prunes older ones.
    reported_at: Mapped[datetime] = mapped_column(default=utcnow)


class SiteReport(Base):
    """A site's last inventory push: the heartbeat that keeps its replicas live."""

    __tablename__ = "site_reports"

    site_id: Mapped[int] = mapped_column(
        ForeignKey("sites.id", ondelete="CASCADE"), primary_key=True
    )
    #: When the last complete push ended; replicas go stale ``ttl`` seconds later.
    reported_at: Mapped[datetime | None] = mapped_column(default=None)
    ttl: Mapped[int] = mapped_column(Integer, default=0)
    replicas: Mapped[int] = mapped_column(Integer, default=0)
    reporter: Mapped[str] = mapped_column(String(64), default="")
    #: The push under way (several requests) and when it began.
    push_id: Mapped[str] = mapped_column(String(64), default="")
    push_started_at: Mapped[datetime | None] = mapped_column(default=None)


class SnapshotState(enum.StrEnum):
    """Where a snapshot is: being saved, usable, failed (with a reason), or missing.

    ``missing``: it was ready, but its image (or archive) is no longer where it
    was stored; it is ready again if the data comes back.
    """

    saving = "saving"
    ready = "ready"
    failed = "failed"
    missing = "missing"


class Snapshot(Base):
    """A saved instance: a container image in a registry, or a workspace archive."""

    __tablename__ = "snapshots"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    #: The tool of the instance it was taken from; launches start that tool.
    tool: Mapped[str] = mapped_column(String(64))
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id"), default=None)
    backend: Mapped[str] = mapped_column(String(64))
    #: ``image`` or ``archive``.
    kind: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[SnapshotState] = mapped_column(
        Enum(SnapshotState, native_enum=False, length=16), default=SnapshotState.saving
    )
    reason: Mapped[str] = mapped_column(Text, default="")
    #: Image reference (``registry/repo:tag``) or archive file name.
    reference: Mapped[str] = mapped_column(String(512), default="")
    digest: Mapped[str] = mapped_column(String(128), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    source_instance_id: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column(default=None)

    owner: Mapped[User] = relationship()
    site: Mapped[Site | None] = relationship()
    shares: Mapped[list[SnapshotShare]] = relationship(
        back_populates="snapshot", cascade="all, delete-orphan"
    )


class SnapshotShare(Base):
    """A user another user's snapshot is shared with: they may see and launch it."""

    __tablename__ = "snapshot_shares"

    snapshot_id: Mapped[str] = mapped_column(
        ForeignKey("snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    snapshot: Mapped[Snapshot] = relationship(back_populates="shares")
    user: Mapped[User] = relationship()


class LimitColumns:
    """Quota columns shared by groups and users; None means "no limit of its own"."""

    max_instances: Mapped[int | None] = mapped_column(Integer, default=None)
    max_cpu: Mapped[float | None] = mapped_column(Float, default=None)
    max_memory: Mapped[int | None] = mapped_column(BigInteger, default=None)
    #: Core-hours per calendar month (UTC).
    max_core_hours: Mapped[float | None] = mapped_column(Float, default=None)


class Group(LimitColumns, Base):
    """A set of users with limits on what its members use together."""

    __tablename__ = "groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    #: Seconds an instance charged to the group may run; None: no limit of its own.
    max_lifetime: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[GroupMember]] = relationship(
        back_populates="group", cascade="all, delete-orphan"
    )


class GroupMember(Base):
    """A user in a group."""

    __tablename__ = "group_members"

    group_id: Mapped[int] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    group: Mapped[Group] = relationship(back_populates="members")
    user: Mapped[User] = relationship()


class UserLimits(LimitColumns, Base):
    """Limits of one user that replace the settings' defaults."""

    __tablename__ = "user_limits"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )


class UsageRecord(Base):
    """Who used what, where and for how long: one per instance and owner.

    Names are copied, not referenced, so the record outlives users, groups and
    sites. A warm-pool instance has one record for its time in the pool and one
    from its claim on.
    """

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_started_stopped", "started_at", "stopped_at"),
        # What a user or group holds now: their open records, not all they ever had.
        Index("ix_usage_records_user_open", "user_id", "stopped_at"),
        Index("ix_usage_records_group_open", "group_name", "stopped_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), default=None, index=True
    )
    user_name: Mapped[str] = mapped_column(String(64))
    group_name: Mapped[str] = mapped_column(String(64), default="", index=True)
    tool: Mapped[str] = mapped_column(String(64))
    site: Mapped[str] = mapped_column(String(64), default="")
    cpu: Mapped[float] = mapped_column(Float, default=0.0)
    memory: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(default=None)
    #: Why it ended: ``stopped`` (by a person), ``idle``, ``lifetime``, ``failed``, ``lost``,
    #: ``claimed`` (a pool record handed over), ``deleted``...
    reason: Mapped[str] = mapped_column(String(32), default="")


class ExternalIdentity(Base):
    """A user's account at an identity provider, by the provider's stable subject."""

    __tablename__ = "identities"
    __table_args__ = (
        UniqueConstraint("provider", "subject", name="uq_identities_provider_subject"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: The provider's configured name (``identity_providers``).
    provider: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(255))
    #: The e-mail address the provider gave at the last sign-in (information only).
    email: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(default=None)

    user: Mapped[User] = relationship()


class ShareAccess(enum.StrEnum):
    """What a share gives."""

    #: See the instance in lists, its state, events and logs.
    view = "view"
    #: All of view, and reach the tool through the router.
    use = "use"


class ShareLink(Base):
    """A link giving ``use`` of an instance to whoever signs in with it; its hash is kept."""

    __tablename__ = "share_links"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), default="")
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class InstanceShare(Base):
    """An instance shared with a user or a group (exactly one of the two)."""

    __tablename__ = "instance_shares"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), default=None, index=True
    )
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), default=None, index=True
    )
    #: :class:`ShareAccess`.
    access: Mapped[str] = mapped_column(String(8), default=ShareAccess.view.value)
    #: The share link it came from, if any: revoking the link removes it.
    link_id: Mapped[int | None] = mapped_column(
        ForeignKey("share_links.id", ondelete="CASCADE"), default=None, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User | None] = relationship()
    group: Mapped[Group | None] = relationship()


class InstanceVisit(Base):
    """Who reached an instance through the router, and when last (the owner's access log)."""

    __tablename__ = "instance_visits"

    instance_id: Mapped[str] = mapped_column(
        ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    first_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_at: Mapped[datetime] = mapped_column(default=utcnow)


class TunnelRouter(Base):
    """A router tunneled sites' agents dial, while its route stream is open (``seen_at`` fresh).

    Written by the portal whose route stream the router follows
    (:mod:`labgate.portal.tunnel_routers`); ``url`` is the router's
    ``router_tunnel_url`` (or its listen address).
    """

    __tablename__ = "tunnel_routers"

    url: Mapped[str] = mapped_column(String(255), primary_key=True)
    replica: Mapped[str] = mapped_column(String(200), default="")
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class LeaderLease(Base):
    """Who leads the portal replicas sharing this database, until when (``labgate portal``).

    One row per lease (``scheduler``: the loops that run once). ``term`` goes up
    by one each time another replica takes the lease; it fences actions of an
    old leader (:mod:`labgate.scheduler.leader`).
    """

    __tablename__ = "leader_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200), default="")
    term: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime] = mapped_column(default=utcnow)


class Counter(Base):
    """A number that only goes up, shared by every portal replica (migration 0014).

    ``pool_uid``: the last number given to a warm-pool instance
    (:func:`labgate.db.counters.take`); none is given twice, not after a stop, a
    restart, or on another replica.
    """

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)
