"""The gateway of running task attempts: notes from a task's executor into its run's events.

``POST /api/v1/tasks/{attempt_id}/events`` with ``Authorization: Bearer
<task token>`` (``$LABGATE_TASK_TOKEN``, derived from the signing key and the
attempt id: :func:`labgate.security.task_token`) adds one note to the run's
events while the attempt is under way. The token is good for that attempt
only, and only for this; a wrong token and an unknown attempt get the same
401. States, results and files still come through the site's agent.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labgate.errors import BadRequest, Conflict, Unauthorized
from labgate.portal.auth import token_from_header
from labgate.portal.openapi import errors
from labgate.portal.state import Portal, get_portal
from labgate.security import task_token

router = APIRouter(prefix="/tasks", tags=["runs"])


class TaskNote(BaseModel):
    """One note of a running task: a line for its run's events, and optional JSON."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(min_length=1, max_length=2000)
    data: dict[str, Any] = Field(default_factory=dict, max_length=50)


@router.post(
    "/{attempt_id}/events",
    status_code=204,
    responses=errors(400, 401, 404, 409),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TaskNote.model_json_schema()}},
        }
    },
)
async def task_note(
    attempt_id: str, request: Request, portal: Portal = Depends(get_portal)
) -> Response:
    """A running task attempt adds a note to its run's events; its task token authenticates."""
    token = token_from_header(request.headers.get("authorization")) or ""
    expected = task_token(portal.settings.secret_key.get_secret_value(), attempt_id)
    if not token or not hmac.compare_digest(expected, token):
        raise Unauthorized("send the task token of this attempt", code="invalid_token")
    # Read after the token: whoever has none learns nothing, not even the body's shape.
    try:
        note = TaskNote.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise BadRequest(f"not a task note: {problems}") from None
    processor = portal.run_processor
    if processor is None:
        raise Conflict("batch runs are not running here")
    await processor.note(attempt_id, note.message, note.data)
    return Response(status_code=204)
