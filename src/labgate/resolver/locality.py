"""Where a dataset can be used: resolve, and what a launch near the data needs.

A replica is **live** when its site is live (the portal has a link to it),
its site's inventory is not stale (a site that pushes inventories and has not
done so within the TTL of its last push is stale; a site that never pushed is
trusted for what was registered on it), and it can be mounted (its site has a
data root, or it is in labgate's cache).

A launch with a dataset runs where a live replica is. When there is none, a
URL dataset no larger than ``dataset_fetch_max_bytes`` is fetched into the
chosen site's cache first (:meth:`DataLocator.prepare`, between admission and
start, with progress events); anything else is a 409 naming where the data
lives and why it cannot be used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from labgate.agent import fetch as fetching
from labgate.backends.confine import EscapesRoot, check_beneath
from labgate.db.models import Dataset, Instance, InstanceState, Replica, Site, SiteReport, User
from labgate.db.models import utcnow as _utcnow
from labgate.errors import Conflict, LabgateError, NotFound
from labgate.resolver.identifiers import normalize, short_hash
from labgate.resolver.registry import CACHE, parse_identifier
from labgate.resolver.schemas import DatasetOut, LaunchLink, ReplicaOut
from labgate.wire.launch import FetchRequest
from labgate.wire.site import Report

if TYPE_CHECKING:
    from labgate.agent.link import SiteLink
    from labgate.config import Settings
    from labgate.db.session import Database
    from labgate.tools.catalog import Catalog, Tool

log = logging.getLogger(__name__)

DATA_MOUNT_ROOT = "/data"
#: How long whether a tool can run on a site is remembered (a check may search PATH).
TOOL_CHECK_TTL = 30.0
Reporter = Callable[[Report], Awaitable[None]]

# The resolve path's two queries, built once: Core statements on the tables (no ORM
# objects to build), the second one with an expanding IN so a page of datasets is
# one query too. See benchmarks/resolver.py.
_datasets, _users = Dataset.__table__, User.__table__
_replicas, _sites, _reports = Replica.__table__, Site.__table__, SiteReport.__table__
DATASET_QUERY = (
    select(_datasets, _users.c.name.label("owner"))
    .select_from(_datasets.outerjoin(_users, _datasets.c.owner_id == _users.c.id))
    .where(_datasets.c.identifier == bindparam("identifier"))
)
REPLICAS_QUERY = (
    select(
        _replicas,
        _sites.c.name.label("site"),
        _sites.c.options.label("site_options"),
        _reports.c.reported_at.label("site_reported_at"),
        _reports.c.ttl.label("site_ttl"),
    )
    .select_from(
        _replicas.join(_sites, _replicas.c.site_id == _sites.c.id).outerjoin(
            _reports, _reports.c.site_id == _replicas.c.site_id
        )
    )
    .where(_replicas.c.dataset_id.in_(bindparam("ids", expanding=True)))
    .order_by(_sites.c.name)
)


class DatasetLike(Protocol):
    """A dataset row: the ORM object, or the plain row the resolve path reads."""

    @property
    def id(self) -> int: ...
    @property
    def identifier(self) -> str: ...
    @property
    def scheme(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def title(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def size(self) -> int | None: ...
    @property
    def license(self) -> str: ...
    @property
    def landing_page(self) -> str: ...
    @property
    def checksum(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...


@dataclass(frozen=True)
class ReplicaView:
    """A replica and whether it can be used now."""

    site: str
    path: str
    size: int | None
    checksum: str
    verified_at: datetime | None
    source: str
    reported_at: datetime
    #: Host path to mount, when the site's data root (or cache) is known.
    mount_source: str | None
    reason: str | None = None
    #: The directory ``mount_source`` must stay inside: the data root or the site's cache.
    mount_root: str | None = None

    @property
    def live(self) -> bool:
        """Usable for placement now."""
        return self.reason is None

    def out(self) -> ReplicaOut:
        """The API view."""
        return ReplicaOut(
            site=self.site,
            path=self.path,
            size=self.size,
            checksum=self.checksum,
            verified_at=self.verified_at,
            source=self.source,
            reported_at=self.reported_at,
            live=self.live,
            reason=self.reason,
        )


@dataclass
class Resolution:
    """A dataset, its replicas (live or not), and whether it can be fetched."""

    dataset: DatasetLike
    owner: str | None
    replicas: list[ReplicaView]
    #: Why it cannot be fetched into a cache; None when it can.
    fetch_refusal: str | None

    @property
    def live(self) -> list[ReplicaView]:
        """The replicas placement may use."""
        return [r for r in self.replicas if r.live]

    def explain(self) -> str:
        """Where the data lives and why none of it can be used (for a 409)."""
        ident = self.dataset.identifier
        if self.replicas:
            where = "; ".join(f"site {r.site}: {r.reason}" for r in self.replicas if not r.live)
            text = f"{ident} has no live replica ({where})"
        else:
            text = f"{ident} has no replica on any site"
        return f"{text}, and it cannot be fetched: {self.fetch_refusal}"


@dataclass(frozen=True)
class DataNeed:
    """What placement and the mount of one launch need to know of its dataset."""

    dataset_id: int
    identifier: str
    name: str
    #: Sites with a live replica, and the host path to mount there.
    holders: dict[str, str]
    #: Set when no site holds it and it will be fetched into the chosen site's cache.
    fetch: dict[str, Any] | None = None
    #: Per holder, the directory its mount source must stay inside (checked at mount time).
    roots: dict[str, str] = field(default_factory=dict)

    def mount_on(self, site: str) -> dict[str, Any]:
        """The instance's mount record for a launch on ``site``."""
        mount: dict[str, Any] = {
            "dataset": self.identifier,
            "site": site,
            "source": self.holders.get(site, ""),
            "root": self.roots.get(site, ""),
            "target": f"{DATA_MOUNT_ROOT}/{self.name}",
            "read_only": True,
        }
        if self.fetch is not None and site not in self.holders:
            mount["fetch"] = self.fetch
        return mount


def _confined(view: ReplicaView) -> ReplicaView:
    """``view``, not live when its path is missing or leaves its root on the file system now.

    Registration checked the path already; this catches a link swapped in
    since, so placement skips the replica and the user is told why. The
    backend checks once more when it mounts (and binds what it opened).
    """
    if not view.live or view.mount_root is None:
        return view
    try:
        check_beneath(Path(view.mount_root), view.path)
    except EscapesRoot as exc:
        return replace(view, reason=f"refused: {exc}")
    return view


class DataLocator:
    """Resolves datasets to live replicas and prepares the mounts of launches."""

    def __init__(self, settings: Settings) -> None:
        self.default_ttl = settings.site_report_ttl
        self.fetch_max_bytes = settings.dataset_fetch_max_bytes
        self.allow_private = settings.dataset_fetch_private_networks
        self.cache_root = (settings.data_dir / "cache").resolve()
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._tool_checks: dict[tuple[str, str], tuple[bool, float]] = {}

    # --- resolve -------------------------------------------------------------------
    def resolve(
        self, session: Session, text: str, live: Collection[str], now: datetime | None = None
    ) -> Resolution:
        """The dataset ``text`` names with its replicas; 400 or 404 when there is none."""
        identifier = parse_identifier(text)
        row = session.execute(DATASET_QUERY, {"identifier": identifier.canonical}).first()
        if row is None:
            raise NotFound(
                f"no dataset {identifier.canonical!r} is registered here", code="unknown_dataset"
            )
        dataset: DatasetLike = row  # the Row has the columns
        replicas = self.replicas_of(session, [dataset.id], live, now).get(dataset.id, [])
        return Resolution(dataset, row.owner, replicas, self.fetch_refusal(dataset))

    def replicas_of(
        self,
        session: Session,
        dataset_ids: Iterable[int],
        live: Collection[str],
        now: datetime | None = None,
    ) -> dict[int, list[ReplicaView]]:
        """Replicas per dataset id, each with why it is not live (if it is not)."""
        ids = list(dataset_ids)
        out: dict[int, list[ReplicaView]] = {i: [] for i in ids}
        if not ids:
            return out
        now = now or _utcnow()
        for replica in session.execute(REPLICAS_QUERY, {"ids": ids}):
            site, reported_at = replica.site, replica.site_reported_at
            root = (replica.site_options or {}).get("data_root")
            if replica.source == CACHE:
                # Where the site keeps it (older records: an entry of the portal's cache).
                cached = Path(replica.path)
                if not cached.is_absolute():
                    cached = self.cache_root / site / cached
                root = str(cached.parent)
                source: str | None = str(cached)
                reported_at = None  # labgate's own copy: the site's inventory does not cover it
            else:
                source = str(Path(root) / replica.path) if root else None
            reason = self._unusable(site, live, source, reported_at, replica.site_ttl, now)
            out[replica.dataset_id].append(
                ReplicaView(
                    site=site,
                    path=replica.path,
                    size=replica.size,
                    checksum=replica.checksum,
                    verified_at=replica.verified_at,
                    source=replica.source,
                    reported_at=replica.reported_at,
                    mount_source=source,
                    reason=reason,
                    mount_root=root if source else None,
                )
            )
        return out

    @staticmethod
    def _unusable(
        site: str,
        live: Collection[str],
        source: str | None,
        reported_at: datetime | None,
        ttl: int | None,
        now: datetime,
    ) -> str | None:
        if site not in live:
            return "the site is not connected to this labgate"
        if reported_at is not None and ttl and reported_at + timedelta(seconds=ttl) < now:
            return (
                f"stale: the site's last inventory was at {reported_at:%Y-%m-%d %H:%M} UTC "
                f"and was valid for {ttl} s"
            )
        if source is None:
            return "the site has no data_root"
        return None

    @staticmethod
    def is_registered(session: Session, canonical: str) -> bool:
        """Whether a dataset with this canonical identifier is registered."""
        found = session.scalar(select(Dataset.id).where(Dataset.identifier == canonical))
        return found is not None

    def fetch_refusal(self, dataset: DatasetLike) -> str | None:
        """Why ``dataset`` cannot be fetched into a cache, or None when it can."""
        if dataset.scheme != "url":
            return f"it is a {dataset.scheme.upper()}, not a URL labgate could download"
        if not self.fetch_max_bytes:
            return "fetching is turned off (dataset_fetch_max_bytes = 0)"
        if dataset.size is not None and dataset.size > self.fetch_max_bytes:
            return (
                f"it is {dataset.size} bytes, over the fetch limit of {self.fetch_max_bytes} "
                "(dataset_fetch_max_bytes)"
            )
        return None

    def dataset_out(self, resolution: Resolution) -> DatasetOut:
        """The API view of a resolved dataset."""
        return dataset_out(resolution.dataset, resolution.owner, resolution.replicas)

    # --- launch --------------------------------------------------------------------
    def need(self, session: Session, text: str, live: Collection[str]) -> DataNeed:
        """What a launch with dataset ``text`` needs; 409 when it cannot be used anywhere."""
        resolution = self.resolve(session, text, live)
        resolution.replicas = [_confined(r) for r in resolution.replicas]
        dataset = resolution.dataset
        holders = {r.site: r.mount_source for r in resolution.live if r.mount_source}
        roots = {r.site: r.mount_root for r in resolution.live if r.mount_root}
        fetch = None
        if not holders:
            if resolution.fetch_refusal is not None:
                raise Conflict(
                    resolution.explain(),
                    code="dataset_unavailable",
                    replicas=[r.out().model_dump(mode="json") for r in resolution.replicas],
                )
            fetch = {
                "url": dataset.identifier,
                "size": dataset.size,
                "checksum": dataset.checksum,
            }
        return DataNeed(
            dataset_id=dataset.id,
            identifier=dataset.identifier,
            name=dataset.name,
            holders=holders,
            fetch=fetch,
            roots=roots,
        )

    async def prepare(
        self,
        db: Database,
        instance_id: str,
        report: Reporter,
        links: Mapping[str, SiteLink],
    ) -> bool:
        """Have the chosen site fetch what a pending instance's mounts still lack.

        False when that failed (the instance is failed, with why). The site
        fetches into its own cache and checks the data there
        (:meth:`~labgate.agent.link.SiteLink.fetch_dataset`); the portal
        records where it is.
        """

        def load(session: Session) -> tuple[list[dict[str, Any]], str | None, int | None]:
            instance = session.get(Instance, instance_id)
            if instance is None or instance.state != InstanceState.pending:
                return [], None, None
            site = session.get(Site, instance.site_id) if instance.site_id else None
            return list(instance.mounts or []), site.name if site else None, instance.dataset_id

        mounts, site, dataset_id = await asyncio.to_thread(_in_session, db, load)
        if site is None or not any(m.get("fetch") for m in mounts):
            return True
        updated = []
        for mount in mounts:
            if mount.get("fetch") and dataset_id is not None:
                try:
                    fetched = await self._fetch_once(
                        db, links.get(site), site, dataset_id, mount, instance_id, report
                    )
                except fetching.FetchError as exc:
                    await report(Report(instance_id, "failed", message=exc.detail))
                    return False
                mount = {k: v for k, v in mount.items() if k != "fetch"}
                mount |= {"source": str(fetched.directory), "root": str(fetched.directory.parent)}
            updated.append(mount)

        def save(session: Session) -> None:
            instance = session.get(Instance, instance_id)
            if instance is not None and instance.state == InstanceState.pending:
                instance.mounts = updated

        await asyncio.to_thread(_in_session, db, save)
        return True

    async def _fetch_once(
        self,
        db: Database,
        link: SiteLink | None,
        site: str,
        dataset_id: int,
        mount: dict[str, Any],
        instance_id: str,
        report: Reporter,
    ) -> fetching.Fetched:
        """The site's cache entry of the dataset, fetched there unless another launch has."""
        if link is None:
            raise fetching.FetchError(f"site {site} is gone")
        lock = self._locks.setdefault((site, dataset_id), asyncio.Lock())
        async with lock:
            plan = mount["fetch"]
            identifier = normalize(plan["url"])
            request = FetchRequest(
                instance_id=instance_id,
                url=plan["url"],
                entry=f"{identifier.slug}-{short_hash(identifier.canonical)}",
                max_bytes=self.fetch_max_bytes,
                expected_size=plan.get("size"),
                checksum=plan.get("checksum") or "",
                allow_private=self.allow_private,
            )
            try:
                fetched = await link.fetch_dataset(request)
            except fetching.FetchError:
                raise
            except LabgateError as exc:
                raise fetching.FetchError(f"site {site} could not fetch it: {exc.detail}") from None
            if fetched.cached:
                return fetched
            await asyncio.to_thread(
                _in_session, db, lambda s: _record_cache(s, site, dataset_id, fetched)
            )
            check = "checksum verified" if fetched.verified else f"recorded {fetched.checksum}"
            await report(
                Report(
                    instance_id,
                    "pending",
                    kind="progress",
                    message=f"fetched {_mib(fetched.size)} into site {site}'s cache; {check}",
                    data={"fetch": {"bytes": fetched.size, "checksum": fetched.checksum}},
                )
            )
            return fetched

    # --- launch links --------------------------------------------------------------
    def launch_links(
        self,
        resolution: Resolution,
        catalog: Catalog,
        sites: Mapping[str, Callable[[Tool], str | None]],
        public_url: str,
    ) -> list[LaunchLink]:
        """Per tool that can open the dataset: the sites it would run on and its link.

        ``sites`` are the sites with a link, each with its answer to "why can this
        tool not run here" (:meth:`~labgate.agent.link.SiteLink.placement_reason`).
        """
        if resolution.live:
            candidates = [r.site for r in resolution.live]
        elif resolution.fetch_refusal is None:
            candidates = sorted(sites)
        else:
            return []
        links = []
        for tool in catalog:
            usable = [s for s in candidates if s in sites and self._can_run(tool, s, sites[s])]
            if usable:
                links.append(
                    LaunchLink(
                        tool=tool.name,
                        title=tool.title,
                        url=launch_url(public_url, resolution.dataset.identifier, tool.name),
                        sites=usable,
                    )
                )
        return links

    def _can_run(self, tool: Tool, site: str, reason: Callable[[Tool], str | None]) -> bool:
        """Whether ``tool`` runs on ``site``, remembered for a while (a check may search PATH)."""
        key, now = (tool.name, site), time.monotonic()
        known = self._tool_checks.get(key)
        if known is None or known[1] < now:
            known = (reason(tool) is None, now + TOOL_CHECK_TTL)
            self._tool_checks[key] = known
        return known[0]


def launch_url(public_url: str, identifier: str, tool: str, urlpath: str = "") -> str:
    """The browser link that launches ``tool`` next to the dataset (opening ``urlpath``)."""
    link = f"{public_url}/launch?dataset={quote(identifier, safe=':/')}&tool={quote(tool)}"
    if urlpath:
        link += f"&urlpath={quote(urlpath, safe='/{}')}"
    return link


MAX_URLPATH = 1024


class BadUrlPath(ValueError):
    """A ``urlpath`` that could lead out of the instance's own URL."""


def clean_urlpath(text: str) -> str:
    """A path inside the tool (Binder's ``urlpath``): relative, no ``..``, no control characters.

    A leading ``/`` is dropped; the result is appended to ``/i/<instance id>/``,
    so it can never name another origin or another instance. ``{dataset}`` may
    stand for the launched dataset's name.
    """
    path = text.strip().lstrip("/")
    if len(path) > MAX_URLPATH:
        raise BadUrlPath(f"urlpath is longer than {MAX_URLPATH} characters")
    decoded = unquote(path)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in decoded) or "\\" in decoded:
        raise BadUrlPath("urlpath must not contain control characters or backslashes")
    segments = decoded.split("?", 1)[0].split("#", 1)[0].split("/")
    if any(segment in ("..", ".") for segment in segments) or decoded.startswith("/"):
        raise BadUrlPath("urlpath must stay inside the tool: no '.' or '..' segments")
    return path


def open_url(base: str, urlpath: str, dataset: str = "") -> str:
    """``base`` (an instance's URL, ending in /) with ``urlpath`` opened in it."""
    if not urlpath:
        return base
    return base + urlpath.replace("{dataset}", quote(dataset, safe=""))


def dataset_out(
    dataset: DatasetLike, owner: str | None, replicas: Iterable[ReplicaView]
) -> DatasetOut:
    """The API view of a dataset."""
    ident = normalize(dataset.identifier)
    return DatasetOut(
        id=dataset.identifier,
        scheme=dataset.scheme,
        name=dataset.name,
        title=dataset.title,
        description=dataset.description,
        size=dataset.size,
        license=dataset.license,
        landing_page=dataset.landing_page,
        checksum=dataset.checksum,
        resolver_url=ident.resolver_url,
        owner=owner,
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
        replicas=[r.out() for r in replicas],
    )


def _in_session(db: Database, fn: Callable[[Session], Any]) -> Any:
    with db.session() as session:
        return fn(session)


def _record_cache(session: Session, site: str, dataset_id: int, fetched: fetching.Fetched) -> None:
    """Record the site's cache entry as a replica; its path is where the site keeps it."""
    site_id = session.scalar(select(Site.id).where(Site.name == site))
    if site_id is None:
        return
    replica = session.scalar(
        select(Replica).where(Replica.dataset_id == dataset_id, Replica.site_id == site_id)
    )
    path = str(fetched.directory)
    if replica is None:
        replica = Replica(dataset_id=dataset_id, site_id=site_id, path=path)
        session.add(replica)
    now = _utcnow()
    replica.path = path
    replica.size = fetched.size
    replica.checksum = fetched.checksum
    replica.verified_at = now
    replica.source = CACHE
    replica.reported_at = now


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
