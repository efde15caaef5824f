"""A task's wheel files on its site, read with its owner's rights.

A run's ``environment.python`` may name wheel files on the site (a path or a
``file://`` URL, perhaps as ``name @ …``). The site's pip runs as the agent,
root where labgate is root; read by it, any ``.whl`` on the machine (another
user's) would reach the owner's venv or image. So each is first copied with
the rights of the task's owner (:class:`Reader`: their uid on a process site
run as root, their account on a Slurm site, ``nobody`` for a container, which
has no account on the host), and pip installs the copy. A list that names a
wheel file is prepared per reader, never shared with an owner who might not
be allowed to read it (:func:`reader_key`). Wheel URLs are fetched by pip: the
site's network is its tasks' own.
"""

from __future__ import annotations

import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from labgate.errors import BadRequest

#: Largest wheel file read from the site's disk, and how long reading it may take (a
#: FIFO named ``x.whl`` never ends).
MAX_WHEEL_BYTES = 4 * 1024**3
WHEEL_READ_TIMEOUT = 300.0
#: The uid and gid of ``nobody``: whose rights a file is read with when no user's apply.
NOBODY = 65534


@dataclass(frozen=True)
class Reader:
    """Whose rights a task's wheel files on the site are read with (when the agent is root)."""

    uid: int
    gid: int
    #: Supplementary groups (an account's); none for an instance uid.
    groups: tuple[int, ...] = ()


#: The reader of a task that has no account on the site's host (a container's).
NOBODY_READER = Reader(NOBODY, NOBODY)


def wheel_file(requirement: str) -> str | None:
    """The path of a wheel file on the site that ``requirement`` names (None: not one).

    ``x.whl``, ``/p/x.whl``, ``file:///p/x.whl``, each perhaps as ``name @ …``;
    an ``http(s)://`` wheel or a name from the index is not a file.
    """
    text = requirement.strip()
    if not text.lower().endswith(".whl"):
        return None
    if "@" in text:
        text = text.split("@", 1)[1].strip()
    if text.startswith(("http://", "https://")):
        return None
    if text.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    return text


def read_wheels(requirements: list[str], reader: Reader | None, into: Path) -> list[str]:
    """``requirements`` with every wheel file replaced by a copy in ``into``.

    Each is read with ``reader``'s rights (``head -c`` as its uid, gid and
    groups: only the agent, as root, can switch; None reads as the agent), at
    most :data:`MAX_WHEEL_BYTES`, in :data:`WHEEL_READ_TIMEOUT`. A file the
    reader may not read, or none, is a :class:`BadRequest` with ``head``'s own
    words; nothing of its content reaches them.
    """
    copied: list[str] = []
    for n, raw in enumerate(requirements):
        path = wheel_file(raw)
        if path is None:
            copied.append(raw)
            continue
        if not Path(path).is_absolute():
            raise _failed(f"wheel file {path!r} is not an absolute path")
        folder = into / str(n)
        folder.mkdir(mode=0o700)
        target = folder / Path(path).name
        with target.open("xb") as out:
            try:
                done = subprocess.run(
                    ["head", "-c", str(MAX_WHEEL_BYTES + 1), "--", path],
                    stdout=out,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    timeout=WHEEL_READ_TIMEOUT,
                    check=False,
                    cwd="/",
                    user=None if reader is None else reader.uid,
                    group=None if reader is None else reader.gid,
                    extra_groups=None if reader is None else list(reader.groups),
                )
            except subprocess.TimeoutExpired:
                raise _failed(
                    f"wheel file {path!r} was not read within {WHEEL_READ_TIMEOUT:.0f} s"
                ) from None
            except OSError as exc:  # no head, or no switching uid without root
                raise _failed(f"wheel file {path!r} cannot be read: {exc}") from None
        if done.returncode != 0:
            words = done.stderr.decode(errors="replace").strip().splitlines()
            said = words[-1][:300] if words else f"exit status {done.returncode}"
            who = "the run's owner" if reader is not None else "the site's agent"
            raise _failed(f"wheel file {path!r} cannot be read as {who}: {said}")
        if target.stat().st_size > MAX_WHEEL_BYTES:
            raise _failed(f"wheel file {path!r} is larger than {MAX_WHEEL_BYTES // 1024**3} GiB")
        copied.append(str(target))
    return copied


def _failed(why: str) -> BadRequest:
    """The attempt's failure: its environment was not prepared, and why."""
    return BadRequest(f"preparing the Python environment failed: {why}")


def reader_key(requirements: list[str], reader: Reader | None) -> list[object]:
    """What a prepared list is known by besides its requirements: the reader, when it
    names a wheel file (what one owner may read, another may not)."""
    if reader is None or not any(wheel_file(r) for r in requirements):
        return []
    return [{"read_as": reader.uid}]
