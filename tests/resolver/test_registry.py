"""The registry, inventory pushes and liveness against a real database (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.config import Settings
from labgate.db.models import Dataset, Instance, Replica, Site, SiteReport, User, utcnow
from labgate.db.session import Database
from labgate.errors import BadRequest, Conflict, NotFound
from labgate.resolver import inventory, registry
from labgate.resolver.locality import DataLocator
from labgate.resolver.schemas import DatasetIn, DatasetPatch, InventoryEntry, ReplicaIn


@pytest.fixture
def db(database_url: str, tmp_path: Path) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    with database.session() as session:
        session.add(User(name="alice", password_hash="x"))
        for name in ("east", "west"):
            root = tmp_path / f"{name}-data"
            # Replica paths must exist on the site: the directories the tests name.
            for path in ("a/b", "a2", "b", "c", "iris", "known", "new", "old"):
                (root / path).mkdir(parents=True, exist_ok=True)
            session.add(
                Site(name=name, backend="process", options={"data_root": str(root)}, labels={})
            )
        session.add(Site(name="bare", backend="process", options={}, labels={}))
    yield database
    database.dispose()


@pytest.fixture
def session(db: Database) -> Iterator[Session]:
    with db.session() as s:
        yield s


@pytest.fixture
def locator(tmp_path: Path) -> DataLocator:
    return DataLocator(Settings(data_dir=tmp_path / "var", site_report_ttl=3600))


def site_of(session: Session, name: str) -> Site:
    return registry.require_site(session, name)


def test_register_and_find_by_any_spelling(session: Session) -> None:
    dataset = registry.register(
        session, None, DatasetIn(id="https://doi.org/10.5281/ZENODO.1234", title="Iris")
    )
    assert dataset.identifier == "doi:10.5281/zenodo.1234"
    assert dataset.name == "zenodo.1234"
    assert dataset.landing_page == "https://doi.org/10.5281/zenodo.1234"
    for spelling in ("doi:10.5281/zenodo.1234", "10.5281/Zenodo.1234", "hdl:10.5281/ZENODO.1234"):
        assert registry.require_dataset(session, spelling).id == dataset.id
    with pytest.raises(Conflict) as exists:
        registry.register(session, None, DatasetIn(id="DOI:10.5281/zenodo.1234"))
    assert exists.value.code == "dataset_exists"
    with pytest.raises(NotFound) as missing:
        registry.require_dataset(session, "doi:10.5281/zenodo.9999")
    assert missing.value.code == "unknown_dataset"
    with pytest.raises(BadRequest) as invalid:
        registry.require_dataset(session, "doi:11.1/x")
    assert invalid.value.code == "invalid_identifier"
    assert "starts with 10." in invalid.value.detail


def test_update_changes_only_what_is_given(session: Session) -> None:
    dataset = registry.register(session, None, DatasetIn(id="doi:10.1234/a", title="A", size=5))
    registry.update_dataset(session, dataset, DatasetPatch(license="CC-BY-4.0"))
    assert (dataset.title, dataset.size, dataset.license) == ("A", 5, "CC-BY-4.0")
    registry.update_dataset(session, dataset, DatasetPatch(size=None))
    assert dataset.size is None


@pytest.mark.parametrize("path", ["/abs/path", "../up", "a/../../b", ".", "a\\b", "a\0b"])
def test_replica_paths_stay_inside_the_data_root(session: Session, path: str) -> None:
    dataset = registry.register(session, None, DatasetIn(id="doi:10.1234/a"))
    with pytest.raises(BadRequest):
        registry.put_replica(session, dataset, "east", ReplicaIn(path=path))


def test_replicas_need_a_site_with_a_data_root(session: Session) -> None:
    dataset = registry.register(session, None, DatasetIn(id="doi:10.1234/a"))
    assert registry.put_replica(session, dataset, "east", ReplicaIn(path="./a//b")).path == "a/b"
    with pytest.raises(Conflict) as caught:
        registry.put_replica(session, dataset, "bare", ReplicaIn(path="a"))
    assert caught.value.code == "no_data_root"
    with pytest.raises(NotFound):
        registry.put_replica(session, dataset, "nowhere", ReplicaIn(path="a"))
    registry.remove_replica(session, dataset, "east")
    with pytest.raises(NotFound):
        registry.remove_replica(session, dataset, "east")


def test_search_by_text_spelling_site_and_scheme(session: Session) -> None:
    iris = registry.register(session, None, DatasetIn(id="doi:10.1234/iris", title="Iris flowers"))
    registry.register(session, None, DatasetIn(id="hdl:20.500.1/penguins", title="Penguins"))
    registry.register(session, None, DatasetIn(id="https://example.org/100%_real.csv"))
    registry.put_replica(session, iris, "west", ReplicaIn(path="iris"))

    def ids(**kw: object) -> list[str]:
        rows, total = registry.search(session, **kw)  # type: ignore[arg-type]
        assert total == len(rows)
        return [r.identifier for r in rows]

    assert ids(query="FLOWERS") == ["doi:10.1234/iris"]
    assert ids(query="https://doi.org/10.1234/IRIS") == ["doi:10.1234/iris"]
    assert ids(query="100%25_") == ["https://example.org/100%25_real.csv"]
    assert ids(query="%") == ["https://example.org/100%25_real.csv"]
    assert ids(site="west") == ["doi:10.1234/iris"]
    assert ids(scheme="hdl") == ["hdl:20.500.1/penguins"]
    rows, total = registry.search(session, limit=1, offset=1)
    assert total == 3 and [r.identifier for r in rows] == ["hdl:20.500.1/penguins"]


def test_delete_forgets_replicas_and_clears_instances(session: Session) -> None:
    dataset = registry.register(session, None, DatasetIn(id="doi:10.1234/a"))
    registry.put_replica(session, dataset, "east", ReplicaIn(path="a"))
    owner = session.scalar(select(User)).id  # type: ignore[union-attr]
    session.add(Instance(id="i1", owner_id=owner, tool="demo", dataset_id=dataset.id))
    session.flush()
    registry.delete_dataset(session, dataset)
    assert session.scalar(select(Replica)) is None
    assert session.get(Instance, "i1").dataset_id is None  # type: ignore[union-attr]


# --- inventory pushes --------------------------------------------------------------------


def entry(ident: str, path: str, **kw: object) -> InventoryEntry:
    return InventoryEntry(id=ident, path=path, **kw)  # type: ignore[arg-type]


def push(session: Session, site: str, entries: list[InventoryEntry], **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("ttl", 3600)
    return inventory.push(
        session, site_of(session, site), entries, reporter="ops", owner_id=None, **kw
    )  # type: ignore[arg-type]


def paths(session: Session, site: str) -> dict[str, str]:
    rows = session.execute(
        select(Dataset.identifier, Replica.path)
        .join(Replica, Replica.dataset_id == Dataset.id)
        .join(Site, Site.id == Replica.site_id)
        .where(Site.name == site)
    )
    return dict(rows.all())


def test_a_push_registers_unknown_datasets_and_rejects_bad_entries(session: Session) -> None:
    registry.register(session, None, DatasetIn(id="doi:10.1234/known", title="Known"))
    result = push(
        session,
        "east",
        [
            entry("doi:10.1234/KNOWN", "known"),
            entry("https://doi.org/10.1234/new", "new", size=10, title="New one"),
            entry("not an id", "x"),
            entry("doi:10.1234/evil", "../../etc"),
        ],
    )
    assert (result.received, result.added, result.datasets_created) == (4, 2, 1)
    assert result.rejected_count == 2
    reasons = dict(result.rejected)
    assert "spaces" in reasons["not an id"]
    assert "inside the data root" in reasons["doi:10.1234/evil"]
    assert paths(session, "east") == {"doi:10.1234/known": "known", "doi:10.1234/new": "new"}
    new = registry.require_dataset(session, "doi:10.1234/new")
    assert (new.title, new.size, new.name) == ("New one", 10, "new")
    report = session.get(SiteReport, site_of(session, "east").id)
    assert report is not None and report.replicas == 2 and report.ttl == 3600


def test_replace_removes_what_a_push_leaves_out_merge_does_not(session: Session) -> None:
    push(session, "east", [entry("doi:10.1234/a", "a"), entry("doi:10.1234/b", "b")])
    merged = push(session, "east", [entry("doi:10.1234/c", "c")], mode="merge")
    assert (merged.added, merged.removed, merged.replicas) == (1, 0, 3)
    replaced = push(session, "east", [entry("doi:10.1234/a", "a2")])
    assert (replaced.updated, replaced.removed, replaced.replicas) == (1, 2, 1)
    assert paths(session, "east") == {"doi:10.1234/a": "a2"}
    assert paths(session, "west") == {}


def test_a_push_in_parts_prunes_only_when_it_ends(session: Session) -> None:
    push(session, "east", [entry("doi:10.1234/old", "old"), entry("doi:10.1234/a", "a")])
    start = utcnow() + timedelta(seconds=1)  # later than the first push, like a real clock
    push(session, "east", [entry("doi:10.1234/a", "a")], push_id="p1", final=False, now=start)
    assert set(paths(session, "east")) == {"doi:10.1234/old", "doi:10.1234/a"}
    later = start + timedelta(seconds=5)
    done = push(session, "east", [entry("doi:10.1234/b", "b")], push_id="p1", now=later)
    assert done.removed == 1
    assert set(paths(session, "east")) == {"doi:10.1234/a", "doi:10.1234/b"}


def test_cached_copies_survive_a_replace_push(session: Session) -> None:
    dataset = registry.register(session, None, DatasetIn(id="https://example.org/x.csv"))
    registry.put_replica(session, dataset, "bare", ReplicaIn(path="x-1"), source=registry.CACHE)
    result = push(session, "bare", [])
    assert result.removed == 0 and paths(session, "bare") == {"https://example.org/x.csv": "x-1"}


# --- liveness ---------------------------------------------------------------------------


def test_replicas_go_stale_when_a_site_stops_reporting(
    session: Session, locator: DataLocator
) -> None:
    push(session, "east", [entry("doi:10.1234/a", "a")], ttl=60)
    dataset = registry.require_dataset(session, "doi:10.1234/a")
    registry.put_replica(session, dataset, "west", ReplicaIn(path="a"))  # west never pushes
    live = {"east", "west"}
    now = utcnow()
    fresh = locator.resolve(session, "doi:10.1234/a", live, now=now + timedelta(seconds=30))
    assert [r.site for r in fresh.live] == ["east", "west"]
    stale = locator.resolve(session, "doi:10.1234/a", live, now=now + timedelta(seconds=120))
    assert [r.site for r in stale.live] == ["west"]
    (east,) = [r for r in stale.replicas if r.site == "east"]
    assert east.reason is not None and east.reason.startswith("stale")
    unreachable = locator.resolve(session, "doi:10.1234/a", {"east"}, now=now)
    assert [(r.site, r.reason) for r in unreachable.replicas if not r.live] == [
        ("west", "the site is not connected to this labgate")
    ]
    assert unreachable.live[0].mount_source.endswith("east-data/a")  # type: ignore[union-attr]


def test_a_ttl_of_zero_never_goes_stale(session: Session, locator: DataLocator) -> None:
    push(session, "east", [entry("doi:10.1234/a", "a")], ttl=0)
    later = utcnow() + timedelta(days=365)
    assert locator.resolve(session, "doi:10.1234/a", {"east"}, now=later).live


def test_why_a_dataset_cannot_be_fetched(session: Session, tmp_path: Path) -> None:
    def refusal(settings: Settings, **meta: object) -> str | None:
        ident = str(meta.pop("id"))
        dataset = registry.find_dataset(session, registry.parse_identifier(ident))
        if dataset is None:
            dataset = registry.register(session, None, DatasetIn(id=ident, **meta))  # type: ignore[arg-type]
        return DataLocator(settings).fetch_refusal(dataset)

    base = Settings(data_dir=tmp_path, dataset_fetch_max_bytes=1000)
    assert refusal(base, id="https://example.org/a.csv", size=1000) is None
    assert "over the fetch limit" in (
        refusal(base, id="https://example.org/b.csv", size=1001) or ""
    )
    assert "not a URL" in (refusal(base, id="doi:10.1234/x") or "")
    off = Settings(data_dir=tmp_path, dataset_fetch_max_bytes=0)
    assert "turned off" in (refusal(off, id="https://example.org/a.csv") or "")
