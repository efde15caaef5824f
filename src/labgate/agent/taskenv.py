"""Task environments at a site: a Python venv prepared once per distinct requirements list.

A task whose definition lists ``environment.python`` requirements runs with
a venv that holds them. The venv is made at the site the first time a task
asks for that list (``python -m venv`` + ``pip install``) under
``<tasks dir>/../envs/<key>``, where the key is a hash of the sorted list;
every later task with the same list, of any run, reuses it. Tasks asking for
the same list at once wait for one preparation. A venv is ready once its
``.ready`` marker is written; a half-made one (a crash meanwhile) is made
again.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from labgate.errors import BadRequest

#: Longest a venv preparation may take (seconds).
PREPARE_TIMEOUT = 1800.0
#: Lines of pip's output kept in the reason of a failed preparation.
FAILED_TAIL = 20

Progress = Callable[[str], Awaitable[None]]


def env_key(requirements: list[str]) -> str:
    """The name of the venv for ``requirements`` (the same for the same list in any order)."""
    canonical = json.dumps(sorted(r.strip() for r in requirements if r.strip()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


class EnvironmentCache:
    """The venvs of one site, made on first use and shared by every task that asks."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = root
        self.python = python
        self._locks: dict[str, asyncio.Lock] = {}

    def path(self, requirements: list[str]) -> Path:
        """Where the venv of ``requirements`` is (ready or not)."""
        return self.root / env_key(requirements)

    async def prepare(self, requirements: list[str], progress: Progress) -> Path:
        """The ready venv for ``requirements``, made now if there is none."""
        target = self.path(requirements)
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
            await asyncio.to_thread(self._make, target, requirements)
            seconds = asyncio.get_running_loop().time() - started
            await progress(f"Python environment {target.name} ready in {seconds:.1f}s")
        return target

    def _make(self, target: Path, requirements: list[str]) -> None:
        if target.exists():
            shutil.rmtree(target)  # half-made by a process that died
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # The venv gets no pip of its own (ensurepip takes seconds): labgate's pip
        # installs into it (``pip --python``); without one, the venv's own is made.
        has_pip = importlib.util.find_spec("pip") is not None
        installer = (
            [self.python, "-m", "pip", "--python", str(target / "bin" / "python")]
            if has_pip
            else [str(target / "bin" / "python"), "-m", "pip"]
        )
        steps = [
            [self.python, "-m", "venv", *(["--without-pip"] if has_pip else []), str(target)],
            [
                *installer,
                "install",
                "--no-input",
                "--disable-pip-version-check",
                "--quiet",
                *requirements,
            ],
        ]
        for step in steps:
            try:
                done = subprocess.run(
                    step, capture_output=True, text=True, timeout=PREPARE_TIMEOUT, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                shutil.rmtree(target, ignore_errors=True)
                raise BadRequest(f"preparing the Python environment failed: {exc}") from None
            if done.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-FAILED_TAIL:])
                raise BadRequest(f"preparing the Python environment failed:\n{tail}")
        (target / ".ready").write_text(json.dumps(sorted(requirements)))
