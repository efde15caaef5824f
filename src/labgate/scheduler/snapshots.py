"""Snapshots: saving an instance, launching from the result, sharing and deleting it.

The portal's side of the snapshot flow. :class:`SnapshotManager` records a
``saving`` snapshot, asks the instance's site to save it (the backend
commits and pushes a container image, or archives a workspace), and records
the result (``ready`` with reference, digest and size, or ``failed`` with a
reason). Every step is a progress note in the instance's event stream.

Who may do what is decided here too: a snapshot is visible to its owner,
to the users it is shared with (who may launch it, nothing more) and to
admins; to anyone else it does not exist (404).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labgate.agent.link import SiteLink
from labgate.backends.archive import SUFFIX as ARCHIVE_SUFFIX
from labgate.backends.base import (
    SnapshotRef,
    SnapshotRequest,
    SnapshotResult,
    SnapshotUnsupported,
)
from labgate.backends.images import LOCAL_SNAPSHOTS, human_bytes
from labgate.db.models import (
    Instance,
    InstanceState,
    Site,
    Snapshot,
    SnapshotShare,
    SnapshotState,
    User,
    utcnow,
)
from labgate.db.session import Database
from labgate.errors import BackendError, Conflict, LabgateError, NotFound, QuotaExceeded
from labgate.security import new_id
from labgate.wire.site import Report, Reporter

if TYPE_CHECKING:
    from labgate.scheduler.placement import SiteView

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between checks that ready snapshots' images and archives are still stored.
READY_CHECK_INTERVAL = 3600.0
#: Why an unfinished snapshot failed when its site found nothing complete.
INTERRUPTED = (
    "the save was cut short (labgate or its site stopped while saving) and nothing "
    "complete was stored; take the snapshot again"
)


#: A registry host in an image reference: a name or address (IPv6 in brackets), maybe a port.
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
#: One path component of a repository (the OCI distribution grammar: lower case only).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
#: A content digest as the registry and the snapshot store give it.
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
#: Why a site's report of a save was refused, as the snapshot's reason.
REFUSED = (
    "the site reported a reference (or digest, or size) other than this snapshot's; "
    "its answer was refused"
)


def result_problem(
    result: SnapshotResult, *, snapshot_id: str, owner: str, tool: str, kind: str
) -> str | None:
    """What is wrong with a site's report of a save, or None when it names what was asked.

    A site's agent may lie, and the portal hands the reference to every later
    launch (on any site of the backend), share and delete: an archive must be
    ``<snapshot id>.tar.gz``, an image
    ``<registry host>[/<namespace>]/<owner>/<tool>:<snapshot id>`` (or kept on
    the engine, ``localhost/labgate-snapshots/...``): never another user's
    repository, another snapshot's tag, a digest, ``..`` or capitals. The digest
    is a plain ``sha256:`` digest (it ends up in registry URLs), the size a
    count of bytes.
    """
    if result.kind != kind:
        return f"a {result.kind!r} snapshot from a site that takes {kind!r} ones"
    reference = result.reference
    if kind == "archive":
        if reference != f"{snapshot_id}{ARCHIVE_SUFFIX}":
            return f"archive {reference!r} is not {snapshot_id}{ARCHIVE_SUFFIX}"
    else:
        pattern = (
            rf"(?P<host>{_HOST})(?:/{_COMPONENT})*"
            rf"/{re.escape(owner)}/{re.escape(tool)}:{re.escape(snapshot_id)}"
        )
        match = re.fullmatch(pattern, reference)
        host = match.group("host") if match else ""
        # Without a dot, a port or "localhost" the first part is a Docker Hub account.
        if match is None or not ("." in host or ":" in host or host == "localhost"):
            return f"image {reference!r} is not <registry>/{owner}/{tool}:{snapshot_id}"
    if not DIGEST_RE.fullmatch(result.digest):
        return f"digest {result.digest!r} is not a sha256 digest"
    if isinstance(result.size, bool) or not isinstance(result.size, int) or result.size < 0:
        return f"size {result.size!r} is not a number of bytes"
    return None


@dataclass(frozen=True)
class Stored:
    """A snapshot to look for at its site: what :meth:`SnapshotManager.settle` checks."""

    id: str
    state: SnapshotState
    kind: str
    request: SnapshotRequest
    reference: str
    site: str
    backend: str


def can_see(snapshot: Snapshot, user_id: int, admin: bool) -> bool:
    """Owner, a user it is shared with, or an admin."""
    if admin or snapshot.owner_id == user_id:
        return True
    return any(share.user_id == user_id for share in snapshot.shares)


def visible_snapshot(session: Session, snapshot_id: str, user_id: int, admin: bool) -> Snapshot:
    """The snapshot if the user may see it; 404 otherwise (its existence is not revealed)."""
    snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None or not can_see(snapshot, user_id, admin):
        raise NotFound(f"no snapshot {snapshot_id!r}", code="unknown_snapshot")
    return snapshot


def snapshot_to_launch(
    session: Session, snapshot_id: str, user_id: int, tool: str | None
) -> Snapshot:
    """The snapshot a launch starts from: visible to the user (admins included), ready."""
    snapshot = session.get(Snapshot, snapshot_id)
    # Launching is for the owner and those it is shared with; admins see but need a share.
    if snapshot is None or not can_see(snapshot, user_id, admin=False):
        raise NotFound(f"no snapshot {snapshot_id!r}", code="unknown_snapshot")
    if snapshot.state != SnapshotState.ready:
        raise Conflict(
            f"snapshot {snapshot_id} is {snapshot.state.value}, not ready", code="invalid_state"
        )
    if tool and tool != snapshot.tool:
        raise Conflict(
            f"snapshot {snapshot_id} is of the tool {snapshot.tool!r}, not {tool!r}",
            code="invalid_state",
        )
    return snapshot


def sites_for_snapshot(
    snapshot: Snapshot, sites: Sequence[SiteView], wanted: str | None
) -> list[SiteView]:
    """The sites that can launch ``snapshot``.

    Any site of its backend for a registry image; only the site that took it
    for an archive or an image kept on its engine (no ``snapshot_registry``).
    """
    if snapshot.kind == "archive" or snapshot.reference.startswith(LOCAL_SNAPSHOTS + "/"):
        home = snapshot.site.name if snapshot.site else None
        fits = [site for site in sites if site.name == home]
        where = f"on site {home}"
    else:
        fits = [site for site in sites if site.backend == snapshot.backend]
        where = f"on a {snapshot.backend} site"
    if wanted is not None and all(site.name != wanted for site in fits):
        fits = []
    if not fits:
        raise Conflict(
            f"snapshot {snapshot.id} ({snapshot.kind}) can only be launched {where}"
            + (f", not on {wanted}" if wanted else ""),
            code="snapshot_unavailable",
        )
    return fits


def snapshot_ref(snapshot: Snapshot) -> SnapshotRef:
    """What a backend needs to know of a stored snapshot."""
    return SnapshotRef(
        id=snapshot.id, kind=snapshot.kind, reference=snapshot.reference, digest=snapshot.digest
    )


def storage_of(session: Session, owner_id: int) -> int:
    """Bytes of the snapshots ``owner_id`` keeps (saving ones count as what is known: 0)."""
    total = session.scalar(
        select(func.coalesce(func.sum(Snapshot.size), 0)).where(
            Snapshot.owner_id == owner_id, Snapshot.state != SnapshotState.failed
        )
    )
    return int(total or 0)


def check_storage(session: Session, owner_id: int, limit: int) -> None:
    """Refuse a new snapshot (429 ``quota_exceeded``) when the owner is at their limit.

    The size of a snapshot is known only once it is saved, so the check is
    that what is kept now is below the limit: the last snapshot may go over.
    """
    if not limit:
        return
    # One save at a time: a save under way has no size yet, so saves started together
    # would each pass a check that counts them as nothing. Row-locked until the new
    # snapshot is recorded, so portals sharing a PostgreSQL database check in turn.
    session.execute(select(User.id).where(User.id == owner_id).with_for_update())
    used = storage_of(session, owner_id)
    saving = session.scalar(
        select(Snapshot.id).where(
            Snapshot.owner_id == owner_id, Snapshot.state == SnapshotState.saving
        )
    )
    if saving is not None:
        raise QuotaExceeded(
            f"snapshot {saving} is still being saved and its size counts against the "
            f"{human_bytes(limit)} you may keep: take another once it is saved",
            limit=limit,
            current=used,
            quota="snapshot_storage",
            scope="user",
        )
    if used >= limit:
        raise QuotaExceeded(
            f"your snapshots take {human_bytes(used)} of the {human_bytes(limit)} you may keep; "
            "delete some before taking another",
            limit=limit,
            current=used,
            quota="snapshot_storage",
            scope="user",
        )


def gone_reason(kind: str, reference: str) -> str:
    """Why a ready snapshot is ``missing``, in the operator's words."""
    if kind == "archive":
        return f"its archive {reference} is no longer in the site's snapshot store"
    if reference.startswith(LOCAL_SNAPSHOTS + "/"):
        return f"its image {reference} is no longer on the site's engine"
    return f"its image {reference} is gone from the registry"


class SnapshotManager:
    """Takes and deletes snapshots through the sites; records them in the database."""

    def __init__(
        self,
        db: Database,
        links: dict[str, SiteLink],
        report: Reporter,
        *,
        storage_per_user: int = 0,
    ):
        self.db = db
        #: Bytes of snapshots one user may keep (0: no limit); checked before each save.
        self.storage_per_user = storage_per_user
        self.links = links
        #: Where progress notes go (the instance manager's ``apply``).
        self.report = report
        self._tasks: set[asyncio.Task[None]] = set()
        #: Snapshots this portal is saving now: :meth:`settle` leaves them alone.
        self._saving: set[str] = set()
        #: Seconds between checks that ready snapshots are still stored (first: at start).
        self.ready_check_interval = READY_CHECK_INTERVAL
        self._ready_checked: float | None = None
        #: One take at a time in this process: the storage check and the new row together.
        self._taking = asyncio.Lock()

    async def _db(self, fn: Callable[[Session], T]) -> T:
        return await self.db.run(fn)

    # --- take ----------------------------------------------------------------
    async def take(self, instance_id: str, name: str = "", description: str = "") -> Snapshot:
        """Start saving a running instance; the snapshot comes back ``saving``."""
        # Marked as being saved before its row exists: a settle() between the two
        # would otherwise find it ``saving`` with nobody saving it, and fail it.
        snapshot_id = new_id()
        self._saving.add(snapshot_id)
        try:
            async with self._taking:
                snapshot, request, state, site = await self._db(
                    lambda s: self._begin(s, snapshot_id, instance_id, name, description)
                )
            await self._note(instance_id, f"snapshot {snapshot.id}: saving", snapshot.id)
        except BaseException:
            self._saving.discard(snapshot_id)
            raise
        task = asyncio.create_task(self._save(snapshot.id, site, state, request, snapshot.kind))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return snapshot

    def _begin(
        self, session: Session, snapshot_id: str, instance_id: str, name: str, description: str
    ) -> tuple[Snapshot, SnapshotRequest, dict[str, Any], str]:
        instance = session.get(Instance, instance_id)
        if instance is None:
            raise NotFound(f"no instance {instance_id!r}", code="unknown_instance")
        if instance.state != InstanceState.running:
            raise Conflict(
                f"instance {instance_id} is {instance.state.value}; only a running instance "
                "can be snapshotted",
                code="invalid_state",
            )
        site = instance.site.name if instance.site else ""
        link = self.links.get(site)
        if link is None:
            raise Conflict(f"site {site} is not connected", code="site_unavailable")
        check_storage(session, instance.owner_id, self.storage_per_user)
        if not link.snapshot_kind:  # the site's backend declares it takes none
            raise SnapshotUnsupported(
                f"the {link.backend} backend of site {site} takes no snapshots"
            )
        snapshot = Snapshot(
            id=snapshot_id,
            owner_id=instance.owner_id,
            name=name,
            description=description,
            tool=instance.tool,
            site_id=instance.site_id,
            backend=link.backend,
            kind=link.snapshot_kind,
            source_instance_id=instance.id,
        )
        session.add(snapshot)
        session.flush()
        session.refresh(snapshot, ["owner", "site", "shares"])
        request = SnapshotRequest(
            snapshot_id=snapshot.id,
            instance_id=instance.id,
            owner=instance.owner.name,
            tool=instance.tool,
        )
        return snapshot, request, dict(instance.backend_state), site

    async def _save(
        self,
        snapshot_id: str,
        site: str,
        state: dict[str, Any],
        request: SnapshotRequest,
        kind: str,
    ) -> None:
        try:
            await self._save_at(snapshot_id, site, state, request, kind)
        finally:
            self._saving.discard(snapshot_id)

    async def _save_at(
        self,
        snapshot_id: str,
        site: str,
        state: dict[str, Any],
        request: SnapshotRequest,
        kind: str,
    ) -> None:
        iid = request.instance_id
        try:
            result = await self.links[site].snapshot(iid, state, request)
            problem = result_problem(
                result, snapshot_id=snapshot_id, owner=request.owner, tool=request.tool, kind=kind
            )
            if problem is not None:
                log.warning("snapshot %s: site %s reported %s; refused", snapshot_id, site, problem)
                raise BackendError(REFUSED)
        # The note goes first: whoever sees the snapshot finished finds it in the events.
        except LabgateError as exc:
            await self._note(iid, f"snapshot {snapshot_id} failed: {exc.detail}", snapshot_id)
            await self._finish(snapshot_id, None, exc.detail)
        except Exception as exc:
            log.exception("snapshot %s of %s failed", snapshot_id, iid)
            await self._note(iid, f"snapshot {snapshot_id} failed: {exc}", snapshot_id)
            await self._finish(snapshot_id, None, f"backend error: {exc}")
        else:
            await self._note(iid, f"snapshot {snapshot_id}: ready", snapshot_id, ready=True)
            await self._finish(snapshot_id, result, "")

    async def _finish(self, snapshot_id: str, result: SnapshotResult | None, reason: str) -> None:
        def record(session: Session) -> None:
            snapshot = session.get(Snapshot, snapshot_id)
            if snapshot is None:
                return
            if result is None:
                snapshot.state, snapshot.reason = SnapshotState.failed, reason
                return
            snapshot.state = SnapshotState.ready
            snapshot.kind = result.kind
            snapshot.reference = result.reference
            snapshot.digest = result.digest
            snapshot.size = result.size
            snapshot.ready_at = utcnow()

        await self._db(record)

    async def _note(self, instance_id: str, message: str, snapshot_id: str, **data: Any) -> None:
        report = Report(
            instance_id,
            "running",
            kind="progress",
            message=message,
            data={"snapshot": snapshot_id, **data},
        )
        await self.report(report)

    # --- settle: unfinished and vanished snapshots ------------------------------
    async def settle(self) -> dict[str, SnapshotState]:
        """Finish or fail unfinished snapshots; mark ready ones whose data is gone.

        Run at start and on every reconcile; with the ready checks it also
        collects stored snapshots no record names (:meth:`collect`). A
        ``saving`` snapshot nobody is
        saving (the portal stopped during the save) is looked for at its site:
        ``ready`` when the registry or store holds it complete, ``failed``
        with the reason otherwise. Every ``ready_check_interval`` seconds the
        ready ones are looked for too: ``missing`` when their image or archive
        is gone, ``ready`` again when it is back. A site that is away or
        cannot be asked now is tried on the next round. Returns what changed.
        """
        now = time.monotonic()
        with_ready = (
            self._ready_checked is None or now - self._ready_checked >= self.ready_check_interval
        )
        if with_ready:
            self._ready_checked = now
        changed: dict[str, SnapshotState] = {}
        for stored in await self._db(lambda s: self._stored(s, with_ready)):
            if stored.id in self._saving:
                continue
            state = await self._settle_one(stored)
            if state is not None:
                changed[stored.id] = state
        if with_ready:
            await self.collect()
        return changed

    async def collect(self) -> list[str]:
        """Have every live site remove stored snapshots no record names; what went.

        Deleting a snapshot removes its image or archive at once; this catches
        what a deletion could not reach then (registry down, site away), and
        images left by saves that failed half-way. Run with the ready checks.
        """
        known = set(await self._db(lambda s: list(s.scalars(select(Snapshot.id)))))
        known |= self._saving
        removed: list[str] = []
        for name, link in list(self.links.items()):
            if not link.live or not link.snapshot_kind:
                continue
            try:
                removed += await link.collect_snapshots(known)
            except Exception as exc:
                log.warning("site %s: collecting snapshots failed: %s", name, exc)
        if removed:
            log.info("collected %d snapshot(s) no record names: %s", len(removed), removed)
        return removed

    def _stored(self, session: Session, with_ready: bool) -> list[Stored]:
        states = [SnapshotState.saving]
        if with_ready:
            states += [SnapshotState.ready, SnapshotState.missing]
        rows = session.scalars(select(Snapshot).where(Snapshot.state.in_(states))).all()
        found = []
        for row in rows:
            request = SnapshotRequest(
                snapshot_id=row.id,
                instance_id=row.source_instance_id,
                owner=row.owner.name,
                tool=row.tool,
            )
            site = row.site.name if row.site else ""
            found.append(
                Stored(row.id, row.state, row.kind, request, row.reference, site, row.backend)
            )
        return found

    def _link_for(self, site: str, backend: str) -> SiteLink | None:
        link = self.links.get(site) or next(
            (link for link in self.links.values() if link.backend == backend), None
        )
        return link if link is not None and link.live else None

    async def _settle_one(self, stored: Stored) -> SnapshotState | None:
        link = self._link_for(stored.site, stored.backend)
        if link is None:
            return None
        unsupported = False
        try:
            found = await link.find_snapshot(stored.request, stored.reference)
        except LabgateError as exc:
            if exc.code != "snapshot_unsupported" or stored.state != SnapshotState.saving:
                if exc.code != "snapshot_saving":
                    log.warning("snapshot %s: cannot look for it: %s", stored.id, exc.detail)
                return None
            found, unsupported = None, True
        except Exception as exc:
            log.warning("snapshot %s: cannot look for it: %s", stored.id, exc)
            return None
        if stored.state == SnapshotState.saving:
            iid = stored.request.instance_id
            problem = (
                None
                if found is None
                else result_problem(
                    found,
                    snapshot_id=stored.id,
                    owner=stored.request.owner,
                    tool=stored.request.tool,
                    kind=stored.kind,
                )
            )
            if problem is not None:
                log.warning(
                    "snapshot %s: site %s reported %s; refused", stored.id, stored.site, problem
                )
                await self._note(iid, f"snapshot {stored.id} failed: {REFUSED}", stored.id)
                return await self._settled(stored, SnapshotState.failed, REFUSED, None)
            if found is not None:
                await self._note(iid, f"snapshot {stored.id}: found complete: ready", stored.id)
                return await self._settled(stored, SnapshotState.ready, "", found)
            reason = INTERRUPTED if not unsupported else f"{INTERRUPTED} (the site cannot tell)"
            await self._note(iid, f"snapshot {stored.id} failed: {reason}", stored.id)
            return await self._settled(stored, SnapshotState.failed, reason, None)
        if found is None and stored.state == SnapshotState.ready:
            reason = gone_reason(stored.kind, stored.reference)
            log.warning("snapshot %s: %s", stored.id, reason)
            return await self._settled(stored, SnapshotState.missing, reason, None)
        if found is not None and stored.state == SnapshotState.missing:
            return await self._settled(stored, SnapshotState.ready, "", None)
        return None

    async def _settled(
        self, stored: Stored, state: SnapshotState, reason: str, result: SnapshotResult | None
    ) -> SnapshotState | None:
        def record(session: Session) -> SnapshotState | None:
            snapshot = session.get(Snapshot, stored.id)
            # Another portal may have finished it meanwhile: only what was seen changes.
            if snapshot is None or snapshot.state != stored.state:
                return None
            snapshot.state, snapshot.reason = state, reason
            if result is not None:
                snapshot.kind = result.kind
                snapshot.reference = result.reference
                snapshot.digest = result.digest
                snapshot.size = result.size
                snapshot.ready_at = utcnow()
            return state

        return await self._db(record)

    # --- delete ----------------------------------------------------------------
    async def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot's data at its site (registry image, archive) and its record."""
        ref, site, backend = await self._db(lambda s: self._deletable(s, snapshot_id))
        link = self.links.get(site) or next(
            (link for link in self.links.values() if link.backend == backend), None
        )
        if ref is not None and link is not None:
            try:
                await link.delete_snapshot(ref)
            except Exception as exc:
                # The record goes anyway; the operator finds the leftover in the log.
                log.warning("snapshot %s: cannot delete %s: %s", snapshot_id, ref.reference, exc)
        elif ref is not None:
            log.warning("snapshot %s: no %s site to delete %s", snapshot_id, backend, ref.reference)

        def remove(session: Session) -> None:
            snapshot = session.get(Snapshot, snapshot_id)
            if snapshot is not None:
                session.delete(snapshot)

        await self._db(remove)

    def _deletable(self, session: Session, snapshot_id: str) -> tuple[SnapshotRef | None, str, str]:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise NotFound(f"no snapshot {snapshot_id!r}", code="unknown_snapshot")
        if snapshot.state == SnapshotState.saving:
            raise Conflict(f"snapshot {snapshot_id} is still being saved", code="invalid_state")
        starting = session.scalar(
            select(Instance.id).where(
                Instance.snapshot_id == snapshot_id,
                Instance.state.in_([InstanceState.pending, InstanceState.starting]),
            )
        )
        if starting is not None:
            raise Conflict(
                f"instance {starting} is starting from snapshot {snapshot_id}; try again when "
                "it runs",
                code="invalid_state",
            )
        site = session.get(Site, snapshot.site_id) if snapshot.site_id else None
        ref = snapshot_ref(snapshot) if snapshot.reference else None
        return ref, site.name if site else "", snapshot.backend

    # --- sharing ------------------------------------------------------------------
    @staticmethod
    def share(session: Session, snapshot: Snapshot, user_id: int) -> bool:
        """Let ``user_id`` see and launch ``snapshot``; False when it already could."""
        if user_id == snapshot.owner_id or any(s.user_id == user_id for s in snapshot.shares):
            return False
        snapshot.shares.append(SnapshotShare(user_id=user_id))
        return True

    @staticmethod
    def revoke(session: Session, snapshot: Snapshot, user_id: int) -> bool:
        """Take ``user_id``'s access away; False when they had none.

        Instances they already launched keep running: revoking stops future launches.
        """
        for share in list(snapshot.shares):
            if share.user_id == user_id:
                snapshot.shares.remove(share)
                return True
        return False

    async def close(self) -> None:
        """Let saves under way finish briefly, then cancel them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for task in list(self._tasks):
            task.cancel()
