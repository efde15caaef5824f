"""The ``labgate`` command line: run the server, and use one from a terminal.

Every command that talks to a server goes through the REST API
(:mod:`labgate.client`), so anything the CLI does a script can do too. A
failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.

One module per command group; this one builds the root app. The order of
registration is the order ``labgate --help`` lists them in. Command groups
(``labgate user …``, ``labgate dataset …``) are imported only when used, so
that ``labgate ls`` and ``labgate version`` start fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from labgate.cli import account, agent, instances, limits, ops, serve
from labgate.cli.context import CliState, LabgateGroup


class RootGroup(LabgateGroup):
    """``labgate``: the commands below, and command groups loaded when they are used."""

    # In the order `labgate --help` lists them, after the commands: (Typer app, help).
    lazy_groups = {
        "config": ("labgate.cli.ops:config_app", "Inspect labgate's settings."),
        "user": ("labgate.cli.users:user_app", "Manage user accounts (admins)."),
        "token": ("labgate.cli.account:token_app", "Create, list and revoke API tokens."),
        "tool": ("labgate.cli.ops:tool_app", "The tool catalog."),
        "site": (
            "labgate.cli.sites:site_app",
            "The sites instances run on (network sites: added by admins).",
        ),
        "share": (
            "labgate.cli.shares:share_app",
            "Share your instances with users and groups, or by link.",
        ),
        "dataset": (
            "labgate.cli.datasets:dataset_app",
            "Datasets: register them, say where replicas are, resolve identifiers.",
        ),
        "group": ("labgate.cli.limits:group_app", "Groups of users and their limits (admins)."),
        "quota": ("labgate.cli.limits:quota_app", "Users' limits and what they use."),
        "pool": ("labgate.cli.ops:pool_app", "Warm pools of pre-started instances."),
        "image": (
            "labgate.cli.images:image_app",
            "Container images of tools: build them on a site's engine.",
        ),
        "run": ("labgate.cli.runs:run_app", "Batch runs: pipelines of stages of tasks."),
        "snapshot": (
            "labgate.cli.snapshots:snapshot_app",
            "Save a running instance as a snapshot, share it, and launch from it.",
        ),
    }


app = typer.Typer(
    name="labgate",
    cls=RootGroup,
    help="labgate: research tools next to the data, behind one authenticated front door.",
    no_args_is_help=True,
    add_completion=False,
    # Plain help: typer's Rich help imports Rich's Markdown and tracebacks, 0.1 s
    # of every `--help` (benchmarks/cli_startup.py).
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    pretty_exceptions_show_locals=False,  # locals would include tokens and passwords
)


@app.callback()
def root(
    ctx: typer.Context,
    url: str | None = typer.Option(
        None, "--url", metavar="URL", help="Server URL (default: setting `url`, saved login)."
    ),
    token: str | None = typer.Option(
        None, "--token", metavar="TOKEN", help="API token (default: setting `token`, saved login)."
    ),
) -> None:
    """labgate: research tools next to the data, behind one authenticated front door."""
    ctx.obj = CliState(url=url, token=token)


# (name, function): a None name is the function's. Instances come last, so `--help`
# lists the everyday commands just above the groups.
COMMANDS: tuple[tuple[str | None, Callable[..., None]], ...] = (
    (None, serve.serve),
    (None, serve.portal),
    (None, serve.router),
    (None, agent.agent),
    (None, serve.version),
    (None, account.login),
    (None, account.logout),
    (None, account.whoami),
    (None, limits.usage),
    ("keep-alive", instances.keep_alive),
    (None, ops.doctor),
    (None, ops.backup),
    (None, ops.restore),
    (None, instances.launch),
    (None, instances.ls),
    (None, instances.stop),
    (None, instances.logs),
)
for name, command in COMMANDS:
    app.command(name)(command)


def main() -> None:
    """Entry point of the ``labgate`` script."""
    # `import httpx` also imports httpx's own command line (click, Pygments, Rich's
    # progress bars): a fifth of `labgate ls`, for a program labgate never runs
    # (encode/httpx#3547). None in sys.modules makes that import fail, and httpx
    # then defines a stub `httpx.main` instead.
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    app()


if __name__ == "__main__":
    main()
