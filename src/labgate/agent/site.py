"""The site agent: drives one backend for one site and reports what happens.

It starts instances, waits for their health check, watches them while they
run and stops them. Everything it learns goes back to the portal as
:class:`~labgate.agent.link.Report` objects through one reporter callback; it
never touches the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from labgate.agent import fetch as fetching
from labgate.agent.tasks import ProcessTaskExecutor, TaskExecutor, TaskRunner
from labgate.aio import wait_for
from labgate.backends.base import (
    Backend,
    LaunchSpec,
    SnapshotRef,
    SnapshotRequest,
    SnapshotResult,
    Started,
)
from labgate.errors import Conflict, LabgateError
from labgate.safefs import connectable
from labgate.wire.routes import UpstreamAddress, parse_upstream
from labgate.wire.site import (
    CRASHED,
    NEVER_ANSWERED,
    NEVER_STARTED,
    Report,
    Reporter,
    start_failed,
)

if TYPE_CHECKING:
    from collections.abc import Collection

    from labgate.agent.fetch import Fetched
    from labgate.backends.claim import Claim
    from labgate.tools.catalog import Tool
    from labgate.wire.launch import FetchRequest

log = logging.getLogger(__name__)

#: Seconds between a starting tool's checks while nothing listens at its address during
#: its first :data:`HEALTH_FAST_FOR` seconds (a bare connect; most small tools are ready
#: within it: a check soon after is a quicker launch); otherwise growing by half each
#: time up to :data:`HEALTH_MAX_INTERVAL`.
HEALTH_INTERVAL = 0.025
HEALTH_FAST_FOR = 1.0
HEALTH_MAX_INTERVAL = 0.25
HEALTH_REQUEST_TIMEOUT = 5.0
#: Seconds a site's health answer is reused (``/readyz`` may be asked often), and how
#: long the backend may take to give one.
HEALTH_TTL = 5.0
HEALTH_TIMEOUT = 3.0
#: A stop the backend could not do (its engine is down) is tried again after this many
#: seconds, doubled each time up to STOP_RETRY_MAX, until it succeeds.
STOP_RETRY_FIRST = 1.0
STOP_RETRY_MAX = 60.0
#: How many stopped instance ids an agent remembers, to refuse their late launches.
STOPPED_REMEMBERED = 4096
#: Seconds between the agent's looks at what its engine holds for the tools (images).
TOOLS_REFRESH = 10.0
#: Seconds a closing agent waits for a backend start under way, to record what it started.
INTERRUPTED_START_WAIT = 30.0
#: Seconds over which a starting tool's CPU use is measured when its budget ends...
BUSY_SAMPLE = 1.0
#: ... and the share of a core it must use in them to count as still busy.
BUSY_SHARE = 0.05


@dataclass
class Watched:
    """An instance the agent is responsible for."""

    spec: LaunchSpec
    backend_state: dict[str, Any]
    endpoint: str
    running: bool = False


def tool_path(spec: LaunchSpec, path: str) -> str:
    """The path of the tool's ``path`` (its health or claim path) as the tool serves it."""
    prefix = spec.base_url.rstrip("/") if spec.tool.supports_prefix else ""
    return prefix + path


def probe_address(endpoint: str) -> UpstreamAddress | None:
    """The address a tool's endpoint listens at (None: not one the agent can probe)."""
    try:
        address = parse_upstream(endpoint)
    except ValueError:
        return None
    return None if address.is_tunnel else address


async def listening(address: UpstreamAddress | None) -> bool:
    """Whether something accepts connections at ``address``: a connect, closed at once."""
    if address is None:
        return True
    try:
        if address.path:
            with connectable(address.path) as where:
                connecting = asyncio.open_unix_connection(where)
                _, writer = await wait_for(connecting, HEALTH_REQUEST_TIMEOUT)
        else:
            connecting = asyncio.open_connection(address.host, address.port)
            _, writer = await wait_for(connecting, HEALTH_REQUEST_TIMEOUT)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


@dataclass(frozen=True)
class Adoption:
    """An instance the portal knew before a restart, handed back to its site."""

    spec: LaunchSpec
    state: str
    backend_state: dict[str, Any]
    endpoint: str
    #: Seconds left of the start timeout, for instances still starting.
    remaining_start_time: float = 0.0


def task_executor(site: str, backend: Backend) -> TaskExecutor:
    """How ``site`` runs batch tasks: Slurm jobs on a Slurm site, containers on a containers
    site (for tasks that want an image), else processes."""
    processes = ProcessTaskExecutor(
        sandbox=backend.settings.sandbox,
        site_name=site,
        uid_base=backend.settings.instance_uid_base,
    )
    if backend.name == "slurm":
        from labgate.agent.taskslurm import SlurmTaskExecutor
        from labgate.backends.slurm import SlurmBackend

        if isinstance(backend, SlurmBackend):
            return SlurmTaskExecutor(backend)
    if backend.name != "containers":
        return processes
    # Imported here: the containers backend (and the docker SDK) is an optional extra.
    from labgate.agent.taskcontainer import ContainerTaskExecutor
    from labgate.backends.containers import ContainerBackend

    if not isinstance(backend, ContainerBackend):
        return processes
    return ContainerTaskExecutor(backend, processes)


class SiteAgent:
    """Drives ``backend`` for the site called ``site``."""

    def __init__(
        self,
        site: str,
        backend: Backend,
        reporter: Reporter,
        *,
        workspaces_dir: Path,
        cache_dir: Path | None = None,
        poll_interval: float = 2.0,
        stop_grace: float = 10.0,
        log_tail_lines: int = 40,
    ) -> None:
        self.site = site
        #: Where this site keeps workspaces: the portal names them relative to it.
        self.workspaces_dir = workspaces_dir
        #: Where URL datasets fetched for this site's launches are kept.
        self.cache_dir = cache_dir or workspaces_dir.parent / "cache" / site
        self.backend = backend
        self.reporter = reporter
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.log_tail_lines = log_tail_lines
        self.watched: dict[str, Watched] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        #: Instances this agent was told to stop, newest last (an ordered set, bounded).
        self._stopped: dict[str, None] = {}
        #: Stops the backend failed, being tried again (instance id -> retry task).
        self._stop_retries: dict[str, asyncio.Task[None]] = {}
        #: One fetch per cache entry at a time: a second request waits and finds it cached.
        self._fetch_locks: dict[str, asyncio.Lock] = {}
        self._health: tuple[float, str | None] | None = None
        #: Seconds a health answer is reused (tests shorten it).
        self.health_ttl = HEALTH_TTL
        #: Snapshots being saved here now.
        self._saving: set[str] = set()
        #: Seconds before the first retry of a failed stop (tests shorten it).
        self.stop_retry_first = STOP_RETRY_FIRST
        self._watch_task: asyncio.Task[None] | None = None
        #: The catalog's tools, as the engine is asked about them (refresh_tools).
        self.tools: list[Tool] = []
        self._tools_task: asyncio.Task[None] | None = None
        self._http = httpx.AsyncClient(timeout=HEALTH_REQUEST_TIMEOUT, follow_redirects=False)
        backend.attach(site, self._progress)
        #: Batch task attempts of this site (labgate.agent.tasks).
        self.tasks = TaskRunner(
            site,
            reporter,
            workspaces_dir.parent / "tasks" / site,
            task_executor(site, backend),
            log_tail_lines=log_tail_lines,
        )

    # --- commands ----------------------------------------------------------
    def launch(self, spec: LaunchSpec) -> None:
        """Start ``spec`` in the background; the outcome comes as reports.

        A launch of an instance the agent already starts or watches changes
        nothing (a command delivered twice), and neither does one of an
        instance it was told to stop: the portal sends a launch and a stop
        from separate tasks, and a stop can overtake the launch it ends.
        """
        if spec.instance_id in self._starting or spec.instance_id in self.watched:
            return
        if spec.instance_id in self._stopped:
            log.info("site %s: launch of %s after its stop ignored", self.site, spec.instance_id)
            return
        spec = self.placed(spec)
        self._ensure_watch()
        task = asyncio.create_task(self._launch(spec), name=f"launch-{spec.instance_id}")
        self._starting[spec.instance_id] = task
        task.add_done_callback(lambda _t: self._starting.pop(spec.instance_id, None))

    async def stop(self, instance_id: str, backend_state: dict[str, Any]) -> None:
        """Stop an instance (cancelling its start if under way) and report ``stopped``.

        When the backend cannot stop it (its engine is down), the instance
        stays ``stopping`` with the reason as a progress note, and the stop is
        tried again in the background with backoff until it succeeds: never
        ``lost`` while its container may still run. Without a state (its start
        was cut short before it returned one) the backend removes what carries
        the instance's id (:meth:`Backend.discard`).
        """
        self._remember_stopped(instance_id)
        if instance_id in self._stop_retries:
            return  # already being tried again
        task = self._starting.get(instance_id)
        if task is not None:
            if instance_id in self.watched:
                # Past backend.start: only the health wait is left to interrupt.
                task.cancel()
            else:
                # Inside backend.start: let it finish so nothing is orphaned; the
                # launch sees the request and returns right after.
                self._cancel_requested.add(instance_id)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._cancel_requested.discard(instance_id)
            if instance_id in self._stop_retries:
                return  # its start timed out and the stop it made failed: tried again
        watched = self.watched.pop(instance_id, None)
        state = watched.backend_state if watched is not None else backend_state
        if state:
            try:
                await self.backend.stop(state, self.stop_grace)
            except Exception as exc:
                log.warning("stopping %s failed: %s (tried again)", instance_id, exc)
                await self._stop_failed(instance_id, exc, 1, self.stop_retry_first)
                self._retry_in_background(instance_id, state)
                return
        else:
            await self._discard(instance_id)
        await self._report(Report(instance_id, "stopped", message="stopped"))

    def _remember_stopped(self, instance_id: str) -> None:
        """Keep ``instance_id`` among the stopped (ids are never reused), forgetting the oldest."""
        self._stopped.pop(instance_id, None)
        self._stopped[instance_id] = None
        if len(self._stopped) > STOPPED_REMEMBERED:
            del self._stopped[next(iter(self._stopped))]

    async def _discard(self, instance_id: str) -> None:
        """A stop without a state: remove what a start cut short by a killed agent left."""
        try:
            await self.backend.discard(instance_id, self.stop_grace)
        except Exception as exc:  # the engine is down: reconcile removes it later
            log.warning("site %s: discarding %s failed: %s", self.site, instance_id, exc)

    def _retry_in_background(self, instance_id: str, state: dict[str, Any], why: str = "") -> None:
        """Try a failed stop again until it succeeds; the agent keeps the instance till then.

        ``why``: what led to the stop (a start that timed out), kept in every note.
        """
        retry = asyncio.create_task(
            self._retry_stop(instance_id, state, why), name=f"stop-{instance_id}"
        )
        self._stop_retries[instance_id] = retry
        retry.add_done_callback(lambda _t: self._stop_retries.pop(instance_id, None))

    async def _retry_stop(self, instance_id: str, state: dict[str, Any], why: str = "") -> None:
        delay, attempt = self.stop_retry_first, 1
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self.backend.stop(state, self.stop_grace)
            except Exception as exc:
                delay = min(delay * 2, STOP_RETRY_MAX)
                await self._stop_failed(instance_id, exc, attempt, delay, why)
                continue
            await self._report(
                Report(
                    instance_id,
                    "stopped",
                    message=f"stopped (at attempt {attempt})",
                    data={"stop_retry": attempt},
                )
            )
            return

    async def _stop_failed(
        self, instance_id: str, exc: Exception, attempt: int, delay: float, why: str = ""
    ) -> None:
        reason = _reason(exc)
        await self._report(
            Report(
                instance_id,
                "stopping",
                kind="progress",
                message=f"{why + '; ' if why else ''}stop failed: {reason}; "
                f"trying again in {delay:g}s",
                data={"stop_retry": attempt, "reason": reason},
            )
        )

    async def adopt(self, adoption: Adoption) -> None:
        """Re-attach to an instance from its saved state after a restart."""
        if adoption.spec.instance_id in self.watched:
            return
        self._ensure_watch()
        spec = self.placed(adoption.spec)
        try:
            status = await self.backend.poll(adoption.backend_state)
        except Exception as exc:  # a state this backend cannot read: nothing to watch
            log.warning("site %s: cannot adopt %s: %r", self.site, spec.instance_id, exc)
            await self._report(
                Report(spec.instance_id, "lost", message=f"its saved state is unreadable: {exc!r}")
            )
            return
        if not status.alive:
            tail = await self._tail(adoption.backend_state)
            detail = status.detail or "gone"
            await self._report(
                Report(
                    spec.instance_id,
                    "lost",
                    message=f"gone while labgate was down: {detail}",
                    log_tail=tail,
                )
            )
            return
        watched = Watched(spec, adoption.backend_state, adoption.endpoint)
        self.watched[spec.instance_id] = watched
        if adoption.state == "running":
            watched.running = True
            return
        started = Started(adoption.backend_state, adoption.endpoint)
        if adoption.endpoint:
            waiting = self._await_health(spec, started, max(adoption.remaining_start_time, 1.0))
        else:
            waiting = self._place_then_health(spec, started)  # still queued (a batch job)
        task = asyncio.create_task(waiting, name=f"adopt-{spec.instance_id}")
        self._starting[spec.instance_id] = task
        task.add_done_callback(lambda _t: self._starting.pop(spec.instance_id, None))

    async def logs(self, backend_state: dict[str, Any], lines: int) -> str:
        """The tail of an instance's output."""
        if not backend_state:
            return ""
        return await self.backend.logs(backend_state, lines)

    async def snapshot(
        self, backend_state: dict[str, Any], request: SnapshotRequest
    ) -> SnapshotResult:
        """Save an instance through the backend; progress goes to its event stream."""
        watched = self.watched.get(request.instance_id)
        state = watched.backend_state if watched is not None else backend_state
        self._saving.add(request.snapshot_id)
        try:
            return await self.backend.snapshot(state, request)
        finally:
            self._saving.discard(request.snapshot_id)

    async def find_snapshot(
        self, request: SnapshotRequest, reference: str = ""
    ) -> SnapshotResult | None:
        """Look for a stored snapshot through the backend (see :meth:`Backend.find_snapshot`).

        A save this agent is doing now is a 409 ``snapshot_saving``: not finished, not failed.
        """
        if request.snapshot_id in self._saving:
            raise Conflict(
                f"snapshot {request.snapshot_id} is being saved on site {self.site}",
                code="snapshot_saving",
            )
        return await self.backend.find_snapshot(request, reference)

    async def collect_snapshots(self, known: set[str]) -> list[str]:
        """Remove stored snapshots neither the portal (``known``) nor a save here names."""
        return await self.backend.collect_snapshots(set(known) | self._saving)

    async def delete_snapshot(self, ref: SnapshotRef) -> None:
        """Remove a snapshot's stored data through the backend."""
        await self.backend.delete_snapshot(ref)

    async def fetch_dataset(self, request: FetchRequest) -> Fetched:
        """Fetch a URL dataset into this site's cache (or find it there); progress as notes.

        Requests for one entry are served one at a time (portal replicas may each
        send one): the later ones find the first one's download in the cache.
        """
        directory = self.cache_dir / request.entry
        async with self._fetch_locks.setdefault(request.entry, asyncio.Lock()):
            return await self._fetch_entry(request, directory)

    async def _fetch_entry(self, request: FetchRequest, directory: Path) -> Fetched:
        found = await asyncio.to_thread(fetching.complete_entry, directory)
        if found is not None:
            return found
        job = fetching.FetchJob(
            url=request.url,
            directory=directory,
            max_bytes=request.max_bytes,
            expected_size=request.expected_size,
            checksum=request.checksum,
            allow_private=request.allow_private,
        )

        async def progress(done: int, total: int | None) -> None:
            share = f" ({100 * done // total}%)" if total else ""
            of = f" of {_mib(total)}" if total else ""
            await self._report(
                Report(
                    request.instance_id,
                    "pending",
                    kind="progress",
                    message=f"fetching {request.url} into site {self.site}'s cache: "
                    f"{_mib(done)}{of}{share}",
                    data={"fetch": {"bytes": done, "total": total}},
                )
            )

        return await fetching.fetch(job, progress)

    async def health(self) -> str | None:
        """What keeps this site from working now (its engine is down), or None; cached."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < self.health_ttl:
            return self._health[1]
        try:
            problem = await wait_for(self.backend.health(), HEALTH_TIMEOUT)
        except TimeoutError:
            problem = f"the {self.backend.name} backend did not answer within {HEALTH_TIMEOUT:g}s"
        except Exception as exc:
            problem = f"the {self.backend.name} backend cannot tell: {exc}"
        self._health = (time.monotonic(), problem)
        return problem

    @property
    def last_health(self) -> str | None:
        """The last health answer (None: healthy or not asked yet)."""
        return self._health[1] if self._health is not None else None

    def claim_support(self, tool: Tool) -> str | None:
        """Why running instances of ``tool`` cannot be handed to users here (None: they can)."""
        return self.backend.claim_support(tool)

    def placed(self, spec: LaunchSpec) -> LaunchSpec:
        """``spec`` with its workspace under this site's workspaces directory."""
        root = self.backend.workspaces_root() or self.workspaces_dir
        return replace(spec, workspace=root / spec.workspace)

    def starting_ids(self) -> list[str]:
        """Instances whose start is under way."""
        return list(self._starting)

    def endpoint_of(self, instance_id: str) -> str | None:
        """Where an instance this agent watches listens (the tunnel connects there)."""
        watched = self.watched.get(instance_id)
        return watched.endpoint if watched is not None else None

    # --- what the site's backend supports -------------------------------------
    def unavailable_reason(self, tool: Tool) -> str | None:
        """Why ``tool`` cannot run here, in the backend's words, or None when it can.

        Answered at once, from the tool's definition and what the engine said
        at the last :meth:`refresh_tools` (a missing image it cannot pull).
        """
        return self.backend.tool_unavailable_here(tool)

    async def refresh_tools(self, tools: Collection[Tool]) -> None:
        """Ask the engine about ``tools`` now, then every :data:`TOOLS_REFRESH` seconds."""
        self.tools = list(tools)
        await self._refresh_tools_once()
        if self._tools_task is None or self._tools_task.done():
            self._tools_task = asyncio.create_task(
                self._refresh_tools_loop(), name=f"tools-{self.site}"
            )

    async def _refresh_tools_once(self) -> None:
        try:
            await wait_for(self.backend.refresh_tools(self.tools), HEALTH_TIMEOUT)
        except Exception as exc:  # its engine is down: health says so; the last answer stays
            log.info("site %s: cannot ask the engine about the tools: %r", self.site, exc)

    async def _refresh_tools_loop(self) -> None:
        while True:
            await asyncio.sleep(TOOLS_REFRESH)
            await self._refresh_tools_once()

    @property
    def snapshot_kind(self) -> str:
        """What a snapshot of an instance here is: ``image``, ``archive`` or ``""`` (none)."""
        return self.backend.snapshot_kind

    async def claim(self, instance_id: str, claim: Claim) -> dict[str, Any]:
        """Hand a running warm-pool instance to a user; returns its new backend state.

        The backend brings the user's workspace in; then a tool with a
        ``claim_path`` is told (with the instance token) whom it serves now.
        """
        from labgate.backends.claim import ClaimError

        watched = self.watched.get(instance_id)
        if watched is None or not watched.running:
            raise ClaimError(f"instance {instance_id} is not running on site {self.site}")
        claim = replace(claim, workspace=self.workspaces_dir / claim.workspace)
        claimed = await self.backend.claim(watched.backend_state, claim)
        spec = watched.spec
        watched.backend_state = claimed.state
        watched.spec = replace(
            spec, owner=claim.owner, owner_id=claim.owner_id, workspace=claim.workspace
        )
        if spec.tool.claim_path:
            body = {"user": claim.owner, "workspace": claimed.workspace}
            try:
                response = await self._ask_tool(
                    "POST",
                    watched.endpoint,
                    tool_path(spec, spec.tool.claim_path),
                    json=body,
                    headers={"Authorization": f"token {spec.secret}"},
                )
            except httpx.HTTPError as exc:
                raise ClaimError(f"the tool's claim hook failed: {exc!r}") from None
            if response.status_code >= 400:
                raise ClaimError(f"the tool's claim hook answered {response.status_code}")
        return claimed.state

    async def _ask_tool(
        self, method: str, endpoint: str, path: str, **kwargs: Any
    ) -> httpx.Response:
        """One HTTP request to a tool at its endpoint (``http://HOST:PORT`` or ``unix:/path``).

        A Unix socket is connected to without following a link
        (:func:`~labgate.backends.sockets.connectable`): the instance's uid
        owns the directory it is in. Raises :class:`httpx.HTTPError`.
        """
        address = probe_address(endpoint)
        if address is None or not address.path:
            return await self._http.request(method, endpoint.rstrip("/") + path, **kwargs)
        try:
            with connectable(address.path) as where:
                # Plain HTTP: verify=False spares building a TLS context (about 35 ms of CPU).
                transport = httpx.AsyncHTTPTransport(uds=where, verify=False)
                async with httpx.AsyncClient(
                    transport=transport, timeout=HEALTH_REQUEST_TIMEOUT, follow_redirects=False
                ) as client:
                    return await client.request(method, f"http://localhost{path}", **kwargs)
        except OSError as exc:
            raise httpx.ConnectError(f"{address.path}: {exc.strerror or exc}") from None

    async def reconcile(self, known: set[str]) -> list[str]:
        """Have the backend remove what neither the portal (``known``) nor this agent knows."""
        keep = set(known) | set(self.watched) | set(self._starting) | self._cancel_requested
        keep |= set(self._stop_retries)
        removed = await self.backend.reconcile(keep)
        if removed:
            log.info("site %s: removed %d orphan(s): %s", self.site, len(removed), removed)
        return removed

    async def close(self) -> None:
        """Stop background work; instances keep running."""
        tasks = [*self._starting.values(), *self._stop_retries.values()]
        tasks += [t for t in (self._watch_task, self._tools_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._watch_task = self._tools_task = None
        await self.tasks.close()
        await self._http.aclose()
        await self.backend.close()

    # --- the launch path ---------------------------------------------------
    async def _launch(self, spec: LaunchSpec) -> None:
        iid = spec.instance_id
        await self._report(
            Report(iid, "starting", message=f"starting {spec.tool.title} on site {self.site}")
        )
        # A launch sent again after a reconnect (the portal saw it still pending) may
        # follow a start by a killed agent whose state and reports reached no one: what
        # that start left would run beside this one (found by the chaos run).
        await self._discard(iid)
        start = asyncio.ensure_future(self.backend.start(spec))
        try:
            started = await asyncio.shield(start)
        except asyncio.CancelledError:
            await self._keep_interrupted_start(iid, start)
            raise
        except LabgateError as exc:
            await self._report(start_failed(iid, NEVER_STARTED, exc.detail))
            return
        except Exception as exc:
            log.exception("backend failed to start %s", iid)
            await self._report(start_failed(iid, NEVER_STARTED, f"backend error: {exc}"))
            return
        self.watched[iid] = Watched(spec, started.state, started.endpoint)
        if iid in self._cancel_requested:
            return
        await self._place_then_health(spec, started)

    async def _keep_interrupted_start(self, iid: str, start: asyncio.Future[Started]) -> None:
        """The agent closes mid-start: what the backend started is recorded, not orphaned.

        A backend start runs on (a thread, a container create) after its task is
        cancelled. Its state goes to the portal so the next agent adopts the
        instance, and stops it cleanly if it is stopped meanwhile.
        """
        try:
            started = await wait_for(start, INTERRUPTED_START_WAIT)
        except Exception:  # it failed or took too long: nothing of it can be adopted
            log.warning("site %s: the start of %s was interrupted", self.site, iid)
            return
        await self._report(
            Report(
                iid,
                "starting",
                kind="progress",
                message="started while the site agent closed",
                backend_state=started.state,
                endpoint=started.endpoint,
            )
        )

    async def _place(self, spec: LaunchSpec, started: Started) -> Started | None:
        """Wait for a queued instance's place (see :meth:`Backend.place`); None: it failed."""
        iid = spec.instance_id
        await self._report(
            Report(
                iid,
                "starting",
                kind="progress",
                message="submitted, waiting for a place",
                backend_state=started.state,
                endpoint="",
            )
        )
        try:
            placed = await self.backend.place(started.state)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, LabgateError):
                log.exception("placing %s failed", iid)
            self.watched.pop(iid, None)
            message = exc.detail if isinstance(exc, LabgateError) else f"backend error: {exc}"
            tail = await self._tail(started.state)
            await self._report(start_failed(iid, NEVER_STARTED, message, log_tail=tail))
            return None
        watched = self.watched.get(iid)
        if watched is not None:
            watched.backend_state, watched.endpoint = placed.state, placed.endpoint
        return placed

    async def _place_then_health(self, spec: LaunchSpec, started: Started) -> None:
        """Wait for a place when the backend has none yet, then for the health check."""
        if not started.endpoint:
            placed = await self._place(spec, started)
            if placed is None:
                return
            started = placed
        await self._report(
            Report(
                spec.instance_id,
                "starting",
                kind="progress",
                message="waiting for the health check",
                backend_state=started.state,
                endpoint=started.endpoint,
            )
        )
        await self._await_health(spec, started, spec.tool.start_timeout)

    async def _await_health(self, spec: LaunchSpec, started: Started, budget: float) -> None:
        """Wait for the tool's health check within ``budget`` seconds (and its grace).

        The budget counts from when the tool's process started (the caller
        waits for that), never from the launch request: time in the site's
        start queue is not spent from it. When it runs out while the tool is
        alive and still using CPU, the tool's ``start_grace`` is added once.
        """
        iid = spec.instance_id
        path = tool_path(spec, spec.tool.health_path)
        headers = {"Authorization": f"token {spec.secret}"}
        begun = time.monotonic()
        deadline = begun + budget
        interval = HEALTH_INTERVAL
        last_problem = "no answer yet"
        grace = spec.tool.start_grace
        graced = ""
        polled = -HEALTH_MAX_INTERVAL
        address = probe_address(started.endpoint)
        listened = address is None  # no address to probe: ask over HTTP from the start
        while True:
            # Is it still alive? Asked of the backend at most every HEALTH_MAX_INTERVAL
            # (an engine call for a container), however often its health is asked.
            now = time.monotonic()
            if now - polled >= HEALTH_MAX_INTERVAL or now >= deadline:
                polled = now
                status = await self.backend.poll(started.state)
                if not status.alive:
                    self.watched.pop(iid, None)
                    await self._report(
                        start_failed(
                            iid,
                            CRASHED,
                            f"the tool {status.detail or 'exited'} before it became ready",
                            log_tail=await self._tail(started.state),
                        )
                    )
                    return
            if time.monotonic() >= deadline:
                if graced or grace <= 0 or not await self._busy(started.state):
                    break
                graced = f" + {grace:g}s of grace while it was still busy"
                deadline = time.monotonic() + grace
                await self._report(
                    Report(
                        iid,
                        "starting",
                        kind="progress",
                        message=f"still starting after {budget:g}s and using CPU: {grace:g}s more",
                        data={"grace": grace},
                    )
                )
            # Until the tool listens, a bare connect says so at a fraction of an HTTP
            # request's cost (about 35 against 500 µs of the agent's CPU): checks this
            # frequent stay cheap in a launch storm.
            if not listened:
                listened = await listening(address)
            if not listened:
                last_problem = "nothing listens at the tool's address yet"
            else:
                try:
                    response = await self._ask_tool("GET", started.endpoint, path, headers=headers)
                    if response.status_code < 400:
                        watched = self.watched.get(iid)
                        if watched is not None:
                            watched.running = True
                        await self._report(Report(iid, "running", message="ready"))
                        return
                    last_problem = f"health check answered {response.status_code}"
                except httpx.HTTPError as exc:
                    last_problem = f"health check: {exc.__class__.__name__}"
            await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
            if listened or time.monotonic() - begun >= HEALTH_FAST_FOR:
                interval = min(interval * 1.5, HEALTH_MAX_INTERVAL)
        tail = await self._tail(started.state)
        self.watched.pop(iid, None)
        failure = f"{NEVER_ANSWERED}: not ready within {budget:g}s{graced} ({last_problem})"
        try:
            await self.backend.stop(started.state, self.stop_grace)
        except Exception as exc:
            await self._cleanup_failed(iid, started.state, failure, exc, tail)
            return
        await self._report(
            start_failed(
                iid,
                NEVER_ANSWERED,
                f"not ready within {budget:g}s{graced} ({last_problem})",
                log_tail=tail,
            )
        )

    async def _cleanup_failed(
        self, iid: str, state: dict[str, Any], failure: str, exc: Exception, tail: str
    ) -> None:
        """A start that failed could not be stopped: say so, and keep trying to stop it.

        Not reported ``failed`` (final: nothing would stop it then) but ``stopping``,
        its reason naming both failures; the stop is tried again as a stop the
        backend could not do (:meth:`stop`), and sent again by the portal after a
        restart, until the instance is ``stopped``.
        """
        reason = _reason(exc)
        log.error(
            "site %s: instance %s: %s, and stopping it failed: %s (tried again)",
            self.site,
            iid,
            failure,
            reason,
        )
        self._remember_stopped(iid)
        await self._report(
            Report(
                iid,
                "stopping",
                message=f"{failure}; stopping it failed: {reason}",
                data={"failure": NEVER_ANSWERED.replace(" ", "_"), "reason": reason},
                log_tail=tail,
            )
        )
        await self._stop_failed(iid, exc, 1, self.stop_retry_first, failure)
        self._retry_in_background(iid, state, failure)

    async def _busy(self, state: dict[str, Any]) -> bool:
        """Whether a live starting tool is using CPU now (the engine cannot say: it counts)."""
        before = await self.backend.cpu_seconds(state)
        if before is None:
            return True
        await asyncio.sleep(BUSY_SAMPLE)
        after = await self.backend.cpu_seconds(state)
        return after is not None and after - before >= BUSY_SAMPLE * BUSY_SHARE

    # --- watching ----------------------------------------------------------
    def _ensure_watch(self) -> None:
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch(), name=f"watch-{self.site}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for iid, watched in list(self.watched.items()):
                if not watched.running:
                    continue
                try:
                    status = await self.backend.poll(watched.backend_state)
                except Exception:
                    log.exception("polling %s failed", iid)
                    continue
                if status.alive or self.watched.get(iid) is not watched:
                    continue
                self.watched.pop(iid, None)
                await self._report(
                    Report(
                        iid,
                        "lost",
                        message=f"the tool {status.detail or 'exited'}",
                        log_tail=await self._tail(watched.backend_state),
                    )
                )

    async def _tail(self, backend_state: dict[str, Any]) -> str:
        try:
            return await self.backend.logs(backend_state, self.log_tail_lines)
        except Exception:
            return ""

    async def _progress(self, instance_id: str, message: str, data: dict[str, Any]) -> None:
        # The portal records a progress note under the instance's current state.
        await self._report(
            Report(instance_id, "starting", kind="progress", message=message, data=data)
        )

    async def _report(self, report: Report) -> None:
        try:
            await self.reporter(report)
        except Exception:
            log.exception("reporting %s for %s failed", report.state, report.instance_id)


def _reason(exc: Exception) -> str:
    """Why ``exc`` happened, in words for an instance's reason."""
    return str(getattr(exc, "detail", "") or exc) or exc.__class__.__name__


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB"
