"""A small synchronous client of labgate's REST API, used by the CLI.

It knows where the server is and which token to send (the ``url`` and
``token`` settings, else what ``labgate login`` saved in
``$XDG_CONFIG_HOME/labgate/client.toml``), turns every failure into one
exception with a one-line message, and follows an instance's Server-Sent
Events, reconnecting with ``Last-Event-ID`` when the connection drops.

::

    ClientError              base; ``str()`` is one line meant for a person
    ├── ApiError             the server answered {"error": code, "detail": text}
    ├── ConnectionFailed     the server could not be reached, or broke off
    ├── WaitTimeout          an instance did not reach the awaited state in time
    └── ClientConfigError    client.toml cannot be read or written
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import ssl
import stat
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from labgate import __version__
from labgate.configfile import account_name

DEFAULT_URL = "http://127.0.0.1:8000"
CLIENT_CONFIG = "client.toml"
TERMINAL_STATES = frozenset({"stopped", "failed", "lost"})
TOKEN_PREFIX_LENGTH = 8
# The server sends a keep-alive comment every 15 s, so a silent minute is a dead link.
STREAM_READ_TIMEOUT = 60.0
RECONNECT_DELAY = 1.0
RECONNECT_ATTEMPTS = 10
# client.toml is read and written without following a link (nor blocking on a FIFO).
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class ClientError(Exception):
    """Base of the client's errors; its text is one line meant for a person."""


class ApiError(ClientError):
    """The server refused a request with its one JSON error shape."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{detail} ({code})")
        self.status = status
        self.code = code
        self.detail = detail


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke."""


class WaitTimeout(ClientError):
    """Waiting for an instance took longer than allowed."""


class ClientConfigError(ClientError):
    """The client's own config file cannot be read or written."""


# --- the saved login ------------------------------------------------------


@dataclass(frozen=True)
class SavedLogin:
    """What ``labgate login`` keeps: a server URL and an API token for it."""

    url: str
    token: str


def client_config_path() -> Path:
    """``$XDG_CONFIG_HOME/labgate/client.toml`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "labgate" / CLIENT_CONFIG


def _check_private_folder(dir_fd: int, folder: Path) -> None:
    """The folder of ``client.toml`` is the user's own, and only they may change what is in it.

    Anyone who can write in it could plant a link where the login is written
    (and receive the token) or a ``client.toml`` of their own (and receive the
    next commands, password-less sign-ins included).
    """
    info = os.fstat(dir_fd)
    me = os.geteuid()
    if info.st_uid != me:
        raise ClientConfigError(
            f"{folder} belongs to {account_name(info.st_uid)}, not to you: "
            "labgate keeps no login there; remove it, or set XDG_CONFIG_HOME to a folder of yours"
        )
    if info.st_mode & 0o022:
        raise ClientConfigError(
            f"{folder} may be changed by other accounts (mode {info.st_mode & 0o7777:04o}): "
            f"labgate keeps no login there; run `chmod 700 {folder}`"
        )


def _open_folder(folder: Path) -> int:
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def load_saved_login(path: Path | None = None) -> SavedLogin | None:
    """The saved URL and token, or None when nothing was saved.

    The file is trusted only in a folder of the user's that nobody else may
    change, as a regular file of theirs (no link) that nobody else may change.
    """
    path = path or client_config_path()
    try:
        dir_fd = _open_folder(path.parent)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ClientConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        try:
            fd = os.open(path.name, _READ_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
            raise ClientConfigError(f"cannot read {path}: {reason or exc}") from None
        with os.fdopen(fd, "rb") as handle:
            _check_private_folder(dir_fd, path.parent)
            info = os.fstat(handle.fileno())
            me = os.geteuid()
            if not stat.S_ISREG(info.st_mode):
                raise ClientConfigError(f"cannot read {path}: not a regular file")
            if info.st_uid != me:
                raise ClientConfigError(
                    f"{path} belongs to {account_name(info.st_uid)}, not to you: "
                    "not read; remove it and run `labgate login`"
                )
            if info.st_mode & 0o022:
                raise ClientConfigError(
                    f"{path} may be changed by other accounts (mode "
                    f"{info.st_mode & 0o7777:04o}): not read; run `chmod 600 {path}`"
                )
            try:
                data = tomllib.load(handle)
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ClientConfigError(f"cannot read {path}: {exc}") from None
    finally:
        os.close(dir_fd)
    url, token = data.get("url", ""), data.get("token", "")
    if not isinstance(url, str) or not isinstance(token, str):
        raise ClientConfigError(f"{path}: url and token must be strings")
    if not url and not token:
        return None
    return SavedLogin(url=url.rstrip("/"), token=token)


def _toml_string(value: str) -> str:
    # A JSON string (without ASCII escaping) is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def save_login(login: SavedLogin, path: Path | None = None) -> Path:
    """Write the saved login (an empty token is left out); the file is private (0600).

    The folder must be the user's and nobody else's to change (it is made
    0700 when missing). The file is written under a new name, created with
    ``O_EXCL|O_NOFOLLOW`` (a link or file planted there is never written
    through) and made 0600 on its descriptor before the first byte, then
    renamed over ``client.toml``; all relative to the checked folder's
    descriptor, so the folder cannot be swapped in between.
    """
    path = path or client_config_path()
    lines = ["# Written by `labgate login`; holds an API token, keep it private.\n"]
    if login.url:
        lines.append(f"url = {_toml_string(login.url)}\n")
    if login.token:
        lines.append(f"token = {_toml_string(login.token)}\n")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = _open_folder(path.parent)
    except OSError as exc:
        raise ClientConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    partial = f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}"
    try:
        _check_private_folder(dir_fd, path.parent)
        fd = os.open(partial, _CREATE_FLAGS, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            # 0600 before the first byte, whatever the umask made of the mode.
            os.fchmod(handle.fileno(), 0o600)
            handle.writelines(lines)
        os.rename(partial, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=dir_fd)
        raise ClientConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        os.close(dir_fd)
    return path


def resolve_target(
    url: str | None,
    token: str | None,
    *,
    settings_url: str = "",
    settings_token: str = "",
    saved: SavedLogin | None = None,
    url_from_folder: bool = False,
    token_from_folder: bool = False,
    password: bool = False,
) -> tuple[str, str | None]:
    """The server URL and token to use, highest priority first.

    URL: the option, the ``url`` setting, the saved login, the default.
    Token: the option, the ``token`` setting, then the saved token, but only
    when the URL is the one it was saved for: a token never goes to a server
    it was not issued by.

    ``url_from_folder`` and ``token_from_folder`` say that the settings were
    read from ``./labgate.toml`` (not the environment, not a file named by
    ``LABGATE_CONFIG``): a file of the folder the command runs in, perhaps a
    checkout of someone else's project. A URL from there, unless it is the
    saved login's, gets no credential of the user's: a token given with
    ``--token`` or ``LABGATE_TOKEN`` is refused, and so is a password
    (``password``: the target of ``labgate login``). It may still get the
    token the same file gives.
    """
    chosen_url = (url or settings_url or (saved.url if saved else "") or DEFAULT_URL).rstrip("/")
    chosen_token = token or settings_token or None
    if chosen_token is None and saved is not None and saved.token and saved.url == chosen_url:
        chosen_token = saved.token
    folder_url = (
        not url
        and bool(settings_url)
        and url_from_folder
        and (saved is None or saved.url != chosen_url)
    )
    if folder_url:
        where = f"{chosen_url} is the url of ./labgate.toml, a file of the current directory"
        fixes = "give the server with --url or LABGATE_URL, or name the file with LABGATE_CONFIG"
        if password:
            raise ClientError(
                f"not sending your password: {where}; {fixes} (`labgate login --url {chosen_url}`)"
            )
        if token or (settings_token and not token_from_folder):
            given = "--token" if token else "LABGATE_TOKEN"
            raise ClientError(f"not sending the token of {given}: {where}; {fixes}")
    return chosen_url, chosen_token


def check_url(url: str) -> str:
    """``url`` without a trailing slash, if it is an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError(f"the server URL must look like http://host:port, not {url!r}")
    return url.rstrip("/")


# --- Server-Sent Events ---------------------------------------------------


@dataclass
class Event:
    """One Server-Sent Event."""

    id: str | None = None
    event: str = "message"
    data: str = ""

    def json(self) -> dict[str, Any]:
        """The data as a JSON object (an empty one when it is not)."""
        try:
            value = json.loads(self.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass
class EventParser:
    """Turns the lines of a ``text/event-stream`` into events (the WHATWG rules)."""

    last_id: str | None = None
    retry: float | None = None
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _has_data: bool = False

    def feed(self, line: str) -> Event | None:
        """Take one line (without its end); returns an event when a blank line ends one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value) / 1000
        return None

    def _dispatch(self) -> Event | None:
        event = None
        if self._has_data:
            event = Event(
                id=self.last_id, event=self._event or "message", data="\n".join(self._data)
            )
        self._data, self._event, self._has_data = [], "", False
        return event


# --- the client -------------------------------------------------------------


def _verify_for(url: str) -> ssl.SSLContext | bool:
    """How to check TLS certificates for a server at ``url``.

    Loading the CA bundle takes tens of milliseconds, a good part of a CLI
    command's start-up; a plain-HTTP server never needs it. The context for one
    still verifies (and trusts no CA), so a redirect to HTTPS fails closed.
    """
    if urlsplit(url).scheme == "http":
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


class Client:
    """labgate's REST API over one HTTP connection pool."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = check_url(url)
        self.token = token
        headers = {"User-Agent": f"labgate-cli/{__version__}", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"token {token}"
        self._http = httpx.Client(
            base_url=self.url + "/api/v1",
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=_verify_for(self.url),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # --- plumbing ------------------------------------------------------------
    def _unreachable(self, exc: httpx.HTTPError) -> ConnectionFailed:
        if isinstance(exc, httpx.TimeoutException):
            reason = "no answer in time"
        else:
            reason = str(exc) or type(exc).__name__
        return ConnectionFailed(f"cannot reach labgate at {self.url}: {reason}")

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Send a request; returns the decoded JSON body (None for an empty one)."""
        try:
            response = self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        raise_for_error(response)
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{self.url} answered {path} with something other than JSON; "
                "is it a labgate server?"
            ) from None

    def get(self, path: str, **params: Any) -> Any:
        """GET ``path`` with query parameters (None values left out)."""
        query = {key: value for key, value in params.items() if value is not None}
        return self.request("GET", path, params=query)

    def get_text(self, path: str, **params: Any) -> str:
        """GET ``path`` and return the body as text (CSV exports), not decoded as JSON."""
        query = {key: value for key, value in params.items() if value is not None}
        try:
            response = self._http.get(path, params=query, headers={"Accept": "text/csv"})
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        raise_for_error(response)
        return response.text

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` and return the raw body (archives)."""
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        raise_for_error(response)
        return response.content

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """POST a JSON body."""
        return self.request("POST", path, json=body, headers=headers)

    def put(self, path: str, body: Any = None) -> Any:
        """PUT a JSON body."""
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        """PATCH a JSON body."""
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        """DELETE ``path``."""
        return self.request("DELETE", path)

    # --- accounts --------------------------------------------------------------
    def login_token(self, username: str, password: str, note: str) -> dict[str, Any]:
        """Sign in with a password and create an API token; returns the created token.

        The token gets every scope of the user (admins included). The browser
        session used to create it is ended straight away.
        """
        session = self.post("/auth/login", {"username": username, "password": password})
        csrf = {"X-CSRF-Token": session.get("csrf_token") or ""}
        try:
            scopes = session["scopes"] if session["user"]["is_admin"] else None
            return dict(self.post("/tokens", {"note": note, "scopes": scopes}, headers=csrf))
        finally:
            with contextlib.suppress(ClientError):
                self.post("/auth/logout", headers=csrf)
            self._http.cookies.clear()

    def find_own_token(self, token: str) -> dict[str, Any] | None:
        """The listing of ``token`` among the caller's tokens, matched by its prefix."""
        prefix = token[:TOKEN_PREFIX_LENGTH]
        matches = [row for row in self.get("/tokens") if row.get("prefix") == prefix]
        return matches[0] if len(matches) == 1 else None

    # --- instances -------------------------------------------------------------
    def events(
        self,
        instance_id: str,
        *,
        after: int = 0,
        deadline: float | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Follow an instance's events (dicts like ``EventOut``) until it ends.

        A dropped connection is resumed with ``Last-Event-ID``; after
        ``RECONNECT_ATTEMPTS`` failures in a row :class:`ConnectionFailed` is
        raised. ``deadline`` (a ``time.monotonic()`` value) raises
        :class:`WaitTimeout` once passed. The caller may stop iterating early.
        """
        last_id = str(after) if after else None
        failures = 0
        delay = RECONNECT_DELAY
        while True:
            parser = EventParser(last_id=last_id)
            terminal = False
            try:
                for event in self._event_stream(instance_id, parser, deadline):
                    failures = 0
                    payload = event.json()
                    if payload:
                        yield payload
                        terminal = payload.get("state") in TERMINAL_STATES
                last_id = parser.last_id
                delay = parser.retry or delay
                if terminal:
                    return
                # A clean end without a terminal event: the server ends the
                # stream once the instance is finished, so ask whether it is.
                if self.get(f"/instances/{instance_id}").get("state") in TERMINAL_STATES:
                    return
            except httpx.TimeoutException as exc:
                last_id = parser.last_id
                if deadline is not None and time.monotonic() >= deadline:
                    raise WaitTimeout("timed out waiting for the instance") from None
                failures += 1
                if failures >= RECONNECT_ATTEMPTS:
                    raise self._unreachable(exc) from None
            except httpx.HTTPError as exc:
                last_id = parser.last_id
                failures += 1
                if failures >= RECONNECT_ATTEMPTS:
                    raise self._unreachable(exc) from None
            _check_deadline(deadline)
            time.sleep(delay)

    def _event_stream(
        self, instance_id: str, parser: EventParser, deadline: float | None
    ) -> Iterator[Event]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if parser.last_id:
            headers["Last-Event-ID"] = parser.last_id
        read = STREAM_READ_TIMEOUT
        if deadline is not None:
            read = max(0.1, min(read, deadline - time.monotonic()))
        timeout = httpx.Timeout(30.0, read=read)
        path = f"/instances/{instance_id}/events"
        with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
            if response.is_error:
                response.read()
                raise_for_error(response)
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
                    _check_deadline(deadline)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout("timed out waiting for the instance")


def raise_for_error(response: httpx.Response) -> None:
    """Raise :class:`ApiError` for an error response, in the server's words when it has them."""
    if not response.is_error:
        return
    code, detail = f"http_{response.status_code}", response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code = body["error"]
        detail = str(body.get("detail") or code)
    detail = " ".join(detail.split())  # always one line
    raise ApiError(response.status_code, code, detail)
