"""The data dir and the secret key: created private, refused at start when they are not.

The data dir holds the SQLite database (instance secrets sealed with a key
derived from the secret key, token hashes, password hashes), the secret key
that signs every session, users' workspaces and tools' logs. Any local user
who can read it can sign in as anyone, so:

- the data dir is created 0700 and refused when group or others can enter it,
  when another account owns it, or when it sits in a folder others may write
  without the sticky bit (they could rename it away and put theirs in its
  place): whoever controls it can swap ``workspaces/<user>`` for a link that
  root then follows and hands to a user;
- ``logs/`` and ``workspaces/`` are created 0700 too; an existing one (or
  what a link there leads to, a workspaces folder on a bigger disk) is
  refused when another account owns it or group or others may write in it
  (another account could plant a ``<user>`` link there);
- the secret key (the ``secret_key`` setting or ``<data_dir>/secret_key``)
  must carry at least 256 bits: :func:`check_key`;
- the key file must be owned by the server's user and readable by it alone
  (0600 or 0400); a generated one is written 0600, whole or not at all.

Every refusal is an :class:`UnsafeSetup` whose message is one line that
says what to do; ``labgate serve`` and ``labgate router`` print it as is.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import stat
import tempfile
from pathlib import Path

from labgate.errors import ConfigError

KEY_FILE = "secret_key"
#: 32 bytes: what ``secrets.token_urlsafe(32)`` (43 characters) or 64 hex digits carry.
MIN_KEY_BITS = 256
#: Fewer distinct characters than this is a pattern, not a random key, at any length.
MIN_DISTINCT = 10
_HEX = frozenset("0123456789abcdefABCDEF")
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/=")
NEW_KEY_HINT = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class UnsafeSetup(ConfigError):
    """The data dir or secret key would let others in; the message says how to fix it."""


def key_bits(key: str) -> float:
    """Bits a random key of this length and alphabet carries (hex, base64, or any text)."""
    chars = set(key)
    if chars <= _HEX:
        alphabet = 16
    elif chars <= _BASE64:
        alphabet = 64
    else:
        alphabet = 94  # printable ASCII; anything richer is still counted as that
    return len(key) * math.log2(alphabet)


def check_key(key: str, source: str) -> str:
    """``key`` when it is strong enough to sign sessions; else :class:`UnsafeSetup`."""
    if not key:
        raise UnsafeSetup(f"{source} is empty; put a random key in it: {NEW_KEY_HINT}")
    if key_bits(key) < MIN_KEY_BITS or len(set(key)) < MIN_DISTINCT:
        raise UnsafeSetup(
            f"{source} is too weak to sign sessions (it needs 256 random bits: at least "
            f"43 URL-safe base64 characters or 64 hex digits); make one with: {NEW_KEY_HINT}"
        )
    return key


def _too_open(mode: int) -> bool:
    return bool(stat.S_IMODE(mode) & 0o077)


def check_key_file(path: Path) -> str:
    """The key in ``path`` once its owner, mode and strength are right."""
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise UnsafeSetup(
            f"the secret key file {path} is owned by uid {info.st_uid}, not by the user "
            f"labgate runs as (uid {os.geteuid()}); chown it"
        )
    if _too_open(info.st_mode):
        raise UnsafeSetup(
            f"the secret key file {path} is mode {stat.S_IMODE(info.st_mode):04o}: others may "
            f"read it; run: chmod 600 {path}"
        )
    return check_key(path.read_text().strip(), f"the secret key file {path}")


def create_key_file(path: Path) -> str:
    """A new random key written to ``path`` (0600), or the key another process wrote first.

    The key is written to a private temporary file and linked into place: the
    link fails when ``path`` exists (like ``O_EXCL``), and a crash never leaves
    an empty or half-written key behind.
    """
    key = secrets.token_urlsafe(48)
    fd, temporary = tempfile.mkstemp(prefix=".secret_key.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return check_key_file(path)  # another process won the race: use theirs
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return key


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) 0700; an existing one is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


#: The default local site's data root, under the data dir.
DATASETS_DIR = "datasets"


def _check_ancestors(path: Path) -> None:
    """Refuse ``path`` when a folder above lets others rename it (others write, no sticky)."""
    for folder in path.parents:
        try:
            mode = folder.stat().st_mode
        except OSError:
            continue  # not there yet: made by private_dir, 0700
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise UnsafeSetup(
                f"the data dir {path} is in {folder}, which others may write to (mode "
                f"{stat.S_IMODE(mode):04o}): they could rename it and put theirs in its "
                f"place; put the data dir elsewhere or run: chmod o-w {folder}"
            )


def _check_owner(path: Path, what: str, info: os.stat_result) -> None:
    """Refuse ``path`` unless the account labgate runs as owns it."""
    if info.st_uid != os.geteuid():
        raise UnsafeSetup(
            f"{what} {path} is owned by uid {info.st_uid}, not by the user labgate runs as "
            f"(uid {os.geteuid()}): that account could put links where root follows them; "
            f"chown it"
        )


def _check_own(path: Path, what: str) -> None:
    """Refuse ``path`` (followed if a link) unless it is ours and nobody else may write in it."""
    info = path.stat()
    _check_owner(path, what, info)
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise UnsafeSetup(
            f"{what} {path} is mode {stat.S_IMODE(info.st_mode):04o}: other local users may "
            f"put links in it that labgate would follow; run: chmod 700 {path}"
        )


def prepare_data_dir(data_dir: Path) -> None:
    """Create the data dir and its ``logs``, ``workspaces``, ``datasets`` 0700; refuse it loose."""
    if data_dir.exists() and not data_dir.is_dir():
        raise UnsafeSetup(f"the data dir {data_dir} is not a directory")
    _check_ancestors(data_dir.absolute())
    private_dir(data_dir)
    info = data_dir.stat()
    _check_owner(data_dir, "the data dir", info)
    if _too_open(info.st_mode):
        raise UnsafeSetup(
            f"the data dir {data_dir} is mode {stat.S_IMODE(info.st_mode):04o}: other local "
            f"users may read the database and keys in it; run: chmod 700 {data_dir}"
        )
    for name in ("logs", "workspaces", DATASETS_DIR):
        private_dir(data_dir / name)
    for name in ("logs", "workspaces"):
        _check_own(data_dir / name, f"the {name} dir")
