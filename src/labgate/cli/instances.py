"""Instance commands of the CLI: launch, ls, stop, logs, keep-alive."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from labgate.cli import output as show
from labgate.cli.context import JSON_OPTION, fail, parse_duration, state_of

if TYPE_CHECKING:
    from labgate.client import Client

FOLLOW_WINDOW = 1000  # lines fetched per poll of `logs --follow`


def launch(
    ctx: typer.Context,
    tool: str = typer.Argument(..., help="The tool to launch (see `labgate tool list`)."),
    cpu: float | None = typer.Option(None, "--cpu", help="CPUs, e.g. 2 or 0.5."),
    memory: str | None = typer.Option(None, "--memory", help="Memory, e.g. 512M or 2G."),
    site: str | None = typer.Option(None, "--site", help="Run on this site."),
    dataset: str | None = typer.Option(
        None, "--dataset", metavar="ID", help="Run next to this dataset, mounted at /data/NAME."
    ),
    choose: list[str] = typer.Option(
        [],
        "--option",
        "-o",
        metavar="NAME=VALUE",
        help="Choose among the site's allowed values, e.g. partition=gpu or time=2:00:00.",
    ),
    param: list[str] = typer.Option(
        [],
        "--param",
        "-p",
        metavar="NAME=VALUE",
        help="A launch parameter of the tool, e.g. app=dash.py (see `labgate tool list`).",
    ),
    wait: bool = typer.Option(
        True, "--wait/--no-wait", help="Follow the launch until the tool is ready."
    ),
    open_browser: bool = typer.Option(False, "--open", help="Open the tool in a web browser."),
    timeout: float = typer.Option(
        600.0, "--timeout", metavar="SECONDS", help="Give up waiting after this long."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Launch a tool and print its URL once it is running."""
    if memory is not None:
        from labgate.units import parse_size

        try:
            parse_size(memory)
        except ValueError as exc:  # a usage mistake (exit 2), found before any request
            raise typer.BadParameter(str(exc), param_hint="'--memory'") from None
    resources = {
        key: value for key, value in (("cpu", cpu), ("memory", memory)) if value is not None
    }
    options = {}
    for item in choose:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--option wants NAME=VALUE, not {item!r}")
        options[name.strip()] = value.strip()
    body: dict[str, Any] = {
        "tool": tool,
        "resources": resources or None,
        "site": site,
        "dataset": dataset,
        "options": options or None,
        "params": parse_params(param) or None,
    }
    instance = start(ctx, body, wait=wait, timeout=timeout, as_json=as_json)
    if open_browser and wait:
        import webbrowser  # only for --open: a few ms of every start-up otherwise

        webbrowser.open(instance["url"])


def start(
    ctx: typer.Context, body: dict[str, Any], *, wait: bool, timeout: float, as_json: bool
) -> dict[str, Any]:
    """Launch (``POST /instances``), follow it when asked, print the URL, id or JSON."""
    with state_of(ctx).client() as client:
        instance: dict[str, Any] = client.post("/instances", body)
        if wait:
            _follow_launch(client, instance, timeout)
            instance = client.get(f"/instances/{instance['id']}")
    if as_json:
        show.print_json(instance)
    elif wait:
        show.line(instance["url"])
    else:
        what = instance["tool"] + (f" from {instance['snapshot']}" if body.get("snapshot") else "")
        show.note(f"launched {what} as {instance['id']} ({instance['state']}); see `labgate ls`")
        show.line(instance["id"])
    return instance


def parse_params(items: list[str]) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict (the portal checks the values); exit 2 on a malformed one."""
    params: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            fail(f"--param wants NAME=VALUE, not {item!r}", code=2)
        params[name.strip()] = value
    return params


def _follow_launch(client: Client, instance: dict[str, Any], timeout: float) -> None:
    """Show the launch's progress until it runs; fail with the reason and log tail otherwise.

    The events' messages come from the site (and the tool's health check): each
    progress and status line shows them :func:`~labgate.cli.output.visible`.
    """
    from labgate.client import TERMINAL_STATES, WaitTimeout

    instance_id, tool = instance["id"], instance["tool"]
    err = show.stderr()
    started = time.monotonic()
    ended: dict[str, Any] | None = None
    try:
        with err.status(show.visible(f"launching {tool} ({instance_id})…", markup=True)) as status:
            for event in client.events(instance_id, deadline=started + timeout):
                current, message = event["state"], event.get("message") or ""
                if current in TERMINAL_STATES:
                    ended = event
                    break
                elapsed = time.monotonic() - started
                err.print(show.visible(f"{elapsed:5.1f}s  {current:<9} {message}"), markup=False)
                if current == "running":
                    return
                status.update(
                    show.visible(f"{tool} ({instance_id}) {current}: {message}", markup=True)
                )
    except WaitTimeout:
        fail(
            f"{tool} ({instance_id}) is not running after {timeout:g}s; "
            f"see `labgate logs {instance_id}`, stop it with `labgate stop {instance_id}`"
        )
    except KeyboardInterrupt:
        show.note(
            f"stopped waiting; {instance_id} keeps starting (`labgate ls`, "
            f"`labgate stop {instance_id}`)"
        )
        raise typer.Exit(130) from None
    if ended is None:
        fail(f"{tool} ({instance_id}) ended before it was ready")
    _launch_failed(instance_id, tool, ended)


def _launch_failed(instance_id: str, tool: str, event: dict[str, Any]) -> NoReturn:
    """One error line with the reason, then the last lines the tool wrote (all made visible)."""
    reason = " ".join((event.get("message") or "no reason given").split())
    show.note(f"error: {tool} ({instance_id}) {event['state']}: {reason}")
    tail = str((event.get("data") or {}).get("log_tail") or "").rstrip()
    if tail:
        show.note("last log lines:")
        for line in tail.splitlines():
            show.note(f"  | {line}")
    raise typer.Exit(1)


def ls(
    ctx: typer.Context,
    all_states: bool = typer.Option(
        False, "--all", "-a", help="Also stopped and failed instances."
    ),
    user: str | None = typer.Option(None, "--user", help="Only this user's (admins)."),
    tool: str | None = typer.Option(None, "--tool", help="Only instances of this tool."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List your instances (admins: everyone's), newest first."""
    with state_of(ctx).client() as client:
        rows = client.get("/instances", active=None if all_states else "true", user=user, tool=tool)
    if as_json:
        show.print_json(rows)
    else:
        hint = "no instances" if all_states else "no active instances (`labgate ls --all`)"
        show.instances(rows, empty=hint)


def stop(
    ctx: typer.Context,
    ids: list[str] = typer.Argument(..., help="Instance ids (see `labgate ls`)."),
    wait: bool = typer.Option(False, "--wait/--no-wait", help="Wait until they have stopped."),
    timeout: float = typer.Option(
        60.0, "--timeout", metavar="SECONDS", help="Give up waiting after this long."
    ),
) -> None:
    """Stop instances."""
    with state_of(ctx).client() as client:
        for instance_id in ids:
            instance = client.delete(f"/instances/{instance_id}")
            if wait:
                instance = _wait_for_end(client, instance_id, timeout)
            show.line(f"{instance_id} {instance['state']}")


def _wait_for_end(client: Client, instance_id: str, timeout: float) -> dict[str, Any]:
    from labgate.client import TERMINAL_STATES

    deadline = time.monotonic() + timeout
    while True:
        instance: dict[str, Any] = client.get(f"/instances/{instance_id}")
        if instance["state"] in TERMINAL_STATES:
            return instance
        if time.monotonic() > deadline:
            fail(f"{instance_id} is still {instance['state']} after {timeout:g}s")
        time.sleep(0.2)


def logs(
    ctx: typer.Context,
    instance_id: str = typer.Argument(..., metavar="ID", help="The instance."),
    lines: int = typer.Option(100, "--lines", "-n", min=1, max=10000, help="How many lines."),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new output until the instance ends."
    ),
    interval: float = typer.Option(1.0, "--interval", min=0.1, help="Seconds between polls."),
) -> None:
    """Print an instance's recent output."""
    with state_of(ctx).client() as client:
        seen = _log_lines(client, instance_id, lines)
        _write(seen)
        if not follow:
            return
        from labgate.client import TERMINAL_STATES

        try:
            while True:
                # Read the state first: output written before the end is then never missed.
                finished = client.get(f"/instances/{instance_id}")["state"] in TERMINAL_STATES
                window = _log_lines(client, instance_id, FOLLOW_WINDOW)
                _write(new_lines(seen, window))
                seen = window
                if finished:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


def _log_lines(client: Client, instance_id: str, count: int) -> list[str]:
    text: str = client.get(f"/instances/{instance_id}/logs", lines=count)["text"]
    return text.splitlines()


def new_lines(seen: list[str], window: list[str], anchor_size: int = 20) -> list[str]:
    """The lines of ``window`` that come after what was ``seen``.

    The end of ``seen`` is looked for in ``window``: as a whole, else as an
    overlap with its start. When neither is found (more new output than one
    window holds) the whole window is new.
    """
    anchor = seen[-anchor_size:]
    size = len(anchor)
    if not size:
        return window
    for end in range(len(window), size - 1, -1):
        if window[end - size : end] == anchor:
            return window[end:]
    for overlap in range(min(size, len(window)) - 1, 0, -1):
        if anchor[size - overlap :] == window[:overlap]:
            return window[overlap:]
    return window


def _write(lines: list[str]) -> None:
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


# --- keep-alive ----------------------------------------------------------------------


def _until(value: str) -> str:
    """An ISO 8601 time; without a zone it is local time."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"expected a time such as 2026-11-22T18:00, not {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.astimezone(UTC).isoformat()


def _countdown(view: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    lines = {"instance": view["instance"], "state": view["state"]}
    until = view.get("keep_alive_until")
    lines["kept alive until"] = (
        f"{show.when(until)} ({_left(datetime.fromisoformat(until) - now)})" if until else "-"
    )
    if view.get("cull_at"):
        reason = {"idle": "if unused", "lifetime": "maximum lifetime"}.get(view["cull_reason"], "")
        lines["stops"] = (
            f"{show.when(view['cull_at'])} (in {_left_seconds(view['cull_in'])}, {reason})"
        )
    else:
        lines["stops"] = "not by itself"
    if view.get("capped"):
        lines["note"] = (
            f"cut to the longest keep-alive allowed ({_left_seconds(view['keep_alive_max'])})"
        )
    show.mapping(lines, key="KEEP-ALIVE")


def _left(delta: Any) -> str:
    return _left_seconds(delta.total_seconds())


def _left_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def keep_alive(
    ctx: typer.Context,
    instance_id: str = typer.Argument(..., metavar="ID", help="The instance."),
    until: str | None = typer.Option(None, "--until", help="Keep it until then (ISO 8601 time)."),
    for_: str | None = typer.Option(None, "--for", help="Keep it this long, e.g. 4h."),
    off: bool = typer.Option(False, "--off", help="End the keep-alive."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Spare an idle instance until a time; without options, show when it stops."""
    if sum((until is not None, for_ is not None, off)) > 1:
        fail("give one of --until, --for, --off")
    seconds = parse_duration(for_, "--for")  # a bad value is a usage error before any request
    path = f"/instances/{instance_id}/keep-alive"
    with state_of(ctx).client() as client:
        if off:
            view = client.delete(path)
        elif until is not None:
            view = client.put(path, {"until": _until(until)})
        elif for_ is not None:
            view = client.put(path, {"for": seconds})
        else:
            view = client.get(path)
    show.print_json(view) if as_json else _countdown(view)
