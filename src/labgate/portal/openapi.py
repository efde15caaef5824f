"""The API's errors in its OpenAPI document: one error body, and each operation's codes.

FastAPI documents each route's success and a 422 of its own shape, which is
not what labgate sends. :func:`install_openapi` rewrites the document once,
when it is first asked for: the component ``Error`` (:class:`ErrorOut`, the
one shape of :mod:`labgate.errors`) answers every 4xx and 5xx, and each
operation lists the statuses it can answer with. Most follow from what the
route depends on, so a new route is documented without anyone remembering:

- 401 when it reads credentials (a wrong token is refused even where none is needed);
- 403 when it needs a scope (:class:`~labgate.portal.auth.ScopeCheck`), or
  reads credentials and changes state (a cookie session must send its CSRF token);
- 404 when its path names something (and a path that matches no route is 404);
- 400 (not JSON), 413 (too large) and 422 (wrong shape or type) when it takes
  a body; 422 when it takes a parameter (out of range, or text the database
  cannot store).

What the route's own code raises besides is declared on its decorator with
``responses=errors(409, 429)``; a success other than the declared one (201
or 200 for an idempotent PUT) with FastAPI's own ``responses``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from labgate.portal.auth import SAFE_METHODS, ScopeCheck, identify, optional_principal
from labgate.resolver.schemas import ReplicaOut

COMPONENT = "Error"
REF = f"#/components/schemas/{COMPONENT}"

#: What each status means in labgate, and the codes it comes with (docs/api.md has them too).
DESCRIPTIONS: dict[int, str] = {
    400: "Bad request: `bad_request`, `invalid_json` (the body is not JSON), or a value "
    "the route cannot use (`unknown_scope`, `unknown_site`, `invalid_identifier`, ...).",
    401: "Not authenticated: `unauthorized` (no credentials), `invalid_token`, "
    "`invalid_credentials`, `account_disabled`. Comes with `WWW-Authenticate: token`.",
    403: "Not allowed: `insufficient_scope` (the token lacks the scope), `csrf_failed` "
    "(a cookie session changing state without its X-CSRF-Token), `forbidden`.",
    404: "Not found, or not visible to the caller: `not_found`, `unknown_<thing>`.",
    409: "Conflicts with the current state: `invalid_state`, `<thing>_exists`, `last_admin`, "
    "`tool_unavailable`, `no_capacity`, ... (docs/api.md lists them).",
    413: "`payload_too_large`: the body is over the `max_request_body` setting.",
    422: "`validation_error`: a field is missing, unknown, out of range or of the wrong "
    'JSON type (bodies are strict: `0` is not a boolean, `"5"` not a number); '
    "`invalid_param`: a tool's launch parameter is refused (with `param`, its name); "
    "`invalid_option`: a launch option the site does not offer (with `option`, its name).",
    429: "Too many: `quota_exceeded` (with `quota`, `scope`, `limit`, `current`), or "
    "`too_many_requests` (rate limited; `Retry-After` says when to try again).",
    502: "`backend_error`: the site's engine failed (a container engine or a registry).",
}


class ErrorOut(BaseModel):
    """The body of every API error: a stable code, a sentence, and a few codes' details."""

    model_config = ConfigDict(extra="forbid", title=COMPONENT)

    error: str = Field(description="Machine-readable code, e.g. `not_found`, `quota_exceeded`.")
    detail: str = Field(description="What went wrong, in a sentence for people.")
    quota: SkipJsonSchema[None] | Literal["instances", "cpu", "memory", "core_hours"] = Field(
        None, description="`quota_exceeded`: which limit."
    )
    scope: SkipJsonSchema[None] | Literal["user", "group"] = Field(
        None, description="`quota_exceeded`: whose limit, the user's or the group's."
    )
    limit: SkipJsonSchema[None] | float = Field(
        None, description="`quota_exceeded`: the limit (bytes for memory)."
    )
    current: SkipJsonSchema[None] | float = Field(
        None, description="`quota_exceeded`: what is held or used now."
    )
    replicas: SkipJsonSchema[None] | list[ReplicaOut] = Field(
        None, description="`dataset_unavailable`: the dataset's replicas and why none is usable."
    )
    param: SkipJsonSchema[None] | str = Field(
        None, description="`invalid_param`: the launch parameter refused."
    )
    option: SkipJsonSchema[None] | str = Field(
        None, description="`invalid_option`: the launch option refused."
    )


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route decorator for statuses its own code may answer with."""
    return {status: {"description": DESCRIPTIONS[status]} for status in statuses}


def _dependants(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _dependants(sub)


def api_routes(routes: list[Any]) -> Iterator[Any]:
    """Every API route of an app, with its full path (``path_format``) and dependencies."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined,unused-ignore]
    except ImportError:  # FastAPI before routers were included lazily: routes are flat
        yield from (route for route in routes if isinstance(route, APIRoute))
        return
    for context in iter_route_contexts(routes):
        if isinstance(context.original_route, APIRoute):
            yield context


def statuses_of(route: Any) -> set[int]:
    """The error statuses a route answers with, from what it depends on."""
    found: set[int] = set()
    parts = list(_dependants(route.dependant))
    calls: list[Callable[..., Any] | None] = [part.call for part in parts]
    changes = bool(route.methods - SAFE_METHODS)
    if optional_principal in calls or identify in calls:
        found.add(401)
        if changes:
            found.add(403)
    if any(isinstance(call, ScopeCheck) for call in calls):
        found.add(403)
    if any(part.path_params for part in parts):
        found.add(404)
    if any(part.body_params for part in parts):
        found.update((400, 413, 422))
    # Any parameter can be refused: a number out of range, a choice not offered, or
    # text the database cannot store (PostgreSQL takes no NUL character).
    if any(part.query_params or part.header_params or part.path_params for part in parts):
        found.add(422)
    return found


def _error_response(status: int) -> dict[str, Any]:
    return {
        "description": DESCRIPTIONS.get(status, "An error."),
        "content": {"application/json": {"schema": {"$ref": REF}}},
    }


def document_errors(schema: dict[str, Any], routes: list[Any]) -> None:
    """Add the error body and each operation's error statuses to an OpenAPI document."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    error_schema = ErrorOut.model_json_schema(
        ref_template="#/components/schemas/{model}", mode="serialization"
    )
    for name, definition in error_schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[COMPONENT] = error_schema
    for route in api_routes(routes):
        if not route.include_in_schema:
            continue
        path = schema["paths"].get(route.path_format)
        if path is None:
            continue
        computed = statuses_of(route)
        for method in route.methods:
            operation = path.get(method.lower())
            if operation is None:
                continue
            responses = operation["responses"]
            for status in computed:
                responses.setdefault(str(status), _error_response(status))
            for status, response in responses.items():
                if (int(status) >= 400 and "content" not in response) or status == "422":
                    response.update(_error_response(int(status)))
    text = json.dumps(schema["paths"])
    for unused in ("HTTPValidationError", "ValidationError"):
        if f"/{unused}" not in text and unused in components:
            del components[unused]


def install_openapi(app: FastAPI) -> None:
    """Make ``app`` serve an OpenAPI document with labgate's errors in it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            document_errors(schema, app.routes)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
