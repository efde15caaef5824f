"""The ``labgate`` command line: run the server, and use one from a terminal.

Every command that talks to a server goes through the REST API
(:mod:`labgate.client`), so anything the CLI does a script can do too. A
failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.

One module per command group; this one builds the root app. The order of
registration is the order ``labgate --help`` lists them in.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from labgate.cli import (
    account,
    agent,
    images,
    instances,
    limits,
    ops,
    runs,
    serve,
    shares,
    sites,
    snapshots,
    users,
)
from labgate.cli.context import CliState, LabgateGroup
from labgate.cli.datasets import dataset_app

app = typer.Typer(
    name="labgate",
    cls=LabgateGroup,
    help="labgate: research tools next to the data, behind one authenticated front door.",
    no_args_is_help=True,
    add_completion=False,
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
    (None, serve.router),
    (None, agent.agent),
    (None, serve.version),
    (None, account.login),
    (None, account.logout),
    (None, account.whoami),
    (None, limits.usage),
    ("keep-alive", instances.keep_alive),
    (None, ops.doctor),
    (None, instances.launch),
    (None, instances.ls),
    (None, instances.stop),
    (None, instances.logs),
)
for name, command in COMMANDS:
    app.command(name)(command)

app.add_typer(ops.config_app, name="config")
app.add_typer(users.user_app, name="user")
app.add_typer(account.token_app, name="token")
app.add_typer(ops.tool_app, name="tool")
app.add_typer(sites.site_app, name="site")
app.add_typer(shares.share_app, name="share")
app.add_typer(dataset_app, name="dataset")
app.add_typer(limits.group_app, name="group")
app.add_typer(limits.quota_app, name="quota")
app.add_typer(ops.pool_app, name="pool")
app.add_typer(images.image_app, name="image")
app.add_typer(runs.run_app, name="run")
app.add_typer(snapshots.snapshot_app, name="snapshot")


def main() -> None:
    """Entry point of the ``labgate`` script."""
    app()


if __name__ == "__main__":
    main()
