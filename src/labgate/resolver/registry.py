"""The dataset registry in the database: register, update, search, delete, replicas.

Functions take an open :class:`~sqlalchemy.orm.Session` and leave committing to
the caller (the portal commits once per request). Identifiers are always
stored in their canonical form (:mod:`labgate.resolver.identifiers`), so a
lookup is one probe of the unique index, whatever spelling was given.
"""

from __future__ import annotations

import contextlib
import posixpath
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, func, or_, select, update
from sqlalchemy.orm import Session

from labgate.backends.confine import EscapesRoot, check_beneath
from labgate.db.models import Dataset, Instance, Replica, Site, utcnow
from labgate.errors import BadRequest, Conflict, NotFound
from labgate.resolver.identifiers import Identifier, InvalidIdentifier, normalize
from labgate.resolver.schemas import DatasetIn, DatasetPatch, ReplicaIn

#: How a replica came to be known.
REGISTERED, INVENTORY, CACHE = "registered", "inventory", "cache"


def parse_identifier(text: str) -> Identifier:
    """The canonical identifier, or a 400 ``invalid_identifier`` naming the reason."""
    try:
        return normalize(text)
    except InvalidIdentifier as exc:
        raise BadRequest(
            f"{text[:200]!r} is not a valid identifier: {exc.reason}", code="invalid_identifier"
        ) from None


def find_dataset(session: Session, identifier: Identifier) -> Dataset | None:
    """The dataset registered under ``identifier``, if any."""
    return session.scalar(select(Dataset).where(Dataset.identifier == identifier.canonical))


def require_dataset(session: Session, text: str) -> Dataset:
    """The dataset ``text`` names; 400 when it is no identifier, 404 when unregistered."""
    identifier = parse_identifier(text)
    dataset = find_dataset(session, identifier)
    if dataset is None:
        raise NotFound(
            f"no dataset {identifier.canonical!r} is registered here", code="unknown_dataset"
        )
    return dataset


def require_site(session: Session, name: str) -> Site:
    """The site called ``name``; 404 ``unknown_site`` otherwise."""
    site = session.scalar(select(Site).where(Site.name == name))
    if site is None:
        raise NotFound(f"no site called {name!r}", code="unknown_site")
    return site


def clean_path(path: str) -> str:
    """A replica path: relative, normalized, inside its root; 400 otherwise."""
    if "\0" in path or "\\" in path:
        raise BadRequest(f"replica path {path!r} contains a NUL or a backslash")
    if path.startswith("/"):
        raise BadRequest(f"replica path {path!r} must be relative to the site's data root")
    normalized = posixpath.normpath(path)
    if normalized in (".", "") or normalized == ".." or normalized.startswith("../"):
        raise BadRequest(f"replica path {path!r} must name something inside the data root")
    return normalized


def check_on_site(site: Site, path: str) -> None:
    """Refuse (400 ``bad_replica_path``) a clean ``path`` that is missing or leaves the root.

    The path is opened on the site's file system below its data root, with no
    symbolic link followed (:mod:`labgate.backends.confine`); the text checks
    of :func:`clean_path` come first.
    """
    root = (site.options or {}).get("data_root")
    if not root:
        return
    try:
        check_beneath(Path(root), path)
    except EscapesRoot as exc:
        raise BadRequest(f"replica on site {site.name!r}: {exc}", code="bad_replica_path") from None


# --- datasets ------------------------------------------------------------------------


def register(session: Session, owner_id: int | None, body: DatasetIn) -> Dataset:
    """Record a new dataset (and its replicas); 409 ``dataset_exists`` if it is known."""
    identifier = parse_identifier(body.id)
    if find_dataset(session, identifier) is not None:
        raise Conflict(
            f"{identifier.canonical!r} is already registered; update it instead",
            code="dataset_exists",
        )
    dataset = Dataset(
        identifier=identifier.canonical,
        scheme=identifier.scheme,
        name=body.name or identifier.slug,
        title=body.title,
        description=body.description,
        size=body.size,
        license=body.license,
        landing_page=body.landing_page or identifier.resolver_url or "",
        checksum=body.checksum,
        owner_id=owner_id,
    )
    session.add(dataset)
    session.flush()
    for replica in body.replicas:
        put_replica(session, dataset, replica.site, replica)
    return dataset


def update_dataset(session: Session, dataset: Dataset, patch: DatasetPatch) -> Dataset:
    """Change the metadata fields ``patch`` sets."""
    for name, value in patch.model_dump(exclude_unset=True).items():
        if value is None and name not in ("size",):
            continue
        setattr(dataset, name, value)
    dataset.updated_at = utcnow()
    session.flush()
    return dataset


def delete_dataset(session: Session, dataset: Dataset) -> None:
    """Forget a dataset and its replicas; instances keep the identifier in their mounts."""
    session.execute(
        update(Instance).where(Instance.dataset_id == dataset.id).values(dataset_id=None)
    )
    session.execute(delete(Replica).where(Replica.dataset_id == dataset.id))
    session.delete(dataset)
    session.flush()


def search(
    session: Session,
    *,
    query: str | None = None,
    site: str | None = None,
    scheme: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Dataset], int]:
    """Datasets matching all the filters, by identifier, with the total count.

    ``query`` matches a substring of the identifier, title or name,
    case-insensitively; a query that is itself a valid identifier also matches
    its canonical form (so any spelling of a DOI finds it).
    """
    stmt: Select[Any] = select(Dataset)
    if query:
        needle = f"%{_escape_like(query.lower())}%"
        terms: list[ColumnElement[bool]] = [
            func.lower(Dataset.identifier).like(needle, escape="\\"),
            func.lower(Dataset.title).like(needle, escape="\\"),
            Dataset.name.like(needle, escape="\\"),
        ]
        with contextlib.suppress(InvalidIdentifier):
            terms.append(Dataset.identifier == normalize(query).canonical)
        stmt = stmt.where(or_(*terms))
    if scheme:
        stmt = stmt.where(Dataset.scheme == scheme)
    if site:
        held = select(Replica.dataset_id).join(Site, Replica.site_id == Site.id)
        stmt = stmt.where(Dataset.id.in_(held.where(Site.name == site)))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(Dataset.identifier).limit(limit).offset(offset))
    return list(rows), total


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# --- replicas ------------------------------------------------------------------------


def put_replica(
    session: Session,
    dataset: Dataset,
    site_name: str,
    body: ReplicaIn,
    *,
    source: str = REGISTERED,
    now: datetime | None = None,
) -> Replica:
    """Add or replace the replica of ``dataset`` on a site."""
    site = require_site(session, site_name)
    if source != CACHE and not (site.options or {}).get("data_root"):
        raise Conflict(
            f"site {site.name!r} has no data_root, so it cannot hold replicas; "
            "set data_root in its [[sites]] settings",
            code="no_data_root",
        )
    path = clean_path(body.path)
    if source != CACHE:
        check_on_site(site, path)
    replica = session.scalar(
        select(Replica).where(Replica.dataset_id == dataset.id, Replica.site_id == site.id)
    )
    if replica is None:
        replica = Replica(dataset_id=dataset.id, site_id=site.id, path=path)
        session.add(replica)
    replica.path = path
    replica.size = body.size
    replica.checksum = body.checksum
    replica.verified_at = body.verified_at
    replica.source = source
    replica.reported_at = now or utcnow()
    session.flush()
    return replica


def remove_replica(session: Session, dataset: Dataset, site_name: str) -> None:
    """Forget the replica of ``dataset`` on a site; 404 when there is none."""
    site = require_site(session, site_name)
    removed = session.execute(
        delete(Replica).where(Replica.dataset_id == dataset.id, Replica.site_id == site.id)
    )
    if not getattr(removed, "rowcount", 0):
        raise NotFound(
            f"{dataset.identifier!r} has no replica on site {site_name!r}", code="unknown_replica"
        )
