"""A site's inventory push: the federation "push" model.

A site (its operator, or a cron job at the site) reports what it holds:
``POST /api/v1/sites/{site}/inventory`` with a list of ``{id, path, size,
checksum, verified_at}``. Large inventories are sent in parts that share a
``push`` id; the part with ``final`` set ends the push. Then:

- in ``replace`` mode (the default) the site's replicas that the push did not
  mention are removed (those in labgate's own cache excepted): the site is the
  authority on what it holds;
- the site's report time and TTL are recorded. Once ``ttl`` seconds pass
  without another complete push, every replica of the site is stale and is
  not used for placement (:mod:`labgate.resolver.locality`).

Unknown identifiers are registered on the way (owned by the reporter, titled
from the entry); entries with an invalid identifier or path are rejected one
by one, with the reason, without failing the rest. A path is invalid when it
leaves the data root as text (``..``, absolute) or on the site's file system
(missing, or through a symbolic link: :func:`~labgate.resolver.registry.check_on_site`).

The work is done with bulk statements (one ``IN`` look-up and one
``executemany`` per batch, an ``INSERT … ON CONFLICT DO UPDATE`` upsert) so
100,000 replicas take seconds on SQLite; see ``benchmarks/resolver.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from labgate.db.models import Dataset, Replica, Site, SiteReport, utcnow
from labgate.errors import BadRequest
from labgate.resolver.identifiers import InvalidIdentifier, normalize
from labgate.resolver.registry import CACHE, INVENTORY, check_on_site, clean_path

BATCH = 5000
MAX_REJECTED_LISTED = 100


@dataclass
class PushResult:
    """What one request of a push did."""

    received: int = 0
    added: int = 0
    updated: int = 0
    datasets_created: int = 0
    removed: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    rejected_count: int = 0
    replicas: int = 0
    reported_at: datetime | None = None
    ttl: int = 0

    def reject(self, identifier: str, reason: str) -> None:
        """Note an entry that was not taken (the first hundred are listed)."""
        self.rejected_count += 1
        if len(self.rejected) < MAX_REJECTED_LISTED:
            self.rejected.append((identifier[:200], reason))


@dataclass(frozen=True)
class Entry:
    """One inventory line, already checked: canonical identifier and clean path."""

    identifier: str
    scheme: str
    name: str
    path: str
    size: int | None
    checksum: str
    verified_at: datetime | None
    title: str


def push(
    session: Session,
    site: Site,
    entries: Iterable[Any],
    *,
    mode: str = "replace",
    push_id: str | None = None,
    final: bool = True,
    ttl: int,
    reporter: str,
    owner_id: int | None,
    now: datetime | None = None,
) -> PushResult:
    """Apply one request of an inventory push; see the module docstring."""
    if mode not in ("replace", "merge"):
        raise BadRequest(f"mode must be replace or merge, not {mode!r}")
    now = now or utcnow()
    result = PushResult()
    report = session.get(SiteReport, site.id)
    if report is None:
        report = SiteReport(site_id=site.id, ttl=ttl)
        session.add(report)
    if not push_id or push_id != report.push_id or report.push_started_at is None:
        report.push_id = push_id or ""
        report.push_started_at = now
    started = report.push_started_at

    checked: dict[str, Entry] = {}
    for raw in entries:
        result.received += 1
        try:
            ident = normalize(raw.id)
            path = clean_path(raw.path)
            check_on_site(site, path)
        except InvalidIdentifier as exc:
            result.reject(raw.id, exc.reason)
            continue
        except BadRequest as exc:
            result.reject(raw.id, exc.detail)
            continue
        checked[ident.canonical] = Entry(
            identifier=ident.canonical,
            scheme=ident.scheme,
            name=ident.slug,
            path=path,
            size=raw.size,
            checksum=raw.checksum or "",
            verified_at=raw.verified_at,
            title=raw.title or "",
        )
    batch = list(checked.values())
    for start in range(0, len(batch), BATCH):
        _apply_batch(session, site, batch[start : start + BATCH], now, owner_id, result)

    if final:
        if mode == "replace":
            removed = session.execute(
                delete(Replica).where(
                    Replica.site_id == site.id,
                    Replica.source != CACHE,
                    Replica.reported_at < started,
                )
            )
            result.removed = int(getattr(removed, "rowcount", 0) or 0)
        report.reported_at = now
        report.ttl = ttl
        report.reporter = reporter
        report.push_id = ""
        report.push_started_at = None
        report.replicas = (
            session.scalar(select(func.count()).where(Replica.site_id == site.id)) or 0
        )
        result.replicas = report.replicas
    else:
        result.replicas = (
            session.scalar(select(func.count()).where(Replica.site_id == site.id)) or 0
        )
    result.reported_at = report.reported_at
    result.ttl = report.ttl
    session.flush()
    return result


def _apply_batch(
    session: Session,
    site: Site,
    batch: Sequence[Entry],
    now: datetime,
    owner_id: int | None,
    result: PushResult,
) -> None:
    identifiers = [entry.identifier for entry in batch]
    known = dict(
        session.execute(
            select(Dataset.identifier, Dataset.id).where(Dataset.identifier.in_(identifiers))
        ).all()
    )
    new = [entry for entry in batch if entry.identifier not in known]
    if new:
        # Core statements on the tables: executemany, no ORM objects for 100,000 rows.
        session.execute(
            insert(Dataset),
            [
                {
                    "identifier": e.identifier,
                    "scheme": e.scheme,
                    "name": e.name,
                    "title": e.title,
                    "description": "",
                    "size": e.size,
                    "license": "",
                    "landing_page": normalize(e.identifier).resolver_url or "",
                    "checksum": "",
                    "owner_id": owner_id,
                    "created_at": now,
                    "updated_at": now,
                }
                for e in new
            ],
        )
        result.datasets_created += len(new)
        known.update(
            session.execute(
                select(Dataset.identifier, Dataset.id).where(
                    Dataset.identifier.in_([e.identifier for e in new])
                )
            ).all()
        )
    ids = [known[e.identifier] for e in batch]
    present = set(
        session.scalars(
            select(Replica.dataset_id).where(
                Replica.site_id == site.id, Replica.dataset_id.in_(ids)
            )
        )
    )
    result.added += sum(1 for i in ids if i not in present)
    result.updated += sum(1 for i in ids if i in present)
    rows = [
        {
            "dataset_id": known[e.identifier],
            "site_id": site.id,
            "path": e.path,
            "size": e.size,
            "checksum": e.checksum,
            "verified_at": e.verified_at,
            "source": INVENTORY,
            "reported_at": now,
        }
        for e in batch
    ]
    session.execute(_upsert(session), rows)


def _upsert(session: Session) -> Any:
    """``INSERT … ON CONFLICT (dataset_id, site_id) DO UPDATE`` for this database."""
    dialect = session.get_bind().dialect.name
    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(Replica.__table__)
    excluded = stmt.excluded
    return stmt.on_conflict_do_update(
        index_elements=[Replica.dataset_id, Replica.site_id],
        set_={
            "path": excluded.path,
            "size": excluded.size,
            "checksum": excluded.checksum,
            "verified_at": excluded.verified_at,
            "source": excluded.source,
            "reported_at": excluded.reported_at,
        },
    )


def report_view(report: SiteReport | None, now: datetime) -> dict[str, Any] | None:
    """A site's last push as the sites API shows it, with whether it has gone stale."""
    if report is None:
        return None
    reported = report.reported_at
    stale = bool(
        reported is not None and report.ttl and reported + timedelta(seconds=report.ttl) < now
    )
    return {
        "reported_at": reported.isoformat() if reported else None,
        "ttl": report.ttl,
        "replicas": report.replicas,
        "reporter": report.reporter,
        "stale": stale,
        "push_in_progress": bool(report.push_started_at),
    }
