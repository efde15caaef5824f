"""What every CLI command shares: global options, settings, the client, one-line errors.

A failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError
from typer._click.utils import make_default_short_help
from typer.core import TyperGroup
from typer.main import get_group_from_info
from typer.models import TyperInfo

from labgate.cli.output import visible
from labgate.errors import ConfigError

if TYPE_CHECKING:
    from labgate.client import Client
    from labgate.config import Settings

# The CLI starts in well under 0.3 s because nothing here imports httpx, pydantic,
# SQLAlchemy or the server: each command imports what it needs when it runs
# (tests/test_cli_startup.py holds this).

_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LOGIN_HINT = "; run `labgate login` or set LABGATE_TOKEN"

JSON_OPTION = typer.Option(False, "--json", help="Print the raw JSON the API returned.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``error:`` line on stderr and exit; control characters are shown, not sent."""
    typer.echo(f"error: {visible(' '.join(message.split()))}", err=True)
    raise typer.Exit(code)


def fail_config(exc: ConfigError) -> NoReturn:
    """Print one ``error:`` line per configuration problem on stderr, and exit 1."""
    for problem in exc.problems[:-1]:
        typer.echo(f"error: {visible(problem)}", err=True)
    fail(exc.problems[-1] if exc.problems else str(exc))


class LabgateGroup(TyperGroup):
    """The root command group: loads command groups when used; one ``error:`` line per failure.

    ``lazy_groups`` maps a group's name to the ``module:attribute`` of its Typer
    app and its help (what ``add_typer`` would be given). The module is imported,
    and the group's commands built, only when the group is named on the command
    line: ``labgate ls``, ``labgate version`` and ``labgate --help`` load none.
    """

    lazy_groups: dict[str, tuple[str, str]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suggest_commands = False  # typer's suggestions know only the loaded commands

    # Typed Any: the context and formatter classes live in typer's private vendored click.
    def list_commands(self, ctx: Any) -> list[str]:
        """The commands, then the groups, in the order they were registered."""
        names = super().list_commands(ctx)
        return [*names, *(name for name in self.lazy_groups if name not in names)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command or group ``cmd_name``, loading a lazy group on first use."""
        if cmd_name not in self.commands and cmd_name in self.lazy_groups:
            target, help_text = self.lazy_groups[cmd_name]
            group = load_group(cmd_name, target, help_text, self.rich_markup_mode)
            self.add_command(group, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The ``Commands`` section of ``--help``, naming lazy groups without loading them."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, make_default_short_help(self.lazy_groups[name][1], limit)))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Like click's, and a misspelt name is matched against the lazy groups too."""
        try:
            return super().resolve_command(ctx, args)
        except UsageError as exc:
            matches = get_close_matches(args[0], self.list_commands(ctx)) if args else []
            if matches:
                suggestions = ", ".join(repr(match) for match in matches)
                exc.message = f"{exc.message.rstrip('.')}. Did you mean {suggestions}?"
            raise

    def invoke(self, ctx: Any) -> Any:
        """Run the command; report errors as one line instead of a traceback."""
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail_config(exc)
        except NoArgsIsHelpError:  # `labgate user`: typer prints the group's help, exit 2
            raise
        except UsageError as exc:  # a bad option or value of a command: one line too, exit 2
            where = exc.ctx.command_path if exc.ctx is not None else "labgate"
            fail(f"{exc.format_message()} (see `{where} --help`)", code=2)
        except Exception as exc:
            _fail_expected(exc)
            raise


def load_group(name: str, target: str, help_text: str, markup: Any) -> TyperGroup:
    """The command group ``name`` of the Typer app at ``target`` (``module:attribute``).

    Built as ``add_typer(app, name=name, help=help_text)`` would have built it;
    ``markup`` is the root's ``rich_markup_mode``, which a group inherits.
    """
    module_name, _, attribute = target.partition(":")
    sub_app = getattr(importlib.import_module(module_name), attribute)
    return get_group_from_info(
        TyperInfo(sub_app, name=name, help=help_text),
        pretty_exceptions_short=True,
        suggest_commands=True,
        rich_markup_mode=markup,
    )


def _fail_expected(exc: Exception) -> None:
    """Exit with one line if ``exc`` is an expected failure; return if it is not.

    The exception classes are looked up only when their module was imported: an
    error of the client cannot happen in a command that never loaded it.
    """
    if "labgate.client" in sys.modules:
        from labgate.client import ApiError, ClientError

        if isinstance(exc, ApiError):
            hint = _LOGIN_HINT if exc.code in ("unauthorized", "invalid_token") else ""
            fail(f"{exc}{hint}")
        if isinstance(exc, ClientError):
            fail(str(exc))
    if "pydantic" in sys.modules:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):  # settings made by hand, not through load_settings
            from labgate.startup import describe_validation_error

            fail_config(ConfigError(*describe_validation_error(exc)))


@dataclass
class CliState:
    """The global options, and the settings and client they lead to (made on demand)."""

    url: str | None = None
    token: str | None = None
    _settings: Settings | None = field(default=None, repr=False)

    def settings(self) -> Settings:
        """The effective settings (environment, labgate.toml, defaults)."""
        if self._settings is None:
            from labgate.startup import load_settings

            self._settings = load_settings()
        return self._settings

    def target(self, url: str | None = None, *, password: bool = False) -> tuple[str, str | None]:
        """The server URL and token to use (``password``: the server ``labgate login`` signs in to).

        A URL read from ``./labgate.toml`` gets no token nor password of the
        user's unless it is the saved login's (:func:`labgate.client.resolve_target`).
        """
        from labgate.client import load_saved_login, resolve_target
        from labgate.configfile import client_settings, read_in_working_directory

        # Only two settings matter here: read them without building all settings
        # (that import is most of a command's start-up), unless only those can say.
        found = client_settings() if self._settings is None else None
        if found is None:
            settings = self.settings()
            found = {"url": settings.url, "token": settings.token.get_secret_value()}
        return resolve_target(
            url or self.url,
            self.token,
            settings_url=found["url"],
            settings_token=found["token"],
            saved=load_saved_login(),
            url_from_folder=read_in_working_directory("url"),
            token_from_folder=read_in_working_directory("token"),
            password=password,
        )

    def client(self) -> Client:
        """A client of the chosen server."""
        from labgate.client import Client

        url, token = self.target()
        return Client(url, token)


def state_of(ctx: typer.Context) -> CliState:
    """The :class:`CliState` the root callback stored."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, CliState) else CliState()


def read_secret(prompt: str, *, from_stdin: bool, confirm: bool = False) -> str:
    """A password from one line of stdin, or typed at a hidden prompt."""
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            fail("expected a password on standard input")
        return line
    value: str = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    return value


def parse_duration(value: str | None, option: str | None = None) -> int | None:
    """Seconds from ``3600``, ``90m``, ``12h``, ``30d`` or ``2w``; ``option`` is named in errors."""
    if value is None:
        return None
    match = _DURATION_RE.match(value.lower())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(
            f"expected a duration such as 3600, 90m, 12h or 30d, not {value!r}",
            param_hint=f"'{option}'" if option else None,
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]
