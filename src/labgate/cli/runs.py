"""``labgate run``: batch runs. Submit a definition, follow it, cancel, re-run, logs, results.

Everything goes through the REST API (``/runs``). A definition is checked
here first, so a mistake is reported with every problem before anything is
sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, state_of

if TYPE_CHECKING:
    from labgate.client import Client

run_app = typer.Typer(no_args_is_help=True)  # help: labgate.cli.RootGroup

FINISHED = ("succeeded", "failed", "cancelled")


def _graph(run: dict[str, Any]) -> None:
    """A run's stages and tasks, one line each."""
    show.line(f"run {run['id']} ({run['name']}): {run['state']}  {run.get('reason') or ''}")
    for stage in run["stages"]:
        show.line(f"  stage {stage['name']}: {stage['state']}")
        for task in stage["tasks"]:
            seconds = f" {task['seconds']:.1f}s" if task.get("seconds") is not None else ""
            where = f" on {task['site']}" if task.get("site") else ""
            code = f" exit {task['exit_code']}" if task.get("exit_code") is not None else ""
            note = f"  {task['reason']}" if task.get("reason") else ""
            show.line(f"    {task['name']}: {task['state']}{where}{code}{seconds}{note}")


def _watch(client: Client, run_id: str, timeout: float) -> dict[str, Any]:
    """Print the run's events as they come, until it ends."""
    deadline = time.monotonic() + timeout
    after = 0
    while True:
        run: dict[str, Any] = client.get(f"/runs/{run_id}/events", after=after)
        for event in run["events"]:
            who = f"{event['task']}: " if event["task"] else ""
            line = show.visible(f"{event['state']:<9} {who}{event['message']}")
            show.stderr().print(line, markup=False)
            after = event["id"]
        if run["state"] in FINISHED and not run["events"]:  # ended, and every event shown
            return dict(client.get(f"/runs/{run_id}"))
        if time.monotonic() > deadline:
            fail(f"run {run_id} is still {run['state']} after {timeout:g}s")
        if not run["events"]:
            time.sleep(0.5)


@run_app.command("submit")
def submit(
    ctx: typer.Context,
    path: Path = typer.Argument(..., help="The run definition, TOML or JSON.", exists=False),
    watch: bool = typer.Option(False, "--watch", help="Follow the run until it ends."),
    timeout: float = typer.Option(
        24 * 3600.0, "--timeout", metavar="SECONDS", help="With --watch: give up after this long."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Submit a run; with --watch, follow it and exit non-zero unless it succeeds."""
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")
    from labgate.wire.runs import DefinitionError, parse_definition

    try:
        definition = parse_definition(text, "json" if path.suffix == ".json" else "auto")
    except DefinitionError as exc:
        fail(f"{path} is not a valid run definition: " + "; ".join(str(exc).splitlines()))
    with state_of(ctx).client() as client:
        run = client.post("/runs", definition.model_dump(mode="json"))
        if watch:
            run = _watch(client, run["id"], timeout)
    if as_json:
        show.print_json(run)
    elif watch:
        _graph(run)
    else:
        show.line(run["id"])
    if watch and run["state"] != "succeeded":
        raise typer.Exit(1)


@run_app.command("list")
def list_runs(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Your runs (admins: everyone's), newest first."""
    with state_of(ctx).client() as client:
        rows = client.get("/runs")
    if as_json:
        show.print_json(rows)
        return
    show.plain_table(
        ["ID", "NAME", "OWNER", "STATE", "CREATED"],
        [[r["id"], r["name"], r["owner"], r["state"], show.when(r["created_at"])] for r in rows],
        "no runs",
    )


@run_app.command("show")
def show_run(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="The run's id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """A run's stages and tasks with their state."""
    with state_of(ctx).client() as client:
        run = client.get(f"/runs/{run_id}")
    if as_json:
        show.print_json(run)
    else:
        _graph(run)


@run_app.command("cancel")
def cancel(ctx: typer.Context, run_id: str = typer.Argument(..., help="The run's id.")) -> None:
    """Cancel a run: running tasks are stopped, waiting ones never start."""
    with state_of(ctx).client() as client:
        run = client.post(f"/runs/{run_id}/cancel")
    show.note(f"run {run_id} {run['state']}")


@run_app.command("rerun")
def rerun(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="The run's id."),
    watch: bool = typer.Option(False, "--watch", help="Follow the run until it ends."),
) -> None:
    """Run again the tasks of a finished run that did not succeed."""
    with state_of(ctx).client() as client:
        run = client.post(f"/runs/{run_id}/rerun")
        if watch:
            run = _watch(client, run_id, 24 * 3600.0)
            _graph(run)
            if run["state"] != "succeeded":
                raise typer.Exit(1)
            return
    show.note(f"run {run_id} {run['state']}")


@run_app.command("logs")
def logs(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="The run's id."),
    task: str = typer.Argument(..., help="The task (a copy after the first: NAME#N)."),
    lines: int = typer.Option(200, "--lines", "-n", help="How many lines."),
) -> None:
    """A task's output (its last attempt)."""
    with state_of(ctx).client() as client:
        answer = client.get(f"/runs/{run_id}/logs", task=task, lines=lines)
    typer.echo(answer["text"], nl=False)


@run_app.command("results")
def results(
    ctx: typer.Context,
    run_id: str = typer.Argument(..., help="The run's id."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Where to write the archive (default: run-ID.tar.gz)."
    ),
) -> None:
    """Download a run's results: every task's files, logs and a results.json."""
    target = output or Path(f"run-{run_id}.tar.gz")
    with state_of(ctx).client() as client:
        data = client.get_bytes(f"/runs/{run_id}/results")
    target.write_bytes(data)
    show.note(f"wrote {target} ({show.size(len(data))})")
