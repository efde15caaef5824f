"""What every CLI command shares: global options, settings, the client, one-line errors.

A failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from typer._click.exceptions import UsageError
from typer.core import TyperGroup

from labgate.errors import ConfigError

if TYPE_CHECKING:
    from labgate.client import Client
    from labgate.config import Settings

# The CLI starts in well under 0.3 s because nothing here imports httpx, pydantic,
# SQLAlchemy or the server: each command imports what it needs when it runs
# (tests/cli/test_startup.py holds this).

_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_LOGIN_HINT = "; run `labgate login` or set LABGATE_TOKEN"

JSON_OPTION = typer.Option(False, "--json", help="Print the raw JSON the API returned.")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``error:`` line on stderr and exit."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(code)


def fail_config(exc: ConfigError) -> NoReturn:
    """Print one ``error:`` line per configuration problem on stderr, and exit 1."""
    for problem in exc.problems[:-1]:
        typer.echo(f"error: {problem}", err=True)
    fail(exc.problems[-1] if exc.problems else str(exc))


class LabgateGroup(TyperGroup):
    """The root command group: turns every expected failure into one ``error:`` line."""

    # Typed Any: the context class lives in typer's private vendored click.
    def invoke(self, ctx: Any) -> Any:
        """Run the command; report errors as one line instead of a traceback."""
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail_config(exc)
        except UsageError as exc:  # a bad option or value of a command: one line too, exit 2
            where = exc.ctx.command_path if exc.ctx is not None else "labgate"
            fail(f"{exc.format_message()} (see `{where} --help`)", code=2)
        except Exception as exc:
            _fail_expected(exc)
            raise


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

    def target(self, url: str | None = None) -> tuple[str, str | None]:
        """The server URL and token to use."""
        from labgate.client import load_saved_login, resolve_target
        from labgate.configfile import client_settings

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
