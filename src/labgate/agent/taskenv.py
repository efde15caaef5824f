"""Task environments at a site: a Python venv prepared once per distinct requirements list.

A task whose definition lists ``environment.python`` requirements runs with
a venv that holds them. The venv is made at the site the first time a task
asks for that list (``python -m venv`` + ``pip install``) under
``<tasks dir>/../envs/<key>``, where the key is a hash of the sorted list;
every later task with the same list, of any run, reuses it. Tasks asking for
the same list at once wait for one preparation. A venv is ready once its
``.ready`` marker is written; a half-made one (a crash meanwhile) is made
again.

A wheel file on the site is read with the rights of the task's owner and
pip installs that copy (:mod:`labgate.backends.wheels`); a list that names
one is prepared per reader.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from labgate.backends.wheels import Reader, read_wheels, reader_key
from labgate.errors import BadRequest

#: Longest a venv preparation may take (seconds).
PREPARE_TIMEOUT = 1800.0
#: Lines of pip's output kept in the reason of a failed preparation.
FAILED_TAIL = 20
#: What pip installs a task's requirements with: wheels only. The site's agent runs pip
#: (as root where labgate is root): building a distribution from source runs its code
#: (``setup.py``, a build backend), which a run's owner chooses.
PIP_WHEELS_ONLY = ("--only-binary=:all:", "--no-input", "--disable-pip-version-check")

#: A requirement from the index: a name, extras, version specifiers, an environment marker.
_SPEC = r"(===|==|~=|!=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
_INDEXED = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
    r"(?:\s*\[\s*[A-Za-z0-9._-]+(?:\s*,\s*[A-Za-z0-9._-]+)*\s*\])?"
    rf"(?:\s*\(?\s*{_SPEC}(?:\s*,\s*{_SPEC})*\s*\)?)?"
    r"\s*(?:;[^@]*)?$"
)
#: A wheel: a file or an http(s)/file URL naming a ``.whl``, perhaps as ``name @ <it>``.
_WHEEL = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]*\s*@\s*)?(?:https?://|file://)?[^\s@;]*\.whl$")


#: Names pip takes for archive files (a file of that name where pip runs): not names.
_ARCHIVES = (".zip", ".tar", ".tgz", ".tbz", ".txz", ".tlz", ".gz", ".bz2", ".xz", ".lz", ".lzma")


def _indexed(text: str) -> bool:
    name = re.split(r"[\s\[(<>=!~;]", text, maxsplit=1)[0].lower()
    return bool(_INDEXED.match(text)) and not name.endswith(_ARCHIVES)


def requirement_refusal(requirements: list[str]) -> str | None:
    """Why a task's requirements list is refused (None: taken).

    Names with versions, installed from wheels of the site's index, and wheel
    files or URLs: nothing else. A pip option (``-r /root/file``,
    ``--index-url``, ``--prefix``) would be read or obeyed by the site's agent,
    and a directory, a source archive or a VCS URL would be built by it, its
    code run as the agent (root): both are refused.
    """
    for raw in requirements:
        text = raw.strip()
        if not text:
            continue
        if text.startswith("-"):
            return f"requirement {raw!r} is a pip option: list requirements only"
        if _indexed(text) or _WHEEL.match(text):
            continue
        return (
            f"requirement {raw!r} is neither a name with versions nor a wheel (.whl file or "
            "URL): nothing is built from source at a site"
        )
    return None


def split_requirements(requirements: list[str]) -> tuple[list[str], list[str]]:
    """``requirements`` as (those from the index, wheel files and URLs), blanks left out.

    The wheels are installed without their dependencies (``--no-deps``): one may
    name a directory or a source archive as a dependency, which pip would build.
    List those from the index beside it.
    """
    indexed: list[str] = []
    wheels: list[str] = []
    for raw in requirements:
        text = raw.strip()
        if text:
            (indexed if _indexed(text) else wheels).append(text)
    return indexed, wheels


Progress = Callable[[str], Awaitable[None]]


def env_key(requirements: list[str], reader: Reader | None = None) -> str:
    """The name of the venv for ``requirements`` (the same for the same list in any order),
    read as ``reader`` (:func:`reader_key`)."""
    listed: list[object] = [*sorted(r.strip() for r in requirements if r.strip())]
    canonical = json.dumps(listed + reader_key(requirements, reader))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class EnvironmentCache:
    """The venvs of one site, made on first use and shared by every task that asks."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = root
        self.python = python
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, requirements: list[str], reader: Reader | None = None) -> Path:
        """Where the venv of ``requirements`` read as ``reader`` is (ready or not)."""
        return self.root / env_key(requirements, reader)

    async def prepare(
        self, requirements: list[str], progress: Progress, reader: Reader | None = None
    ) -> Path:
        """The ready venv for ``requirements``, made now if there is none.

        A list with a pip option or something pip would build from source is
        refused (:func:`requirement_refusal`) before anything runs. Wheel files
        are read as ``reader`` (:func:`read_wheels`).
        """
        refusal = requirement_refusal(requirements)
        if refusal is not None:
            raise BadRequest(f"preparing the Python environment refused: {refusal}")
        target = self.path(requirements, reader)
        if (target / ".ready").exists():
            return target
        lock = self._locks.setdefault(target.name, asyncio.Lock())
        async with lock:
            if (target / ".ready").exists():
                return target
            await progress(
                f"preparing a Python environment ({len(requirements)} requirement(s)); "
                "once per distinct list, reused after"
            )
            started = asyncio.get_running_loop().time()
            await asyncio.to_thread(self._make, target, requirements, reader)
            seconds = asyncio.get_running_loop().time() - started
            await progress(f"Python environment {target.name} ready in {seconds:.1f}s")
        return target

    def _make(self, target: Path, requirements: list[str], reader: Reader | None) -> None:
        if target.exists():
            shutil.rmtree(target)  # half-made by a process that died
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=target.parent) as wheels:
            self._install(target, read_wheels(requirements, reader, Path(wheels)))
        if reader is not None and reader_key(requirements, reader):
            # It holds what only its reader may read: theirs alone (readable by the
            # task, which runs as them; never shared, so nobody else's to spoil).
            os.chown(target, reader.uid, reader.gid)
            target.chmod(0o700)
        (target / ".ready").write_text(json.dumps(sorted(requirements)))

    def _install(self, target: Path, requirements: list[str]) -> None:
        # The venv gets no pip of its own (ensurepip takes seconds): labgate's pip
        # installs into it (``pip --python``); without one, the venv's own is made.
        has_pip = importlib.util.find_spec("pip") is not None
        installer = (
            [self.python, "-m", "pip", "--python", str(target / "bin" / "python")]
            if has_pip
            else [str(target / "bin" / "python"), "-m", "pip"]
        )
        indexed, wheels = split_requirements(requirements)
        steps = [[self.python, "-m", "venv", *(["--without-pip"] if has_pip else []), str(target)]]
        if indexed:
            steps.append([*installer, "install", *PIP_WHEELS_ONLY, "--quiet", *indexed])
        if wheels:
            steps.append([*installer, "install", *PIP_WHEELS_ONLY, "--no-deps", "--quiet", *wheels])
        for step in steps:
            try:
                done = subprocess.run(  # in the venv: a relative name names nothing else
                    step,
                    capture_output=True,
                    text=True,
                    timeout=PREPARE_TIMEOUT,
                    check=False,
                    cwd=target if target.is_dir() else target.parent,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                shutil.rmtree(target, ignore_errors=True)
                raise BadRequest(f"preparing the Python environment failed: {exc}") from None
            if done.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-FAILED_TAIL:])
                raise BadRequest(f"preparing the Python environment failed:\n{tail}")
