"""Snapshot commands of the CLI: ``labgate snapshot create/list/show/share/unshare/delete/launch``.

Everything goes through the REST API (``/api/v1/snapshots``,
``/api/v1/instances/<id>/snapshot``, and ``POST /api/v1/instances`` with
``snapshot`` to launch one); docs/snapshots.md says what a snapshot holds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, state_of
from labgate.cli.instances import start

if TYPE_CHECKING:
    from labgate.client import Client

snapshot_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup

POLL_SECONDS = 1.0
TIMEOUT_OPTION = typer.Option(
    1800.0, "--timeout", metavar="SECONDS", help="Give up waiting after this long."
)


def _rows(snapshots: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            s["id"],
            s["name"] or "-",
            s["tool"],
            s["owner"],
            s["state"],
            show.size(s["size"]) if s["size"] else "",
            show.when(s["created_at"]),
            ", ".join(s["shared_with"]),
        ]
        for s in snapshots
    ]


#: What `snapshot show` prints, in this order.
SHOWN_FIELDS = [
    "id",
    "name",
    "description",
    "owner",
    "tool",
    "site",
    "backend",
    "kind",
    "state",
    "reason",
    "reference",
    "digest",
    "size",
    "source_instance",
    "created_at",
    "ready_at",
    "shared_with",
]
COLUMNS = ["ID", "NAME", "TOOL", "OWNER", "STATE", "SIZE", "CREATED", "SHARED WITH"]


def _wait_saved(client: Client, snapshot: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Poll until the snapshot is no longer ``saving``; one error line if it failed."""
    deadline = time.monotonic() + timeout
    try:
        with show.stderr().status(f"saving snapshot {snapshot['id']}…"):
            while snapshot["state"] == "saving":
                if time.monotonic() > deadline:
                    fail(
                        f"snapshot {snapshot['id']} is still saving after {timeout:g}s; "
                        f"see `labgate snapshot show {snapshot['id']}`"
                    )
                time.sleep(POLL_SECONDS)
                snapshot = client.get(f"/snapshots/{snapshot['id']}")
    except KeyboardInterrupt:
        show.note(f"stopped waiting; snapshot {snapshot['id']} keeps saving")
        raise typer.Exit(130) from None
    if snapshot["state"] != "ready":
        fail(f"snapshot {snapshot['id']} {snapshot['state']}: {snapshot['reason'] or 'no reason'}")
    return snapshot


@snapshot_app.command("create")
def create(
    ctx: typer.Context,
    instance: str = typer.Argument(..., help="The running instance to save."),
    name: str = typer.Option("", "--name", help="A name for people (one line)."),
    description: str = typer.Option("", "--description", help="What is in it."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until it is saved."),
    timeout: float = TIMEOUT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Save a running instance as a snapshot; prints the snapshot's id."""
    with state_of(ctx).client() as client:
        snapshot = client.post(
            f"/instances/{instance}/snapshot", {"name": name, "description": description}
        )
        if wait:
            snapshot = _wait_saved(client, snapshot, timeout)
    if as_json:
        show.print_json(snapshot)
        return
    show.note(f"snapshot {snapshot['id']} of {instance}: {snapshot['state']}")
    show.line(snapshot["id"])


@snapshot_app.command("list")
def list_(
    ctx: typer.Context,
    tool: str | None = typer.Option(None, "--tool", help="Only snapshots of this tool."),
    everyone: bool = typer.Option(False, "--all", help="Admins: everyone's snapshots."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Your snapshots and those shared with you, newest first."""
    params: dict[str, str] = {}
    if tool:
        params["tool"] = tool
    if everyone:
        params["all"] = "true"
    with state_of(ctx).client() as client:
        snapshots = client.get("/snapshots", **params)
    if as_json:
        show.print_json(snapshots)
        return
    show.plain_table(COLUMNS, _rows(snapshots), "no snapshots")


@snapshot_app.command("show")
def show_(
    ctx: typer.Context,
    snapshot_id: str = typer.Argument(..., help="The snapshot's id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """One snapshot: its state, what it is stored as, and who it is shared with."""
    with state_of(ctx).client() as client:
        snapshot = client.get(f"/snapshots/{snapshot_id}")
    if as_json:
        show.print_json(snapshot)
        return
    values = {key: snapshot.get(key) for key in SHOWN_FIELDS}
    values["size"] = show.size(snapshot["size"]) if snapshot["size"] else ""
    values["created_at"] = show.when(snapshot["created_at"])
    values["ready_at"] = show.when(snapshot["ready_at"])
    values["shared_with"] = ", ".join(snapshot["shared_with"])
    shown = {key: "" if value is None else value for key, value in values.items()}
    show.mapping(shown, key="FIELD")


@snapshot_app.command("share")
def share(
    ctx: typer.Context,
    snapshot_id: str = typer.Argument(..., help="The snapshot's id."),
    user: str = typer.Argument(..., help="The user who may see and launch it."),
) -> None:
    """Let another user see and launch a snapshot."""
    with state_of(ctx).client() as client:
        client.put(f"/snapshots/{snapshot_id}/shares/{user}")
    show.note(f"snapshot {snapshot_id} is shared with {user}")


@snapshot_app.command("unshare")
def unshare(
    ctx: typer.Context,
    snapshot_id: str = typer.Argument(..., help="The snapshot's id."),
    user: str = typer.Argument(..., help="The user to take it from."),
) -> None:
    """Stop sharing a snapshot; instances the user launched from it keep running."""
    with state_of(ctx).client() as client:
        client.delete(f"/snapshots/{snapshot_id}/shares/{user}")
    show.note(f"snapshot {snapshot_id} is no longer shared with {user}")


@snapshot_app.command("delete")
def delete(
    ctx: typer.Context,
    snapshot_id: str = typer.Argument(..., help="The snapshot's id."),
) -> None:
    """Delete a snapshot: its image leaves the registry (or its archive the store)."""
    with state_of(ctx).client() as client:
        client.delete(f"/snapshots/{snapshot_id}")
    show.note(f"snapshot {snapshot_id} deleted")


@snapshot_app.command("launch")
def launch(
    ctx: typer.Context,
    snapshot_id: str = typer.Argument(..., help="The snapshot's id (yours or shared with you)."),
    cpu: float | None = typer.Option(None, "--cpu", help="CPUs, e.g. 2 or 0.5."),
    memory: str | None = typer.Option(None, "--memory", help="Memory, e.g. 512M or 2G."),
    site: str | None = typer.Option(None, "--site", help="Run on this site."),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="Follow the launch until the tool is ready."
    ),
    timeout: float = typer.Option(
        600.0, "--timeout", metavar="SECONDS", help="Give up waiting after this long."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Launch a new instance from a snapshot and print its URL once it is running."""
    resources = {
        key: value for key, value in (("cpu", cpu), ("memory", memory)) if value is not None
    }
    body: dict[str, Any] = {"snapshot": snapshot_id, "resources": resources or None, "site": site}
    start(ctx, body, wait=wait, timeout=timeout, as_json=as_json)
