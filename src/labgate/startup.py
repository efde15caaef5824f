"""Loading the settings and checking them before labgate serves anything.

Every way a configuration can be wrong ends here as a
:class:`~labgate.errors.ConfigError`: one plain sentence per problem, naming
the setting and what is wrong with it, which the CLI prints as ``error:``
lines (exit 1, no traceback)::

    settings = load_settings(port=port)  # bad values, bad JSON, a missing LABGATE_CONFIG
    check_startup(settings)              # the machine: data dir, sites' backends, ...
    db = open_database(settings.effective_database_url)  # URL, driver, server, file

``check_startup`` is the one place for start-up refusals: a new check is a
function taking the settings and raising ``ConfigError``, called from it.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from labgate.config import Settings, SiteConfig
from labgate.configfile import CONFIG_ENV, config_file
from labgate.errors import ConfigError

if TYPE_CHECKING:
    # Imported when a backend is built: CLI commands that only read settings stay fast.
    from labgate.backends.base import Backend

#: A value longer than this is not repeated in an error line.
_SHOWN_INPUT = 60
_FIELD_IN_SETTINGS_ERROR = re.compile(r'field "([a-z_]+)"')


def env_name(setting: str) -> str:
    """The environment variable of a setting."""
    return f"LABGATE_{setting.upper()}"


def _is_secret(setting: str) -> bool:
    field = Settings.model_fields.get(setting)
    return field is not None and field.annotation is SecretStr


def _setting_path(loc: tuple[int | str, ...]) -> str:
    """``('sites', 0, 'backend')`` as ``sites[0].backend``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One sentence per bad setting: its name, its variable, the problem, the value given."""
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc:
            problems.append(f"invalid settings: {message}")
            continue
        top = str(loc[0])
        if error["type"] == "extra_forbidden" and len(loc) == 1:
            problems.append(f"unknown setting {top!r} (see docs/configuration.md)")
            continue
        where = _setting_path(loc)
        given = error.get("input")
        shown = ""
        if isinstance(given, str | int | float) and not _is_secret(top):
            text = repr(given)
            if len(text) <= _SHOWN_INPUT:
                shown = f" (got {text})"
        problems.append(f"invalid setting {where} ({env_name(top)}): {message}{shown}")
    return problems


def describe_settings_source_error(exc: SettingsError) -> str:
    """A value pydantic-settings could not even parse (bad JSON in the environment)."""
    match = _FIELD_IN_SETTINGS_ERROR.search(str(exc))
    cause = exc.__cause__
    if match is None:
        return f"invalid settings: {exc}" + (f": {cause}" if cause else "")
    setting = match.group(1)
    reason = f"not valid JSON ({cause})" if cause else str(exc)
    return f"invalid setting {setting} ({env_name(setting)}): {reason}"


def load_settings(**overrides: Any) -> Settings:
    """The effective settings, or a :class:`ConfigError` naming each bad one.

    Overrides that are ``None`` (command-line options not given) are left out.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise ConfigError(*describe_validation_error(exc)) from None
    except SettingsError as exc:
        raise ConfigError(describe_settings_source_error(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read the settings file {config_file()}: {exc}") from None
    except OSError as exc:  # the file named by LABGATE_CONFIG cannot be read
        where = os.environ.get(CONFIG_ENV) or exc.filename
        raise ConfigError(f"cannot read the settings file {where}: {exc.strerror}") from None


# --- start-up checks: the machine agrees with the settings ---------------------------


def check_data_dir(settings: Settings) -> None:
    """The data directory is a directory that exists (made here if need be) and is writable."""
    path = settings.data_dir
    name = f"data_dir ({env_name('data_dir')})"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {path} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: see labgate.datadir
    except OSError as exc:
        raise ConfigError(f"{name}: cannot create {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {path} is not writable by this user (uid {os.geteuid()})")


def check_tools_dir(settings: Settings) -> None:
    """A ``tools_dir`` that is set exists (its bad files are skipped, each with a warning)."""
    path = settings.tools_dir
    if path is not None and not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(f"tools_dir ({env_name('tools_dir')}): {path} {what}")


def options_problem(exc: BaseException) -> str:
    """A backend's refusal of its options, in one line."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        return "; ".join(
            f"options.{_setting_path(tuple(error['loc']))}: {error['msg']}"
            for error in cause.errors()
        )
    return str(exc)


def build_backend(settings: Settings, site: SiteConfig) -> Backend:
    """The backend of ``site``, or a :class:`ConfigError` naming the site and the problem."""
    from labgate.backends.base import BackendNotFound, load_backend

    where = f"invalid setting sites ({env_name('sites')}): site {site.name!r}"
    try:
        cls = load_backend(site.backend)
    except BackendNotFound as exc:
        raise ConfigError(f"{where}: {exc.detail}") from None
    try:
        return cls(settings, site.options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}, {site.backend} backend: {options_problem(exc)}") from None


def check_sites(settings: Settings) -> None:
    """Every site names an installed backend, which accepts the site's options."""
    for site in settings.effective_sites:
        build_backend(settings, site)


def check_startup(settings: Settings) -> None:
    """Refuse to start, with one clear line, when the settings or this machine are wrong.

    Called by ``labgate serve`` before it opens the database or a port. Each
    check raises :class:`ConfigError`; add new checks here, in the order an
    operator would fix them.
    """
    check_data_dir(settings)
    check_tools_dir(settings)
    check_sites(settings)
