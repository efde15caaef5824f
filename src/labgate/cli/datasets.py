"""``labgate dataset``: register, list, show, update, delete, resolve, replicas, inventory push.

Every command goes through the REST API (``/api/v1/datasets``,
``/api/v1/resolve``, ``/api/v1/sites/<site>/inventory``). Identifiers are
given in any spelling the server accepts (``doi:…``, ``https://doi.org/…``,
``hdl:…``, ``ark:…``, ``urn:…``, URLs) and travel percent-encoded in paths.

``dataset push`` reads an inventory file (JSON Lines, CSV or JSON) and sends it
in parts of at most ``PART_BYTES`` that share one push id, so inventories of
any size stay under the server's request size limit; the last part ends the
push (and, unless ``--merge``, removes what the file no longer lists).
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, state_of

if TYPE_CHECKING:
    from labgate.client import Client

#: Largest body of one inventory request (the server's default limit is 1 MiB).
PART_BYTES = 512 * 1024
PART_ENTRIES = 5000
INVENTORY_FIELDS = ("id", "path", "size", "checksum", "verified_at", "title")

dataset_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup
replica_app = typer.Typer(
    help="Replicas of a dataset on sites (sites:report).", no_args_is_help=True
)
dataset_app.add_typer(replica_app, name="replica")

ID_ARGUMENT = typer.Argument(..., metavar="ID", help="DOI, Handle, ARK, URN or URL.")


def dataset_path(identifier: str) -> str:
    """The API path of a dataset, its identifier percent-encoded."""
    return f"/datasets/{quote(identifier, safe=':')}"


def _metadata(**values: Any) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _show_dataset(dataset: dict[str, Any]) -> None:
    show.mapping(
        {
            "id": dataset["id"],
            "name": dataset["name"],
            "title": dataset["title"],
            "size": show.size(dataset["size"]) if dataset["size"] is not None else "",
            "license": dataset["license"],
            "landing page": dataset["landing_page"],
            "checksum": dataset["checksum"],
            "owner": dataset["owner"] or "",
            "registered": show.when(dataset["created_at"]),
            "description": dataset["description"],
        },
        key="FIELD",
    )
    typer.echo()
    show.replicas(dataset["replicas"])


def _parse_replica(value: str) -> dict[str, str]:
    site, colon, path = value.partition(":")
    if not colon or not site or not path:
        raise typer.BadParameter(f"expected SITE:PATH, not {value!r}")
    return {"site": site, "path": path}


@dataset_app.command("register")
def register(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    name: str | None = typer.Option(None, "--name", help="Mounted at /data/NAME."),
    title: str = typer.Option("", "--title", help="A title people recognise."),
    description: str = typer.Option("", "--description", help="What is in it."),
    size: int | None = typer.Option(None, "--size", help="Bytes."),
    license_: str = typer.Option("", "--license", help="e.g. CC-BY-4.0."),
    landing_page: str = typer.Option("", "--landing-page", help="Default: the resolver URL."),
    checksum: str = typer.Option("", "--checksum", help="Of a URL dataset: sha256:…, md5:…"),
    replicas: list[str] | None = typer.Option(
        None, "--replica", metavar="SITE:PATH", help="A replica under SITE's data root (repeat)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Register a dataset (replicas given with it need the sites:report scope)."""
    body = _metadata(
        id=identifier,
        name=name,
        title=title,
        description=description,
        size=size,
        license=license_,
        landing_page=landing_page,
        checksum=checksum,
        replicas=[_parse_replica(r) for r in replicas or []],
    )
    with state_of(ctx).client() as client:
        created = client.post("/datasets", body)
    if as_json:
        show.print_json(created)
    else:
        show.note(f"registered {created['id']} (mounted as /data/{created['name']})")
        show.line(created["id"])


@dataset_app.command("update")
def update(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    name: str | None = typer.Option(None, "--name", help="Mounted at /data/NAME."),
    title: str | None = typer.Option(None, "--title", help="New title."),
    description: str | None = typer.Option(None, "--description", help="New description."),
    size: int | None = typer.Option(None, "--size", help="Bytes."),
    license_: str | None = typer.Option(None, "--license", help="New license."),
    landing_page: str | None = typer.Option(None, "--landing-page", help="New landing page."),
    checksum: str | None = typer.Option(None, "--checksum", help="New checksum."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Change a dataset's metadata (yours, or any as an admin)."""
    body = _metadata(
        name=name,
        title=title,
        description=description,
        size=size,
        license=license_,
        landing_page=landing_page,
        checksum=checksum,
    )
    if not body:
        fail("nothing to change: give at least one option (see --help)", code=2)
    with state_of(ctx).client() as client:
        updated = client.patch(dataset_path(identifier), body)
    if as_json:
        show.print_json(updated)
    else:
        _show_dataset(updated)


@dataset_app.command("list")
def list_(
    ctx: typer.Context,
    search: str | None = typer.Option(None, "--search", "-q", help="Part of an id or title."),
    site: str | None = typer.Option(None, "--site", help="Only datasets held on this site."),
    scheme: str | None = typer.Option(None, "--scheme", help="doi, hdl, ark, urn or url."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many."),
    offset: int = typer.Option(0, "--offset", min=0, help="Skip this many."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List or search the registered datasets."""
    with state_of(ctx).client() as client:
        rows = client.get(
            "/datasets", q=search, site=site, scheme=scheme, limit=limit, offset=offset
        )
    if as_json:
        show.print_json(rows)
    else:
        show.datasets(rows)


@dataset_app.command("show")
def show_(ctx: typer.Context, identifier: str = ID_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Show a dataset and its replicas, and whether each is live."""
    with state_of(ctx).client() as client:
        dataset = client.get(dataset_path(identifier))
    if as_json:
        show.print_json(dataset)
    else:
        _show_dataset(dataset)


@dataset_app.command("delete")
def delete(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Delete a dataset and its replicas (yours, or any as an admin)."""
    if not yes:
        typer.confirm(f"Delete {identifier} and what labgate knows of its replicas?", abort=True)
    with state_of(ctx).client() as client:
        client.delete(dataset_path(identifier))
    show.line(f"deleted {identifier}")


@dataset_app.command("resolve")
def resolve(ctx: typer.Context, identifier: str = ID_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Resolve an identifier: the dataset, its live replicas, launch links."""
    with state_of(ctx).client() as client:
        answer = client.get("/resolve", id=identifier)
    if as_json:
        show.print_json(answer)
        return
    dataset = answer["dataset"]
    show.line(f"{dataset['id']}  {dataset['title']}".rstrip())
    show.replicas(answer["replicas"] + answer["unavailable"])
    if answer["fetchable"]:
        show.note("no live replica: a launch fetches it into the chosen site's cache")
    typer.echo()
    for link in answer["launch"]:
        show.line(f"{link['tool']:<16} {link['url']}")
    if not answer["launch"]:
        show.note("no tool can open it now")


@dataset_app.command("badge")
def badge(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    tool: str = typer.Option(..., "--tool", help="The tool the badge launches."),
    html: bool = typer.Option(False, "--html", help="HTML instead of Markdown."),
    urlpath: str = typer.Option(
        "", "--urlpath", help="A path inside the tool to open ({dataset}: the dataset's name)."
    ),
) -> None:
    """Print the Markdown (or HTML) of a launch badge for a registered dataset."""
    with state_of(ctx).client() as client:
        answer = client.get("/resolve", id=identifier)
    link = next((item["url"] for item in answer["launch"] if item["tool"] == tool), None)
    if link is None:
        fail(f"{tool} cannot open {answer['dataset']['id']} now (see `labgate dataset resolve`)")
    if urlpath:
        try:
            from labgate.resolver.locality import BadUrlPath, clean_urlpath

            link += "&urlpath=" + quote(clean_urlpath(urlpath), safe="/{}")
        except BadUrlPath as exc:
            fail(f"--urlpath: {exc}")
    image = link.split("/launch?", 1)[0] + "/badge.svg"
    if html:
        href = link.replace("&", "&amp;")
        show.line(f'<a href="{href}"><img src="{image}" alt="Launch in labgate"></a>')
    else:
        show.line(f"[![Launch in labgate]({image})]({link})")


# --- replicas ----------------------------------------------------------------------------


@replica_app.command("add")
def replica_add(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    site: str = typer.Argument(..., help="The site holding it."),
    path: str = typer.Argument(..., help="Where, relative to the site's data root."),
    size: int | None = typer.Option(None, "--size", help="Bytes."),
    checksum: str = typer.Option("", "--checksum", help="e.g. sha256:…"),
) -> None:
    """Add (or replace) the replica of a dataset on a site."""
    body = _metadata(path=path, size=size, checksum=checksum)
    with state_of(ctx).client() as client:
        replica = client.put(f"{dataset_path(identifier)}/replicas/{quote(site)}", body)
    live = "live" if replica["live"] else f"not live: {replica['reason']}"
    show.line(f"{identifier} on {site} at {replica['path']} ({live})")


@replica_app.command("remove")
def replica_remove(
    ctx: typer.Context,
    identifier: str = ID_ARGUMENT,
    site: str = typer.Argument(..., help="The site."),
) -> None:
    """Forget the replica of a dataset on a site."""
    with state_of(ctx).client() as client:
        client.delete(f"{dataset_path(identifier)}/replicas/{quote(site)}")
    show.line(f"{identifier}: replica on {site} removed")


# --- inventory push ----------------------------------------------------------------------


def read_inventory(path: str, fmt: str) -> Iterator[dict[str, Any]]:
    """Entries of an inventory file: JSON Lines, CSV (with a header) or JSON."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    if fmt == "auto":
        suffix = Path(path).suffix.lower()
        fmt = {".csv": "csv", ".json": "json"}.get(suffix, "jsonl")
    if fmt == "csv":
        for row in csv.DictReader(io.StringIO(text)):
            yield _entry({k.strip(): (v or "").strip() for k, v in row.items() if k})
    elif fmt == "json":
        data = json.loads(text)
        items = data.get("replicas", []) if isinstance(data, dict) else data
        for item in items:
            yield _entry(item)
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield _entry(json.loads(line))
                except ValueError as exc:
                    fail(f"{path}, line {number}: not JSON ({exc})")


def _entry(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or not item.get("id") or not item.get("path"):
        fail(f"every inventory entry needs an id and a path, not {item!r}")
    entry = {key: item[key] for key in INVENTORY_FIELDS if item.get(key) not in (None, "")}
    if "size" in entry:
        try:
            entry["size"] = int(entry["size"])
        except (TypeError, ValueError):
            fail(f"size of {entry['id']} is not a whole number of bytes: {entry['size']!r}")
    return entry


def parts(entries: Iterator[dict[str, Any]], limit: int) -> Iterator[list[dict[str, Any]]]:
    """The entries in lists of at most ``limit`` entries and about ``PART_BYTES`` bytes."""
    part: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        encoded = len(json.dumps(entry)) + 2
        if part and (len(part) >= limit or size + encoded > PART_BYTES):
            yield part
            part, size = [], 0
        part.append(entry)
        size += encoded
    yield part  # possibly empty: an empty replace push says "nothing here any more"


def push_inventory(
    client: Client, site: str, entries: Iterator[dict[str, Any]], *, merge: bool, ttl: int | None
) -> dict[str, Any]:
    """Send an inventory in parts; returns the totals and the last answer."""
    push_id = f"cli-{secrets.token_hex(8)}"
    totals = {"received": 0, "added": 0, "updated": 0, "datasets_created": 0, "rejected_count": 0}
    rejected: list[dict[str, str]] = []
    chunks = parts(entries, PART_ENTRIES)
    current = next(chunks)
    count = 0
    while True:
        following = next(chunks, None)
        body = {
            "replicas": current,
            "mode": "merge" if merge else "replace",
            "push": push_id,
            "final": following is None,
            "ttl": ttl,
        }
        answer: dict[str, Any] = client.post(f"/sites/{quote(site)}/inventory", body)
        count += 1
        for key in totals:
            totals[key] += answer[key]
        rejected.extend(answer["rejected"])
        if following is None:
            return {**answer, **totals, "parts": count, "rejected": rejected[:100]}
        current = following


@dataset_app.command("push")
def push(
    ctx: typer.Context,
    site: str = typer.Argument(..., help="The site whose inventory this is."),
    file: str = typer.Argument(..., metavar="FILE", help="Inventory file, or - for stdin."),
    fmt: str = typer.Option(
        "auto", "--format", help="jsonl, csv, json, or auto (by the file's extension)."
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Add and update only; keep replicas the file does not list."
    ),
    ttl: int | None = typer.Option(
        None, "--ttl", min=0, help="Seconds until the next push is due (server default)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Report everything a site holds (a full inventory, unless --merge)."""
    if fmt not in ("auto", "jsonl", "csv", "json"):
        raise typer.BadParameter("--format is one of auto, jsonl, csv, json")
    with state_of(ctx).client() as client:
        result = push_inventory(client, site, read_inventory(file, fmt), merge=merge, ttl=ttl)
    if as_json:
        show.print_json(result)
        return
    typer.echo(
        f"site {site}: {result['received']} replicas received in {result['parts']} part(s); "
        f"{result['added']} added, {result['updated']} updated, "
        f"{result['datasets_created']} datasets registered, {result['removed']} removed, "
        f"{result['rejected_count']} rejected; the site now holds {result['replicas']}"
    )
    for item in result["rejected"][:20]:
        show.note(f"rejected {item['id']}: {item['reason']}")
