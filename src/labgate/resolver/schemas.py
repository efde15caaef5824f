"""Request and response bodies of the dataset, inventory and resolve API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from labgate.types import MAX_SECONDS, LineText, PlainText, Strict, Timestamp
from labgate.units import MAX_SIZE
from labgate.wire.checksums import check_checksum

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class _Checksummed(Strict):
    @field_validator("checksum", check_fields=False)
    @classmethod
    def _checksum(cls, value: str | None) -> str | None:
        return check_checksum(value) if value else value

    @field_validator("landing_page", check_fields=False)
    @classmethod
    def _landing_page(cls, value: str | None) -> str | None:
        # Shown as a link on labgate's own pages: no javascript: or data: URLs.
        if value and not value.lower().startswith(("https://", "http://")):
            raise ValueError("a landing page is an http:// or https:// URL")
        return value


class ReplicaIn(_Checksummed):
    """A replica as registered: a path under the site's data root."""

    path: str = Field(min_length=1, max_length=1024, description="Relative to the data root.")
    size: int | None = Field(None, ge=0, le=MAX_SIZE, description="Bytes.")
    checksum: str = Field("", max_length=200, description="<algorithm>:<hex>, e.g. sha256:…")
    verified_at: Timestamp | None = Field(None, description="When the site last checked it.")


class SiteReplicaIn(ReplicaIn):
    """A replica named with its site, inside a dataset registration."""

    site: str = Field(min_length=1, max_length=64)


class DatasetIn(_Checksummed):
    """A dataset to register."""

    id: str = Field(min_length=1, max_length=2048, description="DOI, Handle, ARK, URN or URL.")
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Mounted at /data/<name>; default from the id."
    )
    # Title, description and license are shown to every user, in their terminals too:
    # no control characters (docs/security.md, "Datasets and replicas").
    title: LineText = Field("", max_length=500, description="One line, no control characters.")
    description: PlainText = Field(
        "", max_length=20000, description="Lines and tabs, but no other control character."
    )
    size: int | None = Field(None, ge=0, le=MAX_SIZE, description="Bytes.")
    license: LineText = Field("", max_length=200)
    landing_page: str = Field("", max_length=2048, description="Default: the resolver URL.")
    checksum: str = Field(
        "", max_length=200, description="Of the content a URL dataset fetches: sha256:…"
    )
    replicas: list[SiteReplicaIn] = Field(
        default_factory=list, description="Needs the sites:report scope."
    )


class DatasetPatch(_Checksummed):
    """Metadata to change; fields left out stay as they are."""

    name: str | None = Field(None, pattern=NAME_PATTERN)
    title: LineText | None = Field(None, max_length=500)
    description: PlainText | None = Field(None, max_length=20000)
    size: int | None = Field(None, ge=0, le=MAX_SIZE)
    license: LineText | None = Field(None, max_length=200)
    landing_page: str | None = Field(None, max_length=2048)
    checksum: str | None = Field(None, max_length=200)


class ReplicaOut(BaseModel):
    """A replica, and whether placement may use it now."""

    site: str
    path: str
    size: int | None
    checksum: str
    verified_at: datetime | None
    source: str
    reported_at: datetime
    live: bool
    reason: str | None = Field(None, description="Why it is not live (stale, site gone…).")


class DatasetOut(BaseModel):
    """A registered dataset."""

    id: str = Field(description="The canonical identifier.")
    scheme: str
    name: str
    title: str
    description: str
    size: int | None
    license: str
    landing_page: str
    checksum: str
    resolver_url: str | None
    owner: str | None
    created_at: datetime
    updated_at: datetime
    replicas: list[ReplicaOut] = Field(default_factory=list)


class LaunchLink(BaseModel):
    """A tool that can open the dataset, and the link that does it."""

    tool: str
    title: str
    url: str = Field(description="Opens /launch in a browser: sign in, launch, land in the tool.")
    sites: list[str] = Field(description="Where it would run: sites with a live replica.")


class ResolveOut(BaseModel):
    """What ``GET /resolve`` answers."""

    dataset: DatasetOut
    replicas: list[ReplicaOut] = Field(description="Live replicas: usable for placement now.")
    unavailable: list[ReplicaOut] = Field(description="Replicas that cannot be used, and why.")
    fetchable: bool = Field(description="No live replica, but it can be fetched into a cache.")
    launch: list[LaunchLink]


class InventoryEntry(_Checksummed):
    """One replica in a site's inventory push."""

    id: str = Field(min_length=1, max_length=2048)
    path: str = Field(min_length=1, max_length=1024)
    size: int | None = Field(None, ge=0, le=MAX_SIZE)
    checksum: str = Field("", max_length=200)
    verified_at: Timestamp | None = None
    title: LineText = Field("", max_length=500, description="Used when the dataset is new.")


class InventoryIn(Strict):
    """A site's inventory, or one part of it."""

    replicas: list[InventoryEntry] = Field(default_factory=list)
    mode: Literal["replace", "merge"] = Field(
        "replace",
        description=(
            "replace: this push is everything the site holds; what it leaves out is removed "
            "when the push ends. merge: add or update only."
        ),
    )
    push: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Id shared by the requests of a push sent in parts.",
    )
    final: bool = Field(True, description="The last part of the push (ends it).")
    ttl: int | None = Field(
        None,
        ge=0,
        le=MAX_SECONDS,
        description="Seconds until the next push is due (default: site_report_ttl).",
    )


class Rejected(BaseModel):
    """An inventory entry that was not taken, and why."""

    id: str
    reason: str


class InventoryOut(BaseModel):
    """What an inventory push did."""

    site: str
    push: str | None
    received: int
    added: int
    updated: int
    datasets_created: int
    removed: int = Field(description="Replicas the final part of a replace push dropped.")
    rejected: list[Rejected]
    rejected_count: int
    final: bool
    replicas: int = Field(description="Replicas the site holds now.")
    reported_at: datetime | None
    ttl: int
