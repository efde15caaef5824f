"""Batch tasks in containers: the task executor of a site whose backend is ``containers``.

A task whose environment names a container ``image``, or lists Python
requirements, runs as a container on the site's engine
(:mod:`labgate.backends.container_tasks`); its image is made once per
distinct (base image, requirements list) and reused, with the progress in the
run's events. Any other task of the site runs as a process (the ``fallback``
executor). Everything about an attempt stays in its directory, as for
processes: ``task.json``, ``container`` (which executor has it),
``output.log`` and ``exit.json`` once it ended, so a new agent finds it again
after a restart. The container's own state is the truth while it runs: when
it has exited, its output and exit code are written to the directory and it
is removed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from labgate.agent import taskexec
from labgate.agent.taskenv import requirement_refusal
from labgate.agent.tasks import Outcome, TaskExecutor, read_outcome
from labgate.backends import container_tasks as engine
from labgate.backends.containers import ContainerBackend
from labgate.backends.wheels import Reader
from labgate.errors import BadRequest
from labgate.wire.runs import TaskSpec

log = logging.getLogger(__name__)

#: The file that marks an attempt as run in a container.
MARKER = "container"
#: Seconds between TERM and KILL when a task container is stopped.
STOP_GRACE = 3.0
TASKCALL = Path(__file__).with_name("taskcall.py")

Progress = Callable[[str], Awaitable[None]]


def in_container(spec: TaskSpec) -> bool:
    """Whether a containers site runs ``spec`` in a container (it names an image or packages)."""
    return bool(spec.image or spec.python)


class ContainerTaskExecutor(TaskExecutor):
    """Each attempt that wants an image a container; the others through ``fallback``."""

    name = "containers"

    def __init__(self, backend: ContainerBackend, fallback: TaskExecutor) -> None:
        self.backend = backend
        self.fallback = fallback

    def prepares(self, spec: TaskSpec) -> bool:
        """This executor makes the task's environment itself (an image, not a venv)."""
        return in_container(spec)

    async def reader(self, spec: TaskSpec) -> Reader | None:
        """A container's task has no account on the host: ``nobody`` reads its wheel
        files (as root); the others are the fallback's."""
        if in_container(spec):
            return await super().reader(spec)
        return await self.fallback.reader(spec)

    async def start(
        self,
        spec: TaskSpec,
        directory: Path,
        env_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Prepare the image (once per definition), then start the attempt's container."""
        if not in_container(spec):
            await self.fallback.start(spec, directory, env_dir, progress)
            return
        loop = asyncio.get_running_loop()

        async def note(message: str) -> None:
            if progress is not None:
                await progress(message)

        def say(message: str) -> None:
            asyncio.run_coroutine_threadsafe(note(message), loop).result(30)

        body = spec.model_dump(mode="json")
        if spec.api_url:
            reach = {"LABGATE_API_URL": spec.api_url}
            await self.backend.reach_labgate(spec.attempt_id, reach)
            body["api_url"] = reach["LABGATE_API_URL"]
        try:
            reader = await self.reader(spec)
            image = await asyncio.to_thread(self._image, spec, say, reader)
            body["started"] = time.time()  # the timeout counts from here, not the image's build
            (directory / "task.json").write_text(json.dumps(body))
            (directory / MARKER).write_text(image)
            await asyncio.to_thread(
                engine.create_task, self.backend, body, directory, image, TASKCALL
            )
        except engine.ENGINE_ERRORS as exc:
            raise BadRequest(f"container engine at {self.backend.engine_address}: {exc}") from None

    def _image(self, spec: TaskSpec, say: Callable[[str], None], reader: Reader | None) -> str:
        refusal = requirement_refusal(spec.python)
        if refusal is not None:  # the site's pip would read or build it (taskenv)
            raise BadRequest(f"preparing the Python environment refused: {refusal}")
        if spec.image:
            # The task chose it: never an image that holds another user's work (the
            # site's own task_image, the operator's, is not checked).
            engine.refuse_private_name(self.backend, spec.image)
            engine.ensure_image(self.backend, spec.image, say)
            engine.refuse_private_image(self.backend, spec.image)
        if not spec.python:
            return spec.image
        base = spec.image or self.backend.config.task_image
        if not base:
            raise BadRequest(
                f"site {self.backend.site} has no base image for Python requirements: name "
                "environment.image, or set the site's task_image option"
            )
        return engine.env_image(self.backend, base, spec.python, say, reader)

    async def poll(self, directory: Path) -> Outcome | None:
        """None while the container runs; its outcome (read once, then kept) when it ended."""
        if not (directory / MARKER).exists():
            return await self.fallback.poll(directory)
        exit_file = directory / "exit.json"
        if not exit_file.exists():
            try:
                done = await asyncio.to_thread(self._check, directory)
            except engine.ENGINE_ERRORS as exc:
                log.warning("cannot poll task container of %s: %s", directory.name, exc)
                return None  # an engine hiccup does not lose the task
            if not done:
                return None
        return read_outcome(exit_file)

    def _check(self, directory: Path) -> bool:
        """Write ``exit.json`` when the attempt ended (timed out: stop it first); whether it did."""
        spec: dict[str, Any] = json.loads((directory / "task.json").read_text())
        name = engine.container_name(self.backend, directory.name)
        state = engine.inspect_task(self.backend, name)
        started = float(spec.get("started") or time.time())
        timeout = float(spec.get("timeout", 3600))
        cancelled = (directory / "cancel").exists()
        if state is None:
            gone = (
                {"state": "cancelled", "reason": "cancelled"}
                if cancelled
                else {"state": "lost", "reason": "the task's container is gone"}
            )
            taskexec.write_exit(directory, {"exit_code": None, **gone})
            return True
        timed_out = time.time() > started + timeout
        if state.get("Running"):
            if not timed_out:
                return False
            engine.stop_task(self.backend, name, STOP_GRACE)
            state = engine.inspect_task(self.backend, name) or {}
        with open(directory / "output.log", "ab") as out:
            out.write(engine.task_logs(self.backend, name))
        code = state.get("ExitCode")
        result, problem = taskexec.read_result(directory)
        outcome: dict[str, Any] = {
            "exit_code": code,
            "result": result,
            "seconds": round(time.time() - started, 3),
        }
        if cancelled:
            outcome.update(state="cancelled", reason="cancelled")
        elif timed_out and code != 0:
            outcome.update(state="failed", reason=f"timed out after {spec.get('timeout')}s")
        elif code != 0:
            reason = f"exited with status {code}"
            if state.get("OOMKilled"):
                reason += " (out of memory)"
            outcome.update(state="failed", reason=reason)
        elif problem:
            outcome.update(state="failed", reason=problem)
        else:
            outcome.update(state="succeeded", reason="")
        taskexec.write_exit(directory, outcome)
        engine.remove_task(self.backend, name)
        return True

    async def cancel(self, directory: Path) -> None:
        """Stop the container; the next poll reports ``cancelled``."""
        if not (directory / MARKER).exists():
            await self.fallback.cancel(directory)
            return
        (directory / "cancel").touch()
        name = engine.container_name(self.backend, directory.name)
        try:
            await asyncio.to_thread(engine.stop_task, self.backend, name, STOP_GRACE)
        except engine.ENGINE_ERRORS as exc:
            log.warning("cannot stop task container %s: %s", name, exc)
