"""What every CLI command shares: global options, settings, the client, one-line errors.

A failure is one line on stderr (``error: <detail> (<code>)``) and exit code 1;
a usage mistake is exit code 2; an interrupted wait is 130.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from labgate.client import ApiError, Client, ClientError, load_saved_login, resolve_target
from labgate.config import Settings
from labgate.errors import ConfigError
from labgate.startup import describe_validation_error, load_settings

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
        except ApiError as exc:
            hint = _LOGIN_HINT if exc.code in ("unauthorized", "invalid_token") else ""
            fail(f"{exc}{hint}")
        except ClientError as exc:
            fail(str(exc))
        except ConfigError as exc:
            fail_config(exc)
        except ValidationError as exc:  # settings made by hand, not through load_settings
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
            self._settings = load_settings()
        return self._settings

    def target(self, url: str | None = None) -> tuple[str, str | None]:
        """The server URL and token to use."""
        settings = self.settings()
        return resolve_target(
            url or self.url,
            self.token,
            settings_url=settings.url,
            settings_token=settings.token.get_secret_value(),
            saved=load_saved_login(),
        )

    def client(self) -> Client:
        """A client of the chosen server."""
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


def parse_duration(value: str | None) -> int | None:
    """Seconds from ``3600``, ``90m``, ``12h``, ``30d`` or ``2w``."""
    if value is None:
        return None
    match = _DURATION_RE.match(value.lower())
    if not match or int(match.group(1)) == 0:
        raise typer.BadParameter(
            f"expected a duration such as 3600, 90m, 12h or 30d, not {value!r}"
        )
    return int(match.group(1)) * _DURATION_UNITS[match.group(2)]
