"""Where labgate's settings come from, read without building them all.

:mod:`labgate.config` defines every setting with pydantic-settings, which
takes a good part of a CLI command's start-up to import. A command that only
talks to a server needs two settings, ``url`` and ``token``:
:func:`client_settings` reads them from the same places with the same
priority (the environment, then the TOML file), and says when it cannot, so
the caller falls back to the full settings and their error messages.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from labgate.errors import ConfigError

CONFIG_ENV = "LABGATE_CONFIG"
DEFAULT_CONFIG_FILE = "labgate.toml"
ENV_PREFIX = "LABGATE_"


def config_file() -> Path | None:
    """The TOML settings file in effect, if any.

    A file named by ``LABGATE_CONFIG`` must exist: silently running on the
    defaults instead of the operator's settings is worse than refusing.
    ``./labgate.toml`` is read only when it is the user's own (see
    :func:`check_working_directory_file`).
    """
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise ConfigError(f"{CONFIG_ENV} names {path}, which {what}")
        return path
    default = Path(DEFAULT_CONFIG_FILE)
    if not default.is_file():
        return None
    check_working_directory_file(default)
    return default


def account_name(uid: int) -> str:
    """``alice (uid 1000)``, or ``uid 1000`` for a uid without an account."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_working_directory_file(path: Path) -> None:
    """Refuse ``./labgate.toml`` unless it is the user's own and only theirs to change.

    In a shared folder (``/tmp``, a group's project directory) the file may be
    another account's, and its ``url`` would get the user's password (``labgate
    login``) and commands their settings. So the file (and the link, if it is
    one) must belong to the user (or root) and be writable by nobody else; a
    file named by ``LABGATE_CONFIG`` is the user's explicit choice and is not
    checked. One line says why and what to do instead.
    """
    shown = f"./{path.name}"
    anyway = f"to use it anyway, name it: LABGATE_CONFIG={path.resolve()}"
    try:
        link, target = os.lstat(path), os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {shown}: {exc.strerror}") from None
    me = os.geteuid()
    for info in (link, target):
        if info.st_uid not in (me, 0):
            raise ConfigError(
                f"{shown} belongs to {account_name(info.st_uid)}, not to you: "
                f"not read, another account's settings could send your password and token "
                f"to its server; {anyway}"
            )
    if target.st_mode & 0o022:
        raise ConfigError(
            f"{shown} may be changed by other accounts (mode {target.st_mode & 0o7777:04o}): "
            f"not read; run `chmod go-w {path}`, or {anyway}"
        )


def read_in_working_directory(name: str) -> bool:
    """Whether the setting ``name``, when set, comes from ``./labgate.toml``.

    That is: not from the environment, and no ``LABGATE_CONFIG`` names the
    file. Such a file is in the folder the command runs in, which may be a
    checkout of someone else's project: the CLI sends it no credential of
    the user's (:func:`labgate.client.resolve_target`).
    """
    return _from_environment(name) is None and not os.environ.get(CONFIG_ENV)


def _from_environment(name: str) -> str | None:
    """``LABGATE_<NAME>``, spelled in any case (as pydantic-settings reads it)."""
    wanted = (ENV_PREFIX + name).lower()
    for key, value in os.environ.items():
        if key.lower() == wanted:
            return value
    return None


_CLIENT_ONLY = {"url", "token"}


def client_settings() -> dict[str, str] | None:
    """The ``url`` and ``token`` settings, or None when only the full settings can tell.

    None as soon as any other setting is given (in the environment or the TOML
    file): every command checks the settings it is given, so a bad one is
    still reported (one line naming it) rather than silently ignored. None
    too when the file cannot be read or gives them as something other than
    text: :func:`labgate.startup.load_settings` then says what is wrong.
    """
    allowed = {(ENV_PREFIX + name).lower() for name in _CLIENT_ONLY} | {CONFIG_ENV.lower()}
    if any(
        k.lower().startswith(ENV_PREFIX.lower()) and k.lower() not in allowed for k in os.environ
    ):
        return None
    found: dict[str, str] = {}
    for name in ("url", "token"):
        value = _from_environment(name)
        if value is not None:
            found[name] = value
    if len(found) < 2:
        path = config_file()
        if path is not None:
            try:
                with path.open("rb") as handle:
                    data = tomllib.load(handle)
            except (OSError, tomllib.TOMLDecodeError):
                return None
            if set(data) - _CLIENT_ONLY:
                return None
            for name in ("url", "token"):
                if name in found or name not in data:
                    continue
                if not isinstance(data[name], str):
                    return None
                found[name] = data[name]
    return {"url": found.get("url", "").rstrip("/"), "token": found.get("token", "")}
