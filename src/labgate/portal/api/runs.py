"""Batch runs: submit, list, show (graph, events), cancel, re-run, logs and results.

A run is its owner's: only they and admins see it, cancel it, re-run it, read
its logs or download its results; to anyone else it does not exist (404).
Runs use the instance scopes: ``instances:read`` to look, ``instances:write``
to submit, cancel and re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import queue
import stat
import tarfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from labgate.db.models import User
from labgate.db.runs import Run, RunState
from labgate.errors import BadRequest
from labgate.portal.auth import Principal, require
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal, runs_of
from labgate.safefs import ExactReader, open_below, refused, walk_files
from labgate.scheduler import runrows
from labgate.scheduler.runrows import Viewer
from labgate.types import MAX_ID
from labgate.wire.runs import DefinitionError, parse_definition, validate_definition

router = APIRouter(prefix="/runs", tags=["runs"])
log = logging.getLogger(__name__)

#: Largest run definition accepted (bytes).
MAX_DEFINITION = 1024 * 1024
#: Most events one ``GET /runs/{id}/events`` (or ``GET /runs/{id}``) returns.
MAX_EVENTS = 10_000


def viewer(caller: Principal) -> Viewer:
    """The caller as the run processor sees them."""
    return Viewer(caller.user_id, caller.name, caller.is_admin and "admin" in caller.scopes)


def results_root(portal: Portal, run: Run) -> tuple[Path, tuple[str, str]]:
    """Where a run's collected results are: the owner's workspace and, below it,
    ``runs/<id>`` (reached without following links: the owner may plant them)."""
    return portal.settings.workspaces_dir / run.owner.name, ("runs", run.id)


@router.post("", status_code=201, responses=errors(400, 409, 422))
async def submit_run(
    request: Request,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> dict[str, Any]:
    """Submit a run: its definition as JSON (``application/json``) or TOML (any other type).

    422 ``memory_required``: a task asks no memory (``memory_mib = 0``, no memory limit)
    while its owner's memory is limited (or every one of their groups').
    """
    body = await request.body()
    if len(body) > MAX_DEFINITION:
        raise BadRequest(f"a run definition is at most {MAX_DEFINITION} bytes")
    text = body.decode("utf-8", errors="replace")
    kind = "json" if "json" in request.headers.get("content-type", "") else "auto"
    try:
        definition = parse_definition(text, kind)
    except DefinitionError as exc:
        raise BadRequest(f"invalid run definition:\n{exc}", code="invalid_run") from None
    run_id = await runs_of(portal).submit(caller.user_id, definition)
    return await _show(portal, caller, run_id, events=False)


@router.post("/validate", responses=errors(400))
async def validate_run(
    body: dict[str, Any], caller: Principal = require("instances:read")
) -> dict[str, Any]:
    """Check a JSON run definition without submitting it; answers it normalized."""
    try:
        return validate_definition(body).model_dump(mode="json")
    except DefinitionError as exc:
        raise BadRequest(f"invalid run definition:\n{exc}", code="invalid_run") from None


@router.get("")
async def list_runs(
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    state: RunState | None = None,
    limit: int = Query(100, ge=1, le=1000),
) -> list[dict[str, Any]]:
    """Your runs (admins: everyone's), newest first."""
    who = viewer(caller)

    def query(session: Session) -> list[dict[str, Any]]:
        stmt = select(Run, User.name).join(User, Run.owner_id == User.id)
        if not who.admin:
            stmt = stmt.where(Run.owner_id == who.user_id)
        if state is not None:
            stmt = stmt.where(Run.state == state)
        stmt = stmt.order_by(Run.created_at.desc()).limit(limit)
        return [
            {
                "id": run.id,
                "name": run.name,
                "owner": owner,
                "state": run.state.value,
                "reason": run.reason,
                "created_at": run.created_at.isoformat(),
                "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            }
            for run, owner in session.execute(stmt)
        ]

    return await portal.run_db(query)


async def _show(portal: Portal, caller: Principal, run_id: str, *, events: bool) -> dict[str, Any]:
    who = viewer(caller)

    def query(session: Session) -> dict[str, Any]:
        run = runrows.visible_run(session, run_id, who, attempts=False)
        if not events:
            return runrows.run_json(session, run)
        # The first MAX_EVENTS, oldest first: a run's tasks may add many (notes, retries),
        # and the rest are a page of /events away (after the last id shown).
        rows = runrows.run_events(session, run.id, 0, MAX_EVENTS + 1)
        body = runrows.run_json(session, run, events=rows[:MAX_EVENTS])
        body["events_more"] = len(rows) > MAX_EVENTS
        return body

    return await portal.run_db(query)


@router.get("/{run_id}", responses=errors(404))
async def show_run(
    run_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    events: bool = Query(True, description="Include the run's events."),
) -> dict[str, Any]:
    """One run: its stages and tasks with state, results and (by default) events.

    At most :data:`MAX_EVENTS` events, oldest first; ``events_more`` says whether
    there are more (``GET /runs/{id}/events?after=<the last one's id>``).
    """
    return await _show(portal, caller, run_id, events=events)


@router.get("/{run_id}/events", responses=errors(404))
async def run_events(
    run_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    after: int = Query(0, ge=0, le=MAX_ID, description="Only events after this event id."),
    limit: int = Query(1000, ge=1, le=MAX_EVENTS, description="At most this many events."),
) -> dict[str, Any]:
    """A run's state and its events after ``after``, oldest first: to follow a run.

    Ask again with the last event's ``id`` as ``after``; the run has ended once
    its ``state`` is not ``pending`` or ``running`` and no events are left.
    """
    who = viewer(caller)

    def query(session: Session) -> dict[str, Any]:
        run = runrows.visible_row(session, run_id, who)
        rows = runrows.run_events(session, run.id, after, limit)
        return {
            "id": run.id,
            "state": run.state.value,
            "reason": run.reason,
            "events": [runrows.event_json(e) for e in rows],
        }

    return await portal.run_db(query)


@router.post("/{run_id}/cancel", responses=errors(404, 409))
async def cancel_run(
    run_id: str,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> dict[str, Any]:
    """Cancel a run: what runs is stopped, what waits never starts."""
    await runs_of(portal).cancel(run_id, viewer(caller))
    return await _show(portal, caller, run_id, events=False)


@router.post("/{run_id}/rerun", responses=errors(404, 409))
async def rerun_run(
    run_id: str,
    caller: Principal = require("instances:write"),
    portal: Portal = Depends(get_portal),
) -> dict[str, Any]:
    """Run again the tasks of a finished run that did not succeed."""
    await runs_of(portal).rerun(run_id, viewer(caller))
    return await _show(portal, caller, run_id, events=False)


@router.get("/{run_id}/logs", responses=errors(404, 409))
async def run_task_logs(
    run_id: str,
    task: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
    lines: int = Query(200, ge=1, le=10000),
) -> dict[str, Any]:
    """A task's output (its last attempt), read at its site."""
    text = await runs_of(portal).logs(run_id, viewer(caller), task, lines)
    return {"run": run_id, "task": task, "lines": lines, "text": text}


@router.get(
    "/{run_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/gzip": {}}}, **errors(404)},
)
async def run_results(
    run_id: str,
    caller: Principal = require("instances:read"),
    portal: Portal = Depends(get_portal),
) -> Response:
    """Every task's collected results and a ``results.json`` of exit codes and return values.

    Streamed as it is compressed: however large the run's folder has grown,
    the portal holds a few pieces of it at a time.
    """
    who = viewer(caller)

    def query(session: Session) -> tuple[tuple[Path, tuple[str, str]], dict[str, Any]]:
        run = runrows.visible_run(session, run_id, who, attempts=False)
        summary = runrows.run_json(session, run)
        return results_root(portal, run), summary

    (workspace, parts), summary = await portal.run_db(query)
    return StreamingResponse(
        _stream_archive(workspace, parts, summary),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="run-{run_id}.tar.gz"'},
    )


#: Compressed bytes handed to the client at a time, and pieces held for it at most:
#: a results download holds about 2 MiB however large the run's folder has grown.
_PIECE = 256 * 1024
_PIECES = 8


class _Gone(Exception):
    """The client stopped reading: the archive's writer stops."""


class _Pieces(io.RawIOBase):
    """Where the archive's writer (a thread) writes: pieces for the response, bounded.

    A full queue blocks the writer until the client takes a piece, so memory
    stays at :data:`_PIECES` pieces; once the client has gone, a write raises.
    """

    def __init__(self, out: queue.Queue[bytes | BaseException | None], gone: threading.Event):
        self.out = out
        self.gone = gone
        self.pending = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pending += data
        if len(self.pending) >= _PIECE:
            self.send()
        return len(data)

    def send(self) -> None:
        """Hand what was written so far to the response."""
        if self.pending:
            piece, self.pending = bytes(self.pending), bytearray()
            self.put(piece)

    def put(self, item: bytes | BaseException | None) -> None:
        while not self.gone.is_set():
            with contextlib.suppress(queue.Full):
                self.out.put(item, timeout=0.5)
                return
        raise _Gone


def _write_archive(
    pieces: _Pieces, workspace: Path, parts: tuple[str, ...], summary: dict[str, Any]
) -> None:
    """The results archive, written into ``pieces`` (in a thread), then its end (None).

    ``results.json`` and the regular files under ``workspace/parts``. The owner
    may have made ``runs``, ``runs/<id>`` or any folder below a link (to
    another user's workspace, the data dir): none is followed, a link on the
    way to the run's folder means no files, links below it are left out. A
    file changed while it is read is taken at the size it had (ExactReader).
    """
    try:
        with contextlib.ExitStack() as stack:
            tar = stack.enter_context(tarfile.open(fileobj=pieces, mode="w|gz"))
            data = json.dumps(summary, indent=2).encode()
            info = tarfile.TarInfo("results.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            root = _open_results(workspace, parts)
            if root is not None:
                stack.callback(os.close, root)
                for name, fd in stack.enter_context(contextlib.closing(walk_files(root))):
                    found = os.fstat(fd)
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = found.st_size, found.st_mtime
                    info.mode = stat.S_IMODE(found.st_mode)
                    tar.addfile(info, ExactReader(fd, info.size))
        pieces.send()
        pieces.put(None)
    except _Gone:
        return
    except Exception as exc:  # reading the folder failed: the download ends short
        with contextlib.suppress(_Gone):
            pieces.put(exc)


async def _stream_archive(
    workspace: Path, parts: tuple[str, ...], summary: dict[str, Any]
) -> AsyncIterator[bytes]:
    """The results archive, compressed in a thread as the client reads it."""
    out: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=_PIECES)
    gone = threading.Event()
    writer = threading.Thread(
        target=_write_archive,
        args=(_Pieces(out, gone), workspace, parts, summary),
        name="run-results",
        daemon=True,
    )
    writer.start()
    try:
        while True:
            piece = await asyncio.to_thread(out.get)
            if piece is None:
                return
            if isinstance(piece, BaseException):
                log.warning("a run's results download ended short: %s", piece)
                return
            yield piece
    finally:
        gone.set()  # a client that went away stops the writer at its next piece


def _open_results(workspace: Path, parts: tuple[str, ...]) -> int | None:
    """A descriptor of a run's results folder; None when there is none, or a link
    (or a file) stands on the way to it."""
    try:
        return open_below(workspace, parts)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if refused(exc):
            return None
        raise
