"""The gateway of running task attempts: their executors' states, results and notes.

Two tokens per attempt, both derived from the signing key and the attempt id
(:mod:`labgate.security`), each good for that attempt only and only while it
is under way (409 once it ended):

``POST /api/v1/tasks/{attempt_id}/state`` with the executor's token
    The executor next to the task reports ``running``, then how the task
    ended (``succeeded`` or ``failed``, its exit status, JSON result, file
    names and the last lines of a failure's output). The run advances on it
    as on the site's own report (the first of the two counts); the files
    still come from the site. The task's own token is refused here: a task
    cannot end its attempt.
``POST /api/v1/tasks/{attempt_id}/events`` with either token
    A note into the run's events (``$LABGATE_TASK_TOKEN`` is the task's).

A wrong token and an unknown attempt get the same 401, before the body is
read.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labgate.errors import BadRequest, Conflict, Unauthorized
from labgate.portal.auth import token_from_header
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.scheduler.runs import (
    MAX_FILE_NAME,
    MAX_NOTE_DATA,
    MAX_RESULT,
    RunProcessor,
    json_size,
)
from labgate.security import executor_token, same, task_token
from labgate.wire.site import Report

router = APIRouter(prefix="/tasks", tags=["runs"])
M = TypeVar("M", bound=BaseModel)


def _strict(value: Any, limit: int, what: str) -> Any:
    """``value`` when it is strict JSON of at most ``limit`` bytes (no ``NaN``, no
    ``Infinity``: kept, they would make the run's view JSON no client parses)."""
    try:
        size = json_size(value)
    except ValueError:
        raise ValueError(f"{what} must be JSON without NaN or Infinity") from None
    if size > limit:
        raise ValueError(f"{what} is at most {limit:,} bytes as JSON")
    return value


class TaskNote(BaseModel):
    """One note of a running task: a line for its run's events, and optional JSON."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=2000)
    data: dict[str, Any] = Field(
        default_factory=dict, max_length=50, description="At most 16 KiB as JSON."
    )

    @field_validator("data")
    @classmethod
    def _data_bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        return dict(_strict(value, MAX_NOTE_DATA, "a note's data"))


class TaskState(BaseModel):
    """What an attempt's executor tells: it runs, or how the task ended.

    Cancelled and lost are the site's to tell (a ``scancel`` labgate did not send
    is ``lost``, not ``cancelled``), never the executor's.
    """

    model_config = ConfigDict(extra="forbid")

    state: Literal["running", "succeeded", "failed"]
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    reason: str = Field(default="", max_length=2000)
    result: Any = None
    seconds: float = Field(default=0.0, ge=0, le=1e12, allow_inf_nan=False)
    files: list[Annotated[str, Field(max_length=MAX_FILE_NAME)]] = Field(
        default_factory=list, max_length=1000
    )
    log_tail: str = Field(default="", max_length=20000)

    @field_validator("result")
    @classmethod
    def _result_strict(cls, value: Any) -> Any:
        return _strict(value, MAX_RESULT, "result")


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _check_token(request: Request, portal: Portal, attempt_id: str, *, notes: bool) -> None:
    """401 unless the request bears this attempt's executor token (or, for ``notes``, its
    task token)."""
    token = token_from_header(request.headers.get("authorization")) or ""
    key = portal.settings.secret_key.get_secret_value()
    allowed = [executor_token(key, attempt_id)]
    if notes:
        allowed.append(task_token(key, attempt_id))
    # Every candidate is compared, so the time taken says nothing about which one was close.
    matches = [same(token, expected) for expected in allowed]
    if not token or not any(matches):
        which = "task token" if notes else "executor token"
        raise Unauthorized(f"send the {which} of this attempt", code="invalid_token")


def _processor(portal: Portal) -> RunProcessor:
    processor = portal.run_processor
    if processor is None:
        raise Conflict("batch runs are not running here")
    return processor


def _parse(model: type[M], raw: bytes, what: str) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"not a {what}: {problems}") from None


@router.post(
    "/{attempt_id}/state",
    status_code=204,
    responses=errors(400, 401, 404, 409),
    openapi_extra=_body_schema(TaskState),
)
async def task_state(
    attempt_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """An attempt's executor reports its state, or how it ended (with the executor's token)."""
    _check_token(request, portal, attempt_id, notes=False)
    # The app's body limit (1 MiB) bounds a result here as everywhere.
    told = _parse(TaskState, await request.body(), "task state report")
    message = told.reason or told.state
    data: dict[str, Any] = {}
    if told.state != "running":
        data = {
            "exit_code": told.exit_code,
            "result": told.result,
            "seconds": told.seconds,
            "files": told.files,
        }
    report = Report(
        attempt_id, told.state, kind="task", message=message, log_tail=told.log_tail, data=data
    )
    await _processor(portal).executor_report(report)
    return Response(status_code=204)


@router.post(
    "/{attempt_id}/events",
    status_code=204,
    responses=errors(400, 401, 404, 409),
    openapi_extra=_body_schema(TaskNote),
)
async def task_note(
    attempt_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """A running task attempt adds a note to its run's events; its task token authenticates."""
    _check_token(request, portal, attempt_id, notes=True)
    # Read after the token: whoever has none learns nothing, not even the body's shape.
    note = _parse(TaskNote, await request.body(), "task note")
    await _processor(portal).note(attempt_id, note.message, note.data)
    return Response(status_code=204)
